"""What travels between devices, districts and the aggregator: codecs, messages, signatures."""

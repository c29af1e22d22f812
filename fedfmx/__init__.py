"""FedFMX core: model, algorithm, aggregation maths, data streams, codec and schemas.

The core imports no MQTT and no CLI code: services (`edge_client`, `aggregator`, `export`)
build on it, never the other way round.
"""

__version__ = "0.1.0"

"""Data: the real data sets, the class-incremental protocol, the fleet's deal and preprocessing."""

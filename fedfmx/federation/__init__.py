"""The aggregator's side: round logic, merges, buffered rounds, the in-process engine."""

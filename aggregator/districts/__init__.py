"""A city's fleet as a tree: district aggregators behind their own brokers, bridged to a root.

`district` serves a district's devices and forwards one partial sum per round; `root` merges the
districts' partials as the flat aggregator merges updates; `config` is a district's YAML;
`provisioning` writes the bridged brokers, certificates and ACLs; `side_tables` keeps their small
SQLite tables beside the aggregator state (docs/decisions.md §15).
"""

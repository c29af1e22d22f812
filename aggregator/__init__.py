"""The aggregator service: fleet provisioning (and, next, round orchestration over MQTT)."""

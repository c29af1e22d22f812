"""The shared MQTT layer: topics, chunk framing, a typed paho session and local brokers.

It moves named binary messages between topics and knows nothing about models; the core
package `fedfmx` never imports it.
"""

from transport.brokers import EmbeddedBroker, MosquittoBroker, find_mosquitto, free_port
from transport.chunks import (
    CHUNK_HEADER_SIZE,
    Chunk,
    PartialMessage,
    Reassembler,
    chunk_count,
    decode_chunk,
    new_message_id,
    split_message,
)
from transport.session import (
    BrokerAddress,
    DeliveryDeferred,
    Handler,
    LastWill,
    MqttSession,
    PendingPublish,
    SessionSettings,
    TlsSettings,
    parse_broker_url,
    session_settings,
)
from transport.topics import (
    TopicAddress,
    TopicKind,
    check_id,
    client_topic,
    clients_filter,
    model_body_filter,
    model_body_topic,
    model_filters,
    model_manifest_topic,
    model_manifests_filter,
    mqtt_client_id,
    parse_topic,
    round_topic,
)

__all__ = [
    "CHUNK_HEADER_SIZE",
    "BrokerAddress",
    "Chunk",
    "DeliveryDeferred",
    "EmbeddedBroker",
    "Handler",
    "LastWill",
    "MosquittoBroker",
    "MqttSession",
    "PartialMessage",
    "PendingPublish",
    "Reassembler",
    "SessionSettings",
    "TlsSettings",
    "TopicAddress",
    "TopicKind",
    "check_id",
    "chunk_count",
    "client_topic",
    "clients_filter",
    "decode_chunk",
    "find_mosquitto",
    "free_port",
    "model_body_filter",
    "model_body_topic",
    "model_filters",
    "model_manifest_topic",
    "model_manifests_filter",
    "mqtt_client_id",
    "new_message_id",
    "parse_broker_url",
    "parse_topic",
    "round_topic",
    "session_settings",
    "split_message",
]

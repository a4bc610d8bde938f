"""Kura-compatible MQTT cloud connection: payload codec, topics, lifecycle certificates, the broker
connection and the request/response dispatcher. See agent/adapters/mqtt/README.md."""

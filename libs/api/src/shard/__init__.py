"""AI Shard's generated API (shard.*.v1), from scripts/protos.py."""

from google.api import annotations_pb2, client_pb2, field_behavior_pb2, resource_pb2  # noqa: F401

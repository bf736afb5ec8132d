"""`shard-inference` (or `python -m shard_inference`): the router, set up from the environment."""

from __future__ import annotations

from shard_core.runtime import run_service
from shard_inference.app import serve
from shard_inference.settings import InferenceSettings


def main() -> None:
    run_service("inference", InferenceSettings(), serve)

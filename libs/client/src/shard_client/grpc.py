"""`tritonclient.grpc`'s blocking client over the whole shard, with no router in the data path.

The same client as `shard_client.aio`, driven from a private event loop on a background thread,
so blocking code (and many threads at once) can use it:

    with InferenceServerClient("router:8001", api_key=secret) as client:
        result = client.infer("simple", inputs)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult

from shard_client import aio

__all__ = ["InferInput", "InferRequestedOutput", "InferResult", "InferenceServerClient"]
T = TypeVar("T")


class InferenceServerClient:
    """The shard as one Triton, reached node by node; blocking calls."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str,
        max_attempts: int = 2,
        connect_timeout: float = 10.0,
        ssl: bool = False,
        root_certificates: str | Path | None = None,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="shard-client", daemon=True
        )
        self._thread.start()
        self._client = self._run(
            self._open(
                url,
                api_key=api_key,
                max_attempts=max_attempts,
                ssl=ssl,
                root_certificates=root_certificates,
            )
        )
        try:
            self._run(self._client.connect(connect_timeout))
        except BaseException:
            self.close()
            raise

    @staticmethod
    async def _open(url: str, **options: Any) -> aio.InferenceServerClient:
        return aio.InferenceServerClient(url, **options)

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    def __enter__(self) -> InferenceServerClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if hasattr(self, "_client"):
            self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def is_server_live(self) -> bool:
        return self._run(self._client.is_server_live())

    def is_server_ready(self) -> bool:
        return self._run(self._client.is_server_ready())

    def is_model_ready(self, model_name: str, model_version: str = "") -> bool:
        return self._run(self._client.is_model_ready(model_name, model_version))

    def get_model_metadata(self, model_name: str, model_version: str = "", **kwargs: Any) -> Any:
        return self._run(self._client.get_model_metadata(model_name, model_version, **kwargs))

    def get_model_config(self, model_name: str, model_version: str = "", **kwargs: Any) -> Any:
        return self._run(self._client.get_model_config(model_name, model_version, **kwargs))

    def infer(self, model_name: str, inputs: list[InferInput], **kwargs: Any) -> InferResult:
        """Run inference on a replica, with `tritonclient.grpc`'s keyword arguments."""
        result: InferResult = self._run(self._client.infer(model_name, inputs, **kwargs))
        return result

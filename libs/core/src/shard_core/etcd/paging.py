"""AIP-158 pagination over an etcd prefix: bounded reads and opaque page tokens."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

from shard_core.errors import InvalidArgumentError
from shard_core.etcd.store import Entry, EtcdStore

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _encode(last_key: str) -> str:
    return base64.urlsafe_b64encode(last_key.encode()).decode()


def _decode(token: str, prefix: str) -> str:
    try:
        key = base64.urlsafe_b64decode(token.encode()).decode()
    except ValueError:
        key = ""
    if not key.startswith(prefix):
        raise InvalidArgumentError(
            "page_token is not a token this API returned", metadata={"field": "page_token"}
        )
    return key


async def page(
    store: EtcdStore, prefix: str, *, page_size: int, page_token: str
) -> tuple[list[Entry], str]:
    """One page of the entries under `prefix`, in key order, and the next page's token."""
    if page_size < 0:
        raise InvalidArgumentError(
            "page_size must not be negative", metadata={"field": "page_size"}
        )
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    after = _decode(page_token, prefix) if page_token else ""
    entries, more = await store.page(prefix, start_after=after, limit=size)
    return entries, _encode(entries[-1].key) if more and entries else ""


async def every(
    store: EtcdStore, prefix: str, *, batch: int = MAX_PAGE_SIZE
) -> AsyncIterator[Entry]:
    """Every entry under `prefix`, in key order, read a bounded page at a time: for sweeps
    that must see a prefix of any size without holding it whole."""
    after = ""
    while True:
        entries, more = await store.page(prefix, start_after=after, limit=batch)
        for entry in entries:
            yield entry
        if not more or not entries:
            return
        after = entries[-1].key

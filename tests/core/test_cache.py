"""The response cache: keys, expiry, the memory bound, and which versions may be cached."""

from __future__ import annotations

from shard.model.v1 import model_pb2
from shard_core import keys
from shard_edge.view import CacheableVersions
from shard_inference.cache import MemoryCache, cache_key


class Clock:
    def __init__(self) -> None:
        self.now = 10.0

    def __call__(self) -> float:
        return self.now


def test_keys_separate_models_versions_inputs_and_private_callers() -> None:
    base = cache_key("m", "1", b"inputs", "")
    assert base == cache_key("m", "1", b"inputs", "")
    assert len({
        base,
        cache_key("m", "2", b"inputs", ""),
        cache_key("n", "1", b"inputs", ""),
        cache_key("m", "1", b"other", ""),
        cache_key("m", "1", b"inputs", "keys/a"),
        cache_key("m1", "", b"inputs", ""),
    }) == 6  # fmt: skip


async def test_entries_expire_and_the_least_recently_used_go_first() -> None:
    clock = Clock()
    cache = MemoryCache(max_bytes=10, clock=clock)
    await cache.put(b"a", b"1234", ttl_s=5)
    await cache.put(b"b", b"1234", ttl_s=5)
    assert await cache.get(b"a") == b"1234"  # now b is the least recently used
    await cache.put(b"c", b"1234", ttl_s=5)
    assert await cache.get(b"b") is None
    assert cache.bytes == 8
    await cache.put(b"huge", b"x" * 11, ttl_s=5)  # larger than the whole cache: not kept
    assert await cache.get(b"huge") is None
    clock.now += 5
    assert await cache.get(b"a") is None
    assert cache.bytes == 4


def test_only_versions_that_opt_in_are_cacheable() -> None:
    versions = CacheableVersions()
    cached = model_pb2.ModelVersion(name="models/m/versions/2", response_cache_ttl_seconds=30)
    plain = model_pb2.ModelVersion(name="models/m/versions/1")
    versions.reset(
        {
            keys.version("m", "1"): plain.SerializeToString(),
            keys.version("m", "2"): cached.SerializeToString(),
        }
    )
    assert versions.ttl("m", "2") == 30
    assert versions.ttl("m", "1") == 0
    versions.delete(keys.version("m", "2"))
    assert versions.ttl("m", "2") == 0

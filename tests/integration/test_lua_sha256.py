"""The SHA-256 our Envoys compute in Lua (`sha256.lua`), run in a real Envoy and compared with
hashlib's on every length around the block boundaries and on random bytes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from shard_core.envoy import HTTP_TYPE, LUA_TYPE, ROUTER_FILTER, SHA256_LUA, EnvoyProcess
from shard_core.net import free_port

ECHO_DIGEST = """
function envoy_on_request(handle)
  local body = handle:body()
  local message = body and body:getBytes(0, body:length()) or ""
  handle:respond({[":status"] = "200"}, sha256_hex(message))
end
"""


@pytest.fixture
async def digests(tmp_path: Path) -> AsyncIterator[str]:
    """The address of an Envoy that answers each POST with the SHA-256 of its body."""
    directory = tmp_path
    source = f"{SHA256_LUA.read_text()}\n{ECHO_DIGEST}"
    port = free_port()
    manager = {
        "@type": f"{HTTP_TYPE}.HttpConnectionManager",
        "stat_prefix": "digests",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 404}}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.lua",
                "typed_config": {
                    "@type": LUA_TYPE,
                    "default_source_code": {"inline_string": source},
                },
            },
            ROUTER_FILTER,
        ],
    }
    listener = {
        "name": "digests",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": manager,
                    }
                ]
            }
        ],
    }
    envoy = EnvoyProcess(
        "envoy (sha256)", directory, {"static_resources": {"listeners": [listener]}}, tls_dir=None
    )
    await envoy.start()
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        envoy.stop()


def _digest(url: str, message: bytes) -> str:
    with urllib.request.urlopen(urllib.request.Request(url, data=message), timeout=10) as answer:
        return str(answer.read().decode())


async def test_the_lua_digest_is_sha256(digests: str) -> None:
    messages = [b"", b"abc", b"shard_0123456789ab_" + b"k" * 43]
    messages += [bytes(range(256))[:length] for length in range(50, 140)]
    messages += [os.urandom(length) for length in (1, 63, 64, 65, 1000, 4096)]
    for message in messages:
        assert (
            await asyncio.to_thread(_digest, digests, message)
            == hashlib.sha256(message).hexdigest()
        ), len(message)

"""The edge: Envoy on the router's ports, configured by the router over xDS (ADS).

Envoy terminates every connection to the router's ports: plaintext on loopback, TLS, and mutual
TLS for the mesh's services. It sends the inferences it can decide on its own (`grpc_door.lua` says
which) straight to the nodes' gates over mutual TLS, balanced, retried and with failing nodes
ejected by Envoy, and everything else to the Python router behind it on a Unix socket only this
user can open, naming the client in `x-forwarded-for` (and, on the mesh port, the caller's
certificate in `x-forwarded-client-cert`).

The router builds Envoy's listeners, routes, clusters (one per model version taking the direct
path) and their endpoints from its etcd view (`resources`) and publishes them through its ADS
server whenever the view changes; Envoy keeps serving its last configuration while the router,
or etcd, is away.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import itertools
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Imported for their types: Envoy's typed configurations below name them.
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2  # noqa: F401
from envoy.extensions.filters.http.lua.v3 import lua_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry import metrics
from prometheus_client import REGISTRY

from shard_client.routing import EndpointTable, TrafficSplit
from shard_core.auth import KeyRing, ModelAccess, Permission, principal_of
from shard_core.envoy import (
    GRPC_MESSAGE_LUA,
    HTTP_TYPE,
    MAX_HEAP_BYTES,
    ROUTER_FILTER,
    SHA256_LUA,
    TYPES,
    EnvoyProcess,
    EnvoyStats,
    downstream_tls,
    http2_upstream,
    lua_filter,
    overload_manager,
    static_cluster,
    upstream_mesh_tls,
)
from shard_core.pki import node_workload, spiffe_id
from shard_edge.settings import DataPlaneSettings
from shard_edge.view import CacheableVersions, ShardView, ViewChanges
from shard_edge.xds import CLUSTER, ENDPOINT, LISTENER, ROUTE, AdsServer, Snapshot

_log = logging.getLogger(__name__)

INFER = "/inference.GRPCInferenceService/ModelInfer"
# Triton's REST inference: POST /v2/models/<name>[/versions/<version>]/infer.
REST_INFER = r"/v2/models/[^/]+(/versions/[^/]+)?/infer"
XDS_CLUSTER = "xds"
ROUTES = "edge"
# The cluster of model `m` version `v` is MODEL_CLUSTERS + "m/v"; the one for its sequences
# (hashed by sequence id onto the same nodes), SEQUENCE_CLUSTERS + "m/v".
MODEL_CLUSTERS = "m/"
SEQUENCE_CLUSTERS = "s/"
# The headers `door.lua` sets for the direct route and its rate limits (never a client's).
CLUSTER_HEADER = "x-shard-cluster"
KEY_HEADER = "x-shard-key"
KEY_COST_HEADER = "x-shard-key-cost"
MODEL_HEADER = "x-shard-model"
MODEL_COST_HEADER = "x-shard-model-cost"
SEQUENCE_HEADER = "x-shard-sequence"
EDGE_HEADERS = (
    SEQUENCE_HEADER,
    CLUSTER_HEADER,
    KEY_HEADER,
    KEY_COST_HEADER,
    MODEL_HEADER,
    MODEL_COST_HEADER,
)
# A key's or model's bucket fills at this many tokens a second (see `request_cost`).
COST_SCALE = 1_000_000
# What a node is never told about a caller: its key, its address.
PRIVATE_HEADERS = ("authorization", "x-forwarded-for", "x-envoy-external-address")
# The access log's request fields, set by `door.lua` (dynamic metadata).
LOG_METADATA = "shard"
DOOR_LUA = Path(__file__).with_name("door.lua")
GRPC_DOOR_LUA = Path(__file__).with_name("grpc_door.lua")
REST_DOOR_LUA = Path(__file__).with_name("rest_door.lua")
LUA_METADATA = "envoy.filters.http.lua"
# Requests are read whole (for the model they name) up to the router's own message limit.
MAX_REQUEST_BYTES = 64 * 1024 * 1024 + 1024
MAX_REQUEST_WINDOW = 64 * 1024 * 1024 + 64 * 1024
# A node's weight among a version's replicas: halved for each doubling of its queue.
FULL_WEIGHT = 128
# Anonymous clients and keys whose rate limits Envoy tracks at once (the least recent are
# forgotten).
MAX_DYNAMIC_BUCKETS = 100_000
PREVIOUS_HOSTS = "extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
ADS: dict[str, Any] = {"ads": {}, "resource_api_version": "V3"}


@dataclass(frozen=True, kw_only=True)
class Door:
    """A kind of front door: what its Envoy reads to send an inference straight to a node, and
    the Python service behind it, which serves everything else."""

    service: str  # the service behind the door (its cluster's name)
    script: Path  # the door's Lua, run after door.lua and `libraries`
    libraries: tuple[Path, ...]
    infer: dict[str, Any]  # the route match of an inference request
    retry_on: str  # when a failed attempt is tried again on another node
    grpc: bool  # KServe gRPC (the router's), else Triton's REST (the gateway's)


GRPC_DOOR = Door(
    service="router",
    script=GRPC_DOOR_LUA,
    libraries=(GRPC_MESSAGE_LUA, SHA256_LUA),
    infer={"path": INFER},
    retry_on="unavailable,reset,connect-failure,refused-stream",
    grpc=True,
)
REST_DOOR = Door(
    service="gateway",
    script=REST_DOOR_LUA,
    libraries=(SHA256_LUA,),
    infer={
        "safe_regex": {"regex": REST_INFER},
        "headers": [{"name": ":method", "string_match": {"exact": "POST"}}],
    },
    # Besides a node that cannot be reached: its gate answering 503 (its Triton is away).
    retry_on="reset,connect-failure,refused-stream,retriable-status-codes",
    grpc=False,
)


@dataclass(eq=False)
class NodeAddress:
    """A node as an edge's view keeps it (`shard_client.routing.Backend`): where its gate
    listens. Envoy makes and watches the connections."""

    node: str
    address: str
    in_flight: int = 0

    @classmethod
    def of(cls, address: str, node: str) -> NodeAddress:
        return cls(node, address)

    def connected(self) -> bool:
        return True


@dataclass(frozen=True, kw_only=True)
class EdgePorts:
    """Where the edge listens: the router's addresses (None: not at all)."""

    plaintext: str | None
    tls: str | None
    mesh: str | None


@dataclass(frozen=True, kw_only=True)
class EdgePolicy:
    """What the router's settings decide for the direct path."""

    trust_domain: str
    anonymous_rps: float
    key_rps: float  # for keys with no rate of their own
    max_attempts: int
    upstream_timeout_s: float
    sds_dir: Path | None  # the certificate's SDS files; None: plaintext to the nodes
    door: Door = GRPC_DOOR


@dataclass(frozen=True, kw_only=True)
class ShardState:
    """The parts of the router's view the edge is built from."""

    table: EndpointTable[Any]
    split: TrafficSplit
    access: ModelAccess
    cacheable: CacheableVersions
    keys: KeyRing


def bootstrap(
    *, node_id: str, xds_socket: Path, max_heap_bytes: int = MAX_HEAP_BYTES
) -> dict[str, Any]:
    """Envoy's start-up configuration: everything else comes over ADS from `xds_socket`."""
    return {
        "node": {"id": node_id, "cluster": "shard-edge"},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}],
                "set_node_on_first_message_only": True,
            },
            "lds_config": ADS,
            "cds_config": ADS,
        },
        "static_resources": {"clusters": [_unix_cluster(XDS_CLUSTER, xds_socket)]},
        "overload_manager": overload_manager(max_heap_bytes),
    }


def _unix_cluster(name: str, socket: Path, *, http2: bool = True) -> dict[str, Any]:
    return static_cluster(
        name, {"pipe": {"path": str(socket)}}, http2=http2, max_requests=1_000_000
    )


def _socket_address(address: str) -> dict[str, Any]:
    host, port = address.rsplit(":", 1)
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


def _is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address.rsplit(":", 1)[0].strip("[]"))
    except ValueError:
        return False
    return True


def _parsed(config: Mapping[str, Any], kind: type[Message]) -> Message:
    message = kind()
    json_format.ParseDict(config, message)
    return message


def _seconds(value: float) -> str:
    return f"{value:.3f}s"


def _token_bucket(rps: float) -> dict[str, Any]:
    """Envoy's bucket for `rps` a second, with two seconds of burst (as the router's buckets):
    whole tokens, refilled at least every 50 ms."""
    interval = max(0.05, 1.0 / rps)
    per_fill = max(1, round(rps * interval))
    return {
        "max_tokens": max(per_fill, math.ceil(rps * 2)),
        "tokens_per_fill": per_fill,
        "fill_interval": _seconds(interval),
    }


def _header_descriptor(header: str, key: str) -> dict[str, Any]:
    return {
        "request_headers": {"header_name": header, "descriptor_key": key, "skip_if_absent": True}
    }


def request_cost(rps: float) -> int:
    """What one request takes from its key's or model's bucket when the key or model may make
    `rps` requests a second: every bucket fills at COST_SCALE a second and holds two seconds'
    worth, so the rate needs no bucket of its own (below 0.5 a second, a request costs more
    than a bucket holds: refused, as by the router's buckets)."""
    return max(1, round(COST_SCALE / rps))


def _local_rate_limit(
    name: str, descriptors: list[dict[str, Any]], rate_limits: list[dict[str, Any]]
) -> dict[str, Any]:
    enabled = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
    config = {
        "@type": f"{TYPES}extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        "stat_prefix": name,
        "rate_limited_as_resource_exhausted": True,
        "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        "filter_enabled": {"runtime_key": f"{name}_enabled", **enabled},
        "filter_enforced": {"runtime_key": f"{name}_enforced", **enabled},
        "max_dynamic_descriptors": MAX_DYNAMIC_BUCKETS,
        "descriptors": descriptors,
        "rate_limits": rate_limits,
    }
    return {"name": f"shard.{name}", "typed_config": config}


def _inference_headers(door: Door) -> list[dict[str, Any]]:
    """The door's inference route match, as header matchers (`:path` among them)."""
    path = door.infer.get("path")
    matcher = {"exact": path} if path else {"safe_regex": door.infer["safe_regex"]}
    return [*door.infer.get("headers", []), {"name": ":path", "string_match": matcher}]


def _anonymous_rate_limit_filter(policy: EdgePolicy) -> dict[str, Any]:
    """Inference without a key, limited per address before anything reads its body (one bucket
    per address, made as it first comes): a client over its rate costs the edge no parsing.
    "Without a key" is without a bearer token shaped like one of ours (no `authorization`, an
    empty one, anything else), so no header gets a caller out of the limit; a key-shaped token
    that is not a working key costs no parsing either (the doors check it first, and leave it
    to the Python service). The gateway's calls on the mesh listener, for its own clients, are
    not limited here: the router limits those by the address the gateway names."""

    def unless(name: str, matcher: dict[str, Any], key: str, value: str) -> dict[str, Any]:
        return {
            "header_value_match": {
                "descriptor_key": key,
                "descriptor_value": value,
                "headers": [
                    {
                        "name": name,
                        "string_match": matcher,
                        "invert_match": True,
                        "treat_missing_header_as_empty": True,
                    }
                ],
            }
        }

    gateway = spiffe_id(policy.trust_domain, "service", "gateway")
    actions = [
        unless("authorization", {"prefix": "bearer shard_", "ignore_case": True}, "caller", "bare"),
        unless("x-forwarded-client-cert", {"contains": f"URI={gateway};"}, "via", "client"),
        unless("x-forwarded-client-cert", {"suffix": f"URI={gateway}"}, "via-end", "client"),
        {
            "header_value_match": {
                "descriptor_key": "call",
                "descriptor_value": "infer",
                "headers": _inference_headers(policy.door),
            }
        },
        {"remote_address": {}},
    ]
    descriptor = {
        "entries": [
            {"key": "caller", "value": "bare"},
            {"key": "via", "value": "client"},
            {"key": "via-end", "value": "client"},
            {"key": "call", "value": "infer"},
            {"key": "remote_address", "value": ""},
        ],
        "token_bucket": _token_bucket(policy.anonymous_rps),
    }
    return _local_rate_limit("edge_anonymous_rate_limit", [descriptor], [{"actions": actions}])


def _rate_limit_filter() -> dict[str, Any]:
    """The direct path's rate limits per key and per model, as the router's
    (`shard_core.limits`): each key, and each model with a rate of its own, a bucket (made as it
    first comes, the least recent forgotten) from which a request takes its `request_cost`,
    which `door.lua` names in a header. The configuration never changes while the edge runs (a
    new one would start every bucket full)."""
    per_value = {
        "max_tokens": 2 * COST_SCALE,
        "tokens_per_fill": COST_SCALE // 20,
        "fill_interval": "0.050s",
    }
    descriptors = [
        {"entries": [{"key": "key", "value": ""}], "token_bucket": per_value},
        {"entries": [{"key": "model", "value": ""}], "token_bucket": per_value},
    ]
    return _local_rate_limit(
        "edge_rate_limit",
        descriptors,
        [
            {
                "actions": [_header_descriptor(KEY_HEADER, "key")],
                "hits_addend": {"format": f"%REQ({KEY_COST_HEADER})%"},
            },
            {
                "actions": [_header_descriptor(MODEL_HEADER, "model")],
                "hits_addend": {"format": f"%REQ({MODEL_COST_HEADER})%"},
            },
        ],
    )


ACCESS_LOG_FORMAT = {
    "time": "%START_TIME%",
    "method": "%REQ(:PATH)%",
    "route": "%UPSTREAM_CLUSTER%",
    "model": f"%DYNAMIC_METADATA({LOG_METADATA}:model)%",
    "version": f"%DYNAMIC_METADATA({LOG_METADATA}:version)%",
    "principal": f"%DYNAMIC_METADATA({LOG_METADATA}:principal)%",
    "node": "%UPSTREAM_PEER_URI_SAN%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "peer": "%DOWNSTREAM_PEER_URI_SAN%",
    "grpc_status": "%GRPC_STATUS_NUMBER%",
    "http_status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
}


def _manager(name: str, *, policy: EdgePolicy, mesh: bool, access_log: Path) -> dict[str, Any]:
    config: dict[str, Any] = {
        "@type": f"{HTTP_TYPE}.HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "AUTO",
        "use_remote_address": True,
        # No client is internal: x-envoy-* headers from anyone are dropped, not obeyed. An
        # empty list would mean Envoy's default (private and loopback addresses are internal),
        # so the list names only the unspecified addresses, which no peer can have.
        "internal_address_config": {
            "unix_sockets": False,
            "cidr_ranges": [
                {"address_prefix": "0.0.0.0", "prefix_len": 32},
                {"address_prefix": "::", "prefix_len": 128},
            ],
        },
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "request_timeout": "0s",
        "stream_idle_timeout": "0s",
        "common_http_protocol_options": {
            "headers_with_underscores_action": "REJECT_REQUEST",
            "idle_timeout": "3600s",
        },
        "http2_protocol_options": {
            "max_concurrent_streams": 1024,
            "initial_stream_window_size": MAX_REQUEST_WINDOW,
            "initial_connection_window_size": MAX_REQUEST_WINDOW,
        },
        "rds": {"route_config_name": ROUTES, "config_source": ADS},
        "http_filters": [
            *([_anonymous_rate_limit_filter(policy)] if policy.anonymous_rps > 0 else []),
            lua_filter(policy.door.script, libraries=(*policy.door.libraries, DOOR_LUA)),
            _rate_limit_filter(),
            ROUTER_FILTER,
        ],
        "access_log": [
            {
                "name": "envoy.access_loggers.file",
                "typed_config": {
                    "@type": f"{TYPES}extensions.access_loggers.file.v3.FileAccessLog",
                    "path": str(access_log),
                    "log_format": {"json_format": ACCESS_LOG_FORMAT},
                },
            }
        ],
    }
    if not policy.door.grpc:
        config["local_reply_config"] = REST_LOCAL_REPLIES
    if mesh:
        # The router trusts the gateway's x-forwarded-for by its certificate: say who called.
        config["forward_client_cert_details"] = "SANITIZE_SET"
        config["set_current_client_cert_details"] = {"uri": True}
    else:
        config["forward_client_cert_details"] = "SANITIZE"
    return config


def _local_reply(status: int, code: str, error: str | None = None) -> dict[str, Any]:
    """How Envoy's own answer of HTTP `status` reads on the REST door: the gRPC `code` beside
    Envoy's message (or `error`)."""
    body: dict[str, Any] = {"error": error or "%LOCAL_REPLY_BODY%", "code": code}
    return {
        "filter": {
            "status_code_filter": {
                "comparison": {
                    "op": "EQ",
                    "value": {"default_value": status, "runtime_key": f"edge_reply_{status}"},
                }
            }
        },
        "body_format_override": {"json_format": body},
    }


# What Envoy answers itself on the REST door (a rate limit, a body too large, no node to reach)
# reads like the gateway's own errors: Triton's {"error": ...} with the shard's code (and, for a
# rate limit, its reason and Retry-After).
REST_LOCAL_REPLIES = {
    "mappers": [
        {
            **_local_reply(
                429, "RESOURCE_EXHAUSTED", "the rate limit of this caller or model is reached"
            ),
            "headers_to_add": [
                {
                    "header": {"key": "Retry-After", "value": "1"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
            "body_format_override": {
                "json_format": {
                    "error": "the rate limit of this caller or model is reached; try again later",
                    "code": "RESOURCE_EXHAUSTED",
                    "reason": "RATE_LIMITED",
                }
            },
        },
        _local_reply(413, "RESOURCE_EXHAUSTED", "the request body is larger than the shard takes"),
        _local_reply(400, "INVALID_ARGUMENT"),
        _local_reply(404, "NOT_FOUND"),
        _local_reply(504, "DEADLINE_EXCEEDED"),
    ],
    "body_format": {"json_format": {"error": "%LOCAL_REPLY_BODY%", "code": "UNAVAILABLE"}},
}


def _listener(
    name: str, address: str, *, policy: EdgePolicy, tls: dict[str, Any] | None, access_log: Path
) -> Message:
    chain: dict[str, Any] = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": _manager(
                    name, policy=policy, mesh=name == "mesh", access_log=access_log
                ),
            }
        ]
    }
    if tls is not None:
        chain["transport_socket"] = tls
        chain["transport_socket_connect_timeout"] = "5s"
    listener = {
        "name": name,
        "address": _socket_address(address),
        "per_connection_buffer_limit_bytes": MAX_REQUEST_BYTES,
        "filter_chains": [chain],
    }
    return _parsed(listener, listener_pb2.Listener)


def listeners(ports: EdgePorts, policy: EdgePolicy, access_log: Path) -> dict[str, Message]:
    found: dict[str, Message] = {}
    if ports.plaintext:
        found["plaintext"] = _listener(
            "plaintext", ports.plaintext, policy=policy, tls=None, access_log=access_log
        )
    if policy.sds_dir is not None:
        if ports.tls:
            found["tls"] = _listener(
                "tls",
                ports.tls,
                policy=policy,
                tls=downstream_tls(policy.sds_dir, callers=None),
                access_log=access_log,
            )
        if ports.mesh:
            # Any workload of the mesh: the router decides what each may do.
            anyone = {"san_type": "URI", "matcher": {"prefix": f"spiffe://{policy.trust_domain}/"}}
            found["mesh"] = _listener(
                "mesh",
                ports.mesh,
                policy=policy,
                tls=downstream_tls(policy.sds_dir, callers=[anyone]),
                access_log=access_log,
            )
    return found


def _version_clusters(name: str, version: str) -> tuple[str, str]:
    """A model version's clusters: least-request, and the sequences'."""
    return f"{MODEL_CLUSTERS}{name}/{version}", f"{SEQUENCE_CLUSTERS}{name}/{version}"


def _direct_versions(state: ShardState) -> dict[str, list[str]]:
    """The models the edge may send straight to a node, with their versions: those with no
    answer verification and no cacheable version (their rules need the router)."""
    found: dict[str, list[str]] = {}
    for name, versions in state.table.models().items():
        if state.access.verify_fraction(name):
            continue
        if any(state.cacheable.ttl(name, version) for version in versions):
            continue
        found[name] = list(versions)
    return found


def _direct_models(state: ShardState, warm: Collection[str] | None) -> dict[str, dict[str, Any]]:
    """The direct models as `door.lua` reads them, with the versions whose clusters are `warm`
    in Envoy (all, for None): a route to a cluster Envoy does not run yet would fail."""
    models: dict[str, dict[str, Any]] = {}
    access = state.access
    for name, all_versions in _direct_versions(state).items():
        versions = [
            version
            for version in all_versions
            if warm is None or set(_version_clusters(name, version)) <= set(warm)
        ]
        if not versions:
            continue
        weights = state.split.weights(name)
        weighted = [(v, weights[v]) for v in versions if weights.get(v, 0) > 0]
        draw: list[list[Any]] = []
        total = 0
        for version, weight in weighted or [(versions[-1], 1)]:
            total += weight
            draw.append([version, total])
        models[f"m/{name}"] = {
            "cluster": f"{MODEL_CLUSTERS}{name}/",
            "sequences": f"{SEQUENCE_CLUSTERS}{name}/",
            "ready": dict.fromkeys(versions, True),
            "draw": draw,
            "public": access.public(name),
            "owner": access.owner(name),
        }
        if access.rate_limit(name) > 0:
            models[f"m/{name}"]["cost"] = request_cost(access.rate_limit(name))
    return models


def _direct_keys(keys: KeyRing, policy: EdgePolicy) -> dict[str, dict[str, Any]]:
    """The keys that work now, as `door.lua` reads them (`k/<key id>`): the SHA-256 of the
    secret (never the secret), who the key stands for and what it may do, when it expires, what
    a request costs it."""
    found: dict[str, dict[str, Any]] = {}
    for key_id, stored in keys.usable().items():
        principal = principal_of(stored.key)
        key = found[f"k/{key_id}"] = {
            "id": key_id,
            "sha256": stored.secret_sha256,
            "principal": principal.id,
            "admin": principal.admin,
            "infer": principal.may(Permission.INFERENCE),
            "expires": stored.key.expire_time.seconds if stored.key.HasField("expire_time") else 0,
        }
        rate = principal.rate_limit_rps or policy.key_rps
        if rate > 0:
            key["cost"] = request_cost(rate)
    return found


def _routes(
    state: ShardState, direct_models: dict[str, dict[str, Any]], policy: EdgePolicy
) -> Message:
    door = policy.door
    # The gRPC door leaves the gateway's calls to the router (which trusts it to name callers).
    proxies = (
        {"proxies": [spiffe_id(policy.trust_domain, "service", "gateway")]} if door.grpc else {}
    )
    infer_match = dict(door.infer)
    direct = {
        "name": "direct",
        "match": {
            **infer_match,
            "headers": [
                *infer_match.get("headers", []),
                {"name": CLUSTER_HEADER, "present_match": True},
            ],
        },
        # All but the sequence's hash key, which Envoy reads after removing these (the node
        # sees in it the sequence id its request carries anyway).
        "request_headers_to_remove": [
            *(name for name in EDGE_HEADERS if name != SEQUENCE_HEADER),
            *PRIVATE_HEADERS,
        ],
        "route": {
            "cluster_header": CLUSTER_HEADER,
            # For the sequence clusters: a sequence's requests hash onto one node.
            "hash_policy": [{"header": {"header_name": SEQUENCE_HEADER}}],
            "timeout": _seconds(policy.upstream_timeout_s),
            # A client's grpc-timeout, when shorter, is its deadline.
            "max_stream_duration": {"grpc_timeout_header_max": _seconds(policy.upstream_timeout_s)},
            "retry_policy": {
                "retry_on": door.retry_on,
                "retriable_status_codes": [503],
                "num_retries": policy.max_attempts - 1,
                "retry_host_predicate": [
                    {
                        "name": "envoy.retry_host_predicates.previous_hosts",
                        "typed_config": {"@type": f"{TYPES}{PREVIOUS_HOSTS}"},
                    }
                ],
                "host_selection_retry_max_attempts": 10,
            },
        },
    }
    infer = {
        "name": "infer",
        "match": infer_match,
        "route": {"cluster": door.service, "timeout": "0s"},
        "metadata": {
            "filter_metadata": {
                LUA_METADATA: {**proxies, **direct_models, **_direct_keys(state.keys, policy)}
            }
        },
    }
    everything_else = {
        "name": door.service,
        "match": {"prefix": "/"},
        "route": {"cluster": door.service, "timeout": "0s"},
        "metadata": {"filter_metadata": {LUA_METADATA: proxies}},
    }
    config = {
        "name": ROUTES,
        "virtual_hosts": [
            {"name": "shard", "domains": ["*"], "routes": [direct, infer, everything_else]}
        ],
    }
    return _parsed(config, route_pb2.RouteConfiguration)


def _model_cluster(name: str, policy: EdgePolicy, *, sequences: bool = False) -> Message:
    """A model version's cluster: least-request over its nodes, or for `sequences`, Maglev
    (a sequence id hashes onto one node, and only a 1/n share of sequences moves when a node
    comes or goes)."""
    cluster: dict[str, Any] = {
        "name": name,
        "type": "EDS",
        "eds_cluster_config": {"eds_config": ADS},
        "connect_timeout": "2s",
        "lb_policy": "MAGLEV" if sequences else "LEAST_REQUEST",
        "typed_extension_protocol_options": http2_upstream(),
        # A node that fails to answer (unreachable, reset, UNAVAILABLE) three times in a row
        # rests; a model's own errors eject nobody (a client could cause those at will).
        "outlier_detection": {
            "consecutive_gateway_failure": 3,
            "enforcing_consecutive_gateway_failure": 100,
            "enforcing_consecutive_5xx": 0,
            "interval": "1s",
            "base_ejection_time": "5s",
            "max_ejection_percent": 50,
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": 100_000,
                    "max_pending_requests": 100_000,
                    "max_requests": 100_000,
                    # Retries in flight are at most a fifth of the requests in flight (and
                    # may be 50): a node that dies under load has all its calls retried, a
                    # general failure does not multiply the load.
                    "retry_budget": {
                        "budget_percent": {"value": 20.0},
                        "min_retry_concurrency": 50,
                    },
                }
            ]
        },
    }
    if policy.sds_dir is not None:
        cluster["transport_socket"] = upstream_mesh_tls(policy.sds_dir)
    return _parsed(cluster, cluster_pb2.Cluster)


def _weight(pending: int) -> int:
    return max(1, FULL_WEIGHT >> min(7, pending.bit_length()))


def _assignment(
    name: str, routes: list[Any], policy: EdgePolicy, *, weighted: bool = True
) -> Message:
    """The nodes of a cluster; `weighted` by their queues (not for a sequence cluster, whose
    hash would move sequences each time a queue changed)."""
    endpoints = [
        {
            "endpoint": {
                "address": _socket_address(route.backend.address),
                "hostname": node_workload(policy.trust_domain, route.node).dns,
            },
            "load_balancing_weight": _weight(route.pending) if weighted else 1,
        }
        for route in sorted(routes, key=lambda r: r.node)
        if _is_ip(route.backend.address)
    ]
    assignment = {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]}
    return _parsed(assignment, endpoint_pb2.ClusterLoadAssignment)


Resources = dict[str, Mapping[str, Message]]


def resources(
    state: ShardState,
    *,
    ports: EdgePorts,
    policy: EdgePolicy,
    service_socket: Path,
    access_log: Path,
    warm: Collection[str] | None = None,
    routed: Collection[str] = (),
) -> Resources:
    """Every resource the edge runs, by xDS type and name, for the view `state`; the door's
    Python service listens on `service_socket`. (`_build` says which clusters the route names.)"""
    built, _ = _build(
        state,
        ports=ports,
        policy=policy,
        service_socket=service_socket,
        access_log=access_log,
        warm=warm,
        routed=routed,
    )
    return built


def _build(
    state: ShardState,
    *,
    ports: EdgePorts,
    policy: EdgePolicy,
    service_socket: Path,
    access_log: Path,
    warm: Collection[str] | None,
    routed: Collection[str],
) -> tuple[Resources, frozenset[str]]:
    """The resources, and the model clusters their route sends requests to.

    Make before break: the route names only versions whose clusters are `warm` (Envoy runs
    them: None for all), and a cluster the route Envoy runs still names (`routed`) stays until
    Envoy runs a route without it."""
    door = policy.door
    service = _unix_cluster(door.service, service_socket, http2=door.grpc)
    clusters: dict[str, Message] = {door.service: _parsed(service, cluster_pb2.Cluster)}
    assignments: dict[str, Message] = {}
    wanted = {
        (name, version)
        for name, versions in _direct_versions(state).items()
        for version in versions
    }
    for cluster in routed:
        _, name, version = cluster.split("/", 2)
        wanted.add((name, version))
    for name, version in sorted(wanted):
        candidates = state.table.candidates(name, version)
        balanced, sequences = _version_clusters(name, version)
        clusters[balanced] = _model_cluster(balanced, policy)
        assignments[balanced] = _assignment(balanced, candidates, policy)
        clusters[sequences] = _model_cluster(sequences, policy, sequences=True)
        assignments[sequences] = _assignment(sequences, candidates, policy, weighted=False)
    direct_models = _direct_models(state, warm)
    named = frozenset(
        cluster
        for key, model in direct_models.items()
        for version in model["ready"]
        for cluster in _version_clusters(key.removeprefix("m/"), version)
    )
    built: Resources = {
        LISTENER: listeners(ports, policy, access_log),
        ROUTE: {ROUTES: _routes(state, direct_models, policy)},
        CLUSTER: clusters,
        ENDPOINT: assignments,
    }
    return built, named


def describe(found: Mapping[str, Mapping[str, Message]]) -> str:
    """The resources as JSON (for logs and `envoy --mode validate`)."""
    return json.dumps(
        {
            type_url.rsplit(".", 1)[-1]: {
                name: json_format.MessageToDict(message) for name, message in by_name.items()
            }
            for type_url, by_name in found.items()
        },
        indent=1,
    )


class Edge:
    """The edge's Envoy and what keeps its configuration current: `follow` rebuilds the
    resources after every change of the view and publishes those that changed."""

    def __init__(
        self,
        *,
        directory: Path,
        state: ShardState,
        ports: EdgePorts,
        policy: EdgePolicy,
        service_socket: Path,
        xds_socket: Path | None = None,
        tls_dir: Path | None,
        node_id: str = "edge",
        temporary: bool = False,
        on_rejected: Callable[[str], None] = lambda _type_url: None,
        on_applied: Callable[[float], None] = lambda _seconds: None,
    ) -> None:
        """With `temporary`, `directory` is removed when the edge stops. `on_rejected(type_url)`
        hears of every configuration Envoy rejects; `on_applied(seconds)`, how long each change
        of the view took to reach Envoy (from the view's change to Envoy's acknowledgement of
        every type). The door's service listens on `service_socket`; serve `ads` (the
        configuration) on `xds_socket` (the same socket unless said)."""
        self.ads = AdsServer(
            on_rejected=lambda type_url, _: on_rejected(type_url),
            on_acknowledged=self.acknowledged,
        )
        self._temporary = temporary
        self._node_id = node_id
        self._on_applied = on_applied
        self._pending_since: float | None = None
        self._state = state
        self._ports = ports
        self._policy = policy
        self._service_socket = service_socket
        self.access_log = directory / "access.log"
        self.envoy = EnvoyProcess(
            f"envoy ({policy.door.service}'s edge)",
            directory,
            bootstrap(node_id=node_id, xds_socket=xds_socket or service_socket),
            tls_dir=tls_dir,
        )
        self._versions = itertools.count(1)
        self._published: dict[str, bytes] = {}
        # Make before break: the model clusters Envoy runs with their endpoints, and those the
        # route it runs names (by the route's version, for each one published).
        self._warm: frozenset[str] = frozenset()
        self._routed: frozenset[str] = frozenset()
        self._routes: dict[str, frozenset[str]] = {}

    def build(self) -> tuple[Resources, frozenset[str]]:
        """The view's resources, and the model clusters their route names."""
        return _build(
            self._state,
            ports=self._ports,
            policy=self._policy,
            service_socket=self._service_socket,
            access_log=self.access_log,
            warm=self._warm,
            routed=self._routed,
        )

    def publish(self, changed_at: float | None = None) -> bool:
        """Publish the view's resources if they changed (at `changed_at`, a monotonic time;
        now if not said); whether they did."""
        built, named = self.build()
        digests = {
            type_url: b"".join(
                name.encode() + b"\0" + message.SerializeToString(deterministic=True)
                for name, message in sorted(by_name.items())
            )
            for type_url, by_name in built.items()
        }
        if digests == self._published:
            return False
        self._published = digests
        self._pending_since = self._pending_since or changed_at or time.monotonic()
        versions = {
            type_url: hashlib.sha256(digest).hexdigest()[:16]
            for type_url, digest in digests.items()
        }
        self._routes = {
            **{v: c for v, c in self._routes.items() if v in self._acknowledged(ROUTE)},
            versions[ROUTE]: named,
        }
        self.ads.publish(
            Snapshot(version=str(next(self._versions)), resources=built, versions=versions)
        )
        return True

    def _acknowledged(self, type_url: str) -> set[str]:
        version = self.ads.acknowledged(self._node_id).get(type_url)
        return {version} if version else set()

    def acknowledged(self, node: str) -> None:
        """What the ADS server calls on each ACK. Once Envoy runs the published clusters and
        their endpoints, they are warm and the route may name them; once it runs a route, the
        clusters that route no longer names may go: either may publish again. Once the edge
        runs everything published, how long after the change (the first unapplied one) is
        reported."""
        if node != self._node_id:
            return
        snapshot = self.ads.snapshot
        acknowledged = self.ads.acknowledged(node)
        warm, routed = self._warm, self._routed
        if all(
            acknowledged.get(type_url) == snapshot.version_of(type_url)
            for type_url in (CLUSTER, ENDPOINT)
        ):
            self._warm = frozenset(snapshot.resources.get(CLUSTER, {}))
        self._routed = self._routes.get(acknowledged.get(ROUTE, ""), self._routed)
        if (warm, routed) != (self._warm, self._routed):
            self.publish()  # only what Envoy runs changes what may be published next
        if self._pending_since is None or not self.applied():
            return
        took = time.monotonic() - self._pending_since
        self._pending_since = None
        self._on_applied(took)
        _log.info("the edge runs the view of %.0f ms ago", took * 1000)

    def applied(self) -> bool:
        """Whether the edge's Envoy runs the last published configuration. A type with no
        resources counts as run: Envoy asks for no endpoints while no cluster takes them, so
        it never acknowledges an empty set."""
        snapshot = self.ads.snapshot
        acknowledged = self.ads.acknowledged(self._node_id)
        return all(
            acknowledged.get(type_url) == snapshot.version_of(type_url)
            for type_url, by_name in snapshot.resources.items()
            if by_name
        )

    async def start(self, *, timeout: float = 30.0) -> None:
        self.publish()
        self._pending_since = None  # the first configuration is no change of the view
        await self.envoy.start(timeout=timeout)

    async def follow(self, changes: ViewChanges, settle_s: float = 0.02) -> None:
        """Publish after each change, a burst of changes at a time."""
        changed_at = None
        while True:
            changed = changes.event
            self.publish(changed_at)
            await changed.wait()
            changed_at = time.monotonic()
            await asyncio.sleep(settle_s)  # the rest of a burst (a node's many endpoints)

    async def run(self, changes: ViewChanges) -> Callable[[], Awaitable[None]]:
        """Start the edge and keep it current (after every change) and running (started again
        if Envoy exits); returns what stops it."""
        await self.start()
        tasks = [
            asyncio.ensure_future(self.follow(changes)),
            asyncio.ensure_future(self.envoy.keep_running()),
        ]
        stats = EnvoyStats(self.envoy)
        REGISTRY.register(stats)

        async def stop() -> None:
            REGISTRY.unregister(stats)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.stop()

        return stop

    def addresses(self) -> dict[str, str]:
        """Where the edge listens, by kind."""
        return {
            kind: address
            for kind, address in (
                ("plaintext, loopback", self._ports.plaintext),
                ("TLS", self._ports.tls),
                ("mutual TLS", self._ports.mesh),
            )
            if address
        }

    def stop(self) -> None:
        self.envoy.stop()
        if self._temporary:
            shutil.rmtree(self.envoy.directory, ignore_errors=True)


def private_directory(wanted: Path | None) -> Path:
    """`wanted`, or a new temporary directory, that only this user may open: where a door's
    Python service listens for its edge alone."""
    directory = wanted or Path(tempfile.mkdtemp(prefix="shard-edge-"))
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    return directory


def edge_of(
    view: ShardView[Any],
    settings: DataPlaneSettings,
    *,
    door: Door,
    ports: EdgePorts,
    trust_domain: str,
    tls_dir: Path | None,
    directory: Path,
    temporary: bool,
    service_socket: Path,
    xds_socket: Path | None = None,
    meter: metrics.Meter,
) -> Edge:
    """The edge of a door's service (the router's, the gateway's) over its view, on `ports`,
    with the metrics of its configuration: NACKs, and how long a change takes to reach Envoy."""
    rejections = meter.create_counter(
        "shard_edge_config_rejections",
        description="Configurations the edge's Envoy rejected (it keeps serving its last good "
        "one), by xDS type.",
    )
    delays = meter.create_histogram(
        "shard_edge_config_delay",
        unit="s",
        description="From a change of the view (a node's lease expiring, a deployment moving) to "
        "the edge's Envoy running it.",
    )
    return Edge(
        directory=directory,
        state=ShardState(
            table=view.table,
            split=view.split,
            access=view.guard.access,
            cacheable=view.cacheable,
            keys=view.guard.ring,
        ),
        ports=ports,
        policy=EdgePolicy(
            trust_domain=trust_domain,
            anonymous_rps=settings.anonymous_rate_limit_rps,
            key_rps=settings.key_rate_limit_rps,
            max_attempts=settings.max_attempts,
            upstream_timeout_s=settings.upstream_timeout_s,
            sds_dir=directory / "sds" if tls_dir else None,
            door=door,
        ),
        service_socket=service_socket,
        xds_socket=xds_socket,
        node_id=f"{door.service}-edge",
        on_rejected=lambda type_url: rejections.add(1, {"type": type_url.rsplit(".", 1)[-1]}),
        on_applied=delays.record,
        tls_dir=tls_dir,
        temporary=temporary,
    )

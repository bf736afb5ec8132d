"""Where each kind of record lives in etcd, relative to the shard prefix. One place, every service.

nodes/{node_id}                                  shard.node.v1.Node, bound to the node lease
endpoints/{model}/{version}/{node_id}            shard.node.v1.ModelEndpoint, same lease
"""

from __future__ import annotations

NODES = "nodes/"
ENDPOINTS = "endpoints/"


def node(node_id: str) -> str:
    return f"{NODES}{node_id}"


def endpoint(model_name: str, model_version: str, node_id: str) -> str:
    return f"{ENDPOINTS}{model_name}/{model_version}/{node_id}"

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


MODELS = "models/"
VERSIONS = "versions/"


def model(model_id: str) -> str:
    return f"{MODELS}{model_id}"


def versions(model_id: str) -> str:
    """The prefix of a model's versions; zero-padding keeps them in numeric order."""
    return f"{VERSIONS}{model_id}/"


def version(model_id: str, version_id: str) -> str:
    return f"{versions(model_id)}{int(version_id):010d}"


DEPLOYMENTS = "deployments/"
API_KEYS = "keys/"
DEPLOYMENT_STATUS = "deployment-status/"
DEPLOYMENT_OF = "deployment-of/"
DECISIONS = "decisions/"
ASSIGNMENTS = "assignments/"
NODE_ADMIN = "node-admin/"
LEADER = "leader/"


def deployment(deployment_id: str) -> str:
    return f"{DEPLOYMENTS}{deployment_id}"


def deployment_status(deployment_id: str) -> str:
    return f"{DEPLOYMENT_STATUS}{deployment_id}"


def decisions(deployment_id: str) -> str:
    return f"{DECISIONS}{deployment_id}/"


def decision(deployment_id: str, sequence: int) -> str:
    return f"{decisions(deployment_id)}{sequence:020d}"


def assignments(node_id: str) -> str:
    return f"{ASSIGNMENTS}{node_id}/"


def assignment(node_id: str, model_name: str) -> str:
    """One replica per model per node: versions of a model share its Triton name."""
    return f"{assignments(node_id)}{model_name}"


def node_admin(node_id: str) -> str:
    return f"{NODE_ADMIN}{node_id}"


def leader(role: str) -> str:
    return f"{LEADER}{role}"


ENROLLED = "enrolled/"
JOIN_TOKENS = "join-tokens/"
NODE_TRANSITIONS = "node-transitions/"


def enrolled(node_id: str) -> str:
    """A node admitted with a join token: its public key. Deleting the node removes it."""
    return f"{ENROLLED}{node_id}"


def join_token(token_id: str) -> str:
    return f"{JOIN_TOKENS}{token_id}"


def node_transitions(node_id: str) -> str:
    return f"{NODE_TRANSITIONS}{node_id}"


def deployment_of(model_id: str) -> str:
    """The one deployment of a model: its id, written with the deployment in one transaction."""
    return f"{DEPLOYMENT_OF}{model_id}"


def api_key(key_id: str) -> str:
    return f"{API_KEYS}{key_id}"


TASKS = "tasks/"
OPEN_TASKS = "open-tasks/"
TASK_CLAIMS = "task-claims/"
TASK_GROUPS = "task-groups/"
TASK_ENDS = "task-ends/"


def task(task_id: str) -> str:
    """A task: shard.task.v1.Task."""
    return f"{TASKS}{task_id}"


def open_task(node_id: str, task_id: str) -> str:
    """A copy of a PENDING or RUNNING task under its provider, written with the task: what the
    provider's session pushes to it and the sweeper walks. Gone once the task ends."""
    return f"{OPEN_TASKS}{node_id}/{task_id}"


def task_claim(task_id: str) -> str:
    """The node running a task, bound to that node's lease: when the node dies, it goes."""
    return f"{TASK_CLAIMS}{task_id}"


def task_group(group: str) -> str:
    """A redundancy group waiting for its verdict: shard.task.v1.TaskGroup."""
    return f"{TASK_GROUPS}{group}"


def task_end(end_time_ms: int, task_id: str) -> str:
    """A finished task, by when it finished: what retention walks, oldest first."""
    return f"{TASK_ENDS}{end_time_ms:015d}/{task_id}"


BLOB_HOLDERS = "blob-holders/"
BLOB_USAGE = "blob-usage/"


def _holder(principal: str) -> str:
    """A principal id as one path segment (node principals are `nodes/{id}`)."""
    return principal.replace("/", ":")


def blob_holder(sha256: str, principal: str) -> str:
    """A principal that stored blob `sha256`: its size and when, what its quota is charged."""
    return f"{BLOB_HOLDERS}{sha256}/{_holder(principal)}"


def blob_usage(principal: str) -> str:
    """The bytes a principal's stored blobs add up to."""
    return f"{BLOB_USAGE}{_holder(principal)}"

"""`tritonclient.grpc.aio`'s client over the whole shard, with no router in the data path.

The client follows the router's view of the shard (its `EndpointService` stream) and sends each
request straight to a node's Triton, balanced as the router balances: the version by the
deployment's traffic weights, the replica by power-of-two-choices on load, sequences pinned to
one replica, outlier ejection, and a retry on another replica when one is unreachable.

    async with InferenceServerClient("router:8001", api_key=secret) as client:
        result = await client.infer("simple", inputs)

Following the view needs an API key with the `inference` permission; the client sees the public
models and the private ones its key may use. Nodes take direct calls only from a caller the
mesh vouches for: the client makes a key pair and has the router get it a short-lived client
certificate from the registry, naming its API key and the models in its view, which it presents
to each node's gate (mutual TLS; it checks each node's certificate too). The router sends a
renewed certificate before this one expires, and a new one when the models in view change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import tritonclient.grpc.aio as triton
from cryptography import x509
from tritonclient.utils import InferenceServerException

from shard.auth.v1 import key_service_pb2
from shard.inference.v1 import endpoint_service_pb2, endpoint_service_pb2_grpc
from shard_client.routing import Balancer, EndpointTable, Plan, TrafficSplit, unknown_model
from shard_core import pki, tls
from shard_core.tls import RETIRE_GRACE_S

_log = logging.getLogger(__name__)

UNAVAILABLE = "StatusCode.UNAVAILABLE"
# The router's answers to a key it does not take: no use retrying.
REFUSED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
# Between attempts to reach the router again, while the last view keeps serving.
RECONNECT_S = (0.2, 5.0)
# tritonclient's message limits; no keepalive pings (Triton answers frequent ones with GOAWAY).
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
)


@dataclass(eq=False, kw_only=True)
class NodeClient:
    """One node's Triton: a tritonclient on a persistent channel, and requests in flight."""

    node: str
    address: str
    client: triton.InferenceServerClient = field(repr=False)
    in_flight: int = 0

    def connected(self) -> bool:
        channel: grpc.aio.Channel = self.client._channel
        return channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY


@dataclass(frozen=True, kw_only=True)
class _Certificate:
    """The client certificate of the moment, as channel credentials."""

    credentials: grpc.ChannelCredentials
    trust_domain: str


class InferenceServerClient:
    """The shard as one Triton, reached node by node. Use as an async context manager, or call
    `connect` first and `close` at the end."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str,
        max_attempts: int = 2,
        ssl: bool = False,
        root_certificates: str | Path | None = None,
    ) -> None:
        """`url` is the router; with `ssl`, its TLS port, trusting `root_certificates` (the
        mesh CA; the system's roots when None). Plaintext only reaches a loopback router."""
        # A path, as tritonclient takes it (a string or a Path).
        trust = tls.trusting(Path(root_certificates) if root_certificates else None)
        self._router = tls.channel(url, trust if ssl else None)
        self._url = url
        self._credentials = (("authorization", f"Bearer {api_key}"),)
        self._key = pki.new_key()
        self._certificate: _Certificate | None = None
        self._table: EndpointTable[NodeClient] = EndpointTable(
            backend_factory=self._open_node, on_backend_removed=self._close_later
        )
        self._split = TrafficSplit()
        self._balancer = Balancer(self._table, self._split, max_attempts=max_attempts)
        self._synced = asyncio.Event()
        self._refused: grpc.aio.AioRpcError | None = None
        self._watching: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> InferenceServerClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self, timeout: float = 10.0) -> None:
        """Subscribe to the router's view and wait for the first snapshot."""
        if self._watching is None:
            self._watching = asyncio.ensure_future(self._watch())
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            raise InferenceServerException(
                msg=f"no view of the shard from the router at {self._url} in {timeout:g} s",
                status=UNAVAILABLE,
            ) from None
        if self._refused is not None:
            raise InferenceServerException(
                msg=f"the router at {self._url} refused the key: {self._refused.details()}",
                status=str(self._refused.code()),
            )

    async def close(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
        self._table.replace_all([])
        for closing in self._closing:
            closing.cancel()  # close at once: the client is done
        await asyncio.gather(*self._closing, return_exceptions=True)
        await self._router.close(None)

    async def _watch(self) -> None:
        """Follow the router's snapshots for as long as the client lives; while the router is
        away, keep routing on the last one."""
        stub = endpoint_service_pb2_grpc.EndpointServiceStub(self._router)
        delay = RECONNECT_S[0]
        while True:
            request = endpoint_service_pb2.WatchEndpointsRequest(
                certificate_request=pki.certificate_request(self._key, None)
            )
            try:
                async for snapshot in stub.WatchEndpoints(request, metadata=self._credentials):
                    if snapshot.HasField("client_certificate"):
                        self._use(snapshot.client_certificate)
                    self._table.replace_all(snapshot.endpoints)
                    self._split.replace_all(
                        {split.model_name: dict(split.weights) for split in snapshot.splits}
                    )
                    self._synced.set()
                    delay = RECONNECT_S[0]
            except grpc.aio.AioRpcError as error:
                if error.code() in REFUSED:
                    self._refused = error
                    self._synced.set()  # wake `connect`, which raises it
                    return
                _log.warning("endpoint view from %s interrupted: %s", self._url, error.details())
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_S[1])

    def _use(self, certificate: key_service_pb2.ClientCertificate) -> None:
        """Present `certificate` from now on: on new connections to every node."""
        leaf = x509.load_pem_x509_certificates(certificate.certificate_chain)[0]
        workload = pki.workload_of(leaf)
        if workload is None:
            _log.warning("the router sent a client certificate that names no workload; ignored")
            return
        self._certificate = _Certificate(
            credentials=grpc.ssl_channel_credentials(
                root_certificates=certificate.trust_bundle,
                private_key=pki.key_pem(self._key),
                certificate_chain=certificate.certificate_chain,
            ),
            trust_domain=workload.trust_domain,
        )
        self._table.reopen()

    def _open_node(self, address: str, node: str) -> NodeClient:
        """A tritonclient for one node: mutual TLS with the client certificate, checking the
        peer is `node`; plaintext (loopback only) in a mesh that issues none."""
        options: list[tuple[str, Any]] = [*CHANNEL_OPTIONS]
        certificate = self._certificate
        if certificate is None:
            tls.require_loopback(address, what="plaintext to a node")
            return NodeClient(
                node=node,
                address=address,
                client=triton.InferenceServerClient(address, channel_args=options),
            )
        expect = pki.node_workload(certificate.trust_domain, node)
        options.append(("grpc.ssl_target_name_override", expect.dns))
        client = triton.InferenceServerClient(
            address, creds=certificate.credentials, channel_args=options
        )
        return NodeClient(node=node, address=address, client=client)

    def _close_later(self, node: NodeClient) -> None:
        """Close a node's client once calls in flight on it have had time to finish (a renewed
        certificate replaces every node's client)."""

        async def close() -> None:
            try:
                await asyncio.sleep(RETIRE_GRACE_S)
            finally:
                await node.client.close()

        task = asyncio.ensure_future(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # -- the tritonclient API ---------------------------------------------------------------

    async def is_server_live(self) -> bool:
        return self._synced.is_set()

    async def is_server_ready(self) -> bool:
        return self._synced.is_set() and self._table.route_count() > 0

    async def is_model_ready(self, model_name: str, model_version: str = "") -> bool:
        return bool(self._table.candidates(model_name, model_version))

    async def get_model_metadata(
        self, model_name: str, model_version: str = "", **kwargs: Any
    ) -> Any:
        return await self._ask_a_replica("get_model_metadata", model_name, model_version, kwargs)

    async def get_model_config(
        self, model_name: str, model_version: str = "", **kwargs: Any
    ) -> Any:
        return await self._ask_a_replica("get_model_config", model_name, model_version, kwargs)

    async def _ask_a_replica(
        self, method: str, model_name: str, model_version: str, kwargs: dict[str, Any]
    ) -> Any:
        plan = self._plan(model_name, model_version)
        ask = getattr(plan.routes[0].backend.client, method)
        return await ask(model_name, plan.version, **kwargs)

    async def infer(  # noqa: PLR0917 (tritonclient's signature, positional arguments included)
        self,
        model_name: str,
        inputs: Sequence[triton.InferInput],
        model_version: str = "",
        outputs: Sequence[triton.InferRequestedOutput] | None = None,
        request_id: str = "",
        sequence_id: int | str = 0,
        sequence_start: bool = False,
        sequence_end: bool = False,
        priority: int = 0,
        timeout: int | None = None,
        client_timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        compression_algorithm: str | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> triton.InferResult:
        """Run inference on a replica of the model, as `tritonclient.grpc.aio` does on one
        Triton. With no `model_version`, the deployment's traffic weights pick it."""
        plan = self._plan(model_name, model_version, str(sequence_id) if sequence_id else "")
        last: InferenceServerException | None = None
        for route in self._balancer.attempts(plan):
            node = route.backend
            node.in_flight += 1
            try:
                result = await node.client.infer(
                    model_name,
                    inputs,
                    model_version=plan.version,
                    outputs=outputs,
                    request_id=request_id,
                    sequence_id=sequence_id,
                    sequence_start=sequence_start,
                    sequence_end=sequence_end,
                    priority=priority,
                    timeout=timeout,
                    client_timeout=client_timeout,
                    headers=headers,
                    compression_algorithm=compression_algorithm,
                    parameters=parameters,
                )
            except InferenceServerException as error:
                if error.status() != UNAVAILABLE:
                    raise
                _log.warning("%s unavailable for %s: %s", route.node, model_name, error.message())
                self._balancer.ejection.failed(node)
                last = error
            else:
                self._balancer.ejection.succeeded(node)
                return result
            finally:
                node.in_flight -= 1
        raise InferenceServerException(
            msg=f"no replica of model '{model_name}' could be reached: "
            f"{last.message() if last else 'the retry budget is spent'}",
            status=UNAVAILABLE,
        )

    def _plan(self, model_name: str, model_version: str, sequence: str = "") -> Plan[NodeClient]:
        plan = self._balancer.plan(model_name, model_version, sequence)
        if not plan.routes:
            raise InferenceServerException(
                msg=unknown_model(model_name, model_version),
                status="StatusCode.NOT_FOUND",
            )
        return plan

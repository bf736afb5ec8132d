"""Redundancy sampling: a share of a model's answers (the owner's `verify_fraction`) checked by
running the same request again on another replica, after the client has its answer.

Canaries catch a node that lies on every request; a node that recognises canaries and lies
only on real traffic is caught here, because a real request re-run elsewhere is
indistinguishable from any other request. Two answers that differ do not say who lied: a third
replica decides, and the replica the other two disagree with is reported (quarantined by the
registry). With no third replica, or three different answers, nobody is judged. Only models
whose answers are deterministic should ask for it: the owner pays for the extra runs.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from enum import StrEnum

import grpc

from shard_client.answers import disagreement
from shard_client.routing import EndpointTable, Route
from shard_inference.backends import NodeChannel

_log = logging.getLogger(__name__)

# Checks running at once; samples beyond that are skipped (counted), never queued.
MAX_IN_FLIGHT = 16
# A node reported is not reported again for this long (its quarantine takes a moment to reach
# this router's view, and checks in flight may catch it again meanwhile).
REPORT_AGAIN_S = 60.0


class Outcome(StrEnum):
    AGREED = "agreed"
    CAUGHT = "caught"  # one replica disagreed with two others: reported
    UNDECIDED = "undecided"  # answers differ, but no majority says who is wrong
    UNCHECKED = "unchecked"  # no other replica, or it did not answer
    SKIPPED = "skipped"  # too many checks in flight


Report = Callable[[str, str], Awaitable[None]]  # (node, reason) -> quarantine it


class Verifier:
    def __init__(
        self,
        table: EndpointTable[NodeChannel],
        *,
        fraction: Callable[[str], float],
        report: Report,
        timeout_s: float,
        on_outcome: Callable[[Outcome], None] = lambda _: None,
    ) -> None:
        self._table = table
        self._fraction = fraction
        self._report = report
        self._timeout_s = timeout_s
        self._on_outcome = on_outcome
        self._checks: set[asyncio.Task[None]] = set()
        self._reported: dict[str, float] = {}  # node -> when it was last reported

    def sample(self, name: str, version: str, request: bytes, answer: bytes, node: str) -> None:
        """Maybe check `node`'s `answer` to `request` (which names the version) in the
        background."""
        fraction = self._fraction(name)
        if fraction <= 0 or random.random() >= fraction:
            return
        if len(self._checks) >= MAX_IN_FLIGHT:
            self._on_outcome(Outcome.SKIPPED)
            return
        task = asyncio.get_running_loop().create_task(
            self._check(name, version, request, answer, node)
        )
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check(
        self, name: str, version: str, request: bytes, answer: bytes, node: str
    ) -> None:
        try:
            outcome = await self._judge(name, version, request, answer, node)
        except Exception:
            _log.exception("checking an answer of %s failed", node)
            return
        self._on_outcome(outcome)

    async def _judge(
        self, name: str, version: str, request: bytes, answer: bytes, node: str
    ) -> Outcome:
        others = [r for r in self._table.candidates(name, version) if r.node != node]
        random.shuffle(others)
        witnesses: list[tuple[str, bytes]] = []
        for route in others:
            second = await self._ask(route, request)
            if second is None:
                continue
            if not witnesses and not disagreement(answer, second):
                return Outcome.AGREED
            witnesses.append((route.node, second))
            if len(witnesses) == 2:
                break
        if not witnesses:
            return Outcome.UNCHECKED
        where = f"{name} v{version}"
        if len(witnesses) == 1:
            _log.warning(
                "%s and %s answer %s differently, and no third replica can say who is wrong",
                node,
                witnesses[0][0],
                where,
            )
            return Outcome.UNDECIDED
        (second_node, second), (_, third) = witnesses
        if not disagreement(second, third):
            liar, wrong = node, disagreement(second, answer)
        elif not disagreement(answer, third):
            liar, wrong = second_node, disagreement(answer, second)
        else:
            _log.warning("three replicas answer %s three ways", where)
            return Outcome.UNDECIDED
        reason = (
            f"REDUNDANCY_MISMATCH: {where}: {wrong} (two other replicas agree on another "
            "answer to the same request)"
        )
        now = asyncio.get_running_loop().time()
        self._reported = {n: t for n, t in self._reported.items() if now - t < REPORT_AGAIN_S}
        if liar not in self._reported:
            self._reported[liar] = now
            _log.warning("reporting %s: %s", liar, reason)
            await self._report(liar, reason)
        return Outcome.CAUGHT

    async def _ask(self, route: Route[NodeChannel], request: bytes) -> bytes | None:
        backend = route.backend
        backend.in_flight += 1
        try:
            answer: bytes = await backend.method("ModelInfer")(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as error:
            _log.info("%s did not answer a check: %s", route.node, error.code().name)
            return None
        finally:
            backend.in_flight -= 1
        return answer

    async def stop(self) -> None:
        for task in self._checks:
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)

"""Redundancy sampling's judgement, against real gRPC servers standing in for node Tritons: a
replica two others disagree with is reported, whether it answered first or was asked to check;
two replicas that disagree, or three that all differ, judge nobody."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from shard.node.v1 import node_pb2
from shard_client.routing import EndpointTable
from shard_inference.backends import NodeChannel
from shard_inference.verification import Outcome, Verifier
from tests.fake_node import Answer, FakeTriton, simple_answer

MODEL = "checked"


def _off_by(amount: int) -> Answer:
    def answer(request: service_pb2.ModelInferRequest) -> service_pb2.ModelInferResponse:
        response = simple_answer(request)
        values = np.frombuffer(response.raw_output_contents[0], dtype=np.int32) + amount
        response.raw_output_contents[0] = values.astype(np.int32).tobytes()
        return response

    return answer


def _request() -> bytes:
    request = service_pb2.ModelInferRequest(model_name=MODEL, model_version="1")
    data = np.arange(4, dtype=np.int32)
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 4])
        request.raw_input_contents.append(data.tobytes())
    return bytes(request.SerializeToString())


@contextlib.asynccontextmanager
async def _replicas(
    answers: Sequence[Answer],
) -> AsyncIterator[tuple[EndpointTable[NodeChannel], list[FakeTriton]]]:
    """Nodes n0, n1, … serving MODEL v1, each with its answer."""
    table: EndpointTable[NodeChannel] = EndpointTable(
        backend_factory=NodeChannel.opener(None, "shard.local")
    )
    async with contextlib.AsyncExitStack() as stack:
        tritons = [await stack.enter_async_context(FakeTriton(a)) for a in answers]
        table.replace_all(
            node_pb2.ModelEndpoint(
                model_name=MODEL, model_version="1", node=f"n{i}", inference_address=t.address
            )
            for i, t in enumerate(tritons)
        )
        try:
            yield table, tritons
        finally:
            for route in table.any_routes():
                await route.backend.channel.close(None)


async def _verdict(
    answers: Sequence[Answer], first: Callable[[service_pb2.ModelInferRequest], object]
) -> tuple[list[Outcome], list[tuple[str, str]]]:
    """Have n0's answer (from `first`) checked; the outcomes and the reports."""
    outcomes: list[Outcome] = []
    reports: list[tuple[str, str]] = []
    judged = asyncio.Event()

    def outcome(result: Outcome) -> None:
        outcomes.append(result)
        judged.set()

    async def report(node: str, reason: str) -> None:
        reports.append((node, reason))

    async with _replicas(answers) as (table, _):
        verifier = Verifier(
            table, fraction=lambda _: 1.0, report=report, timeout_s=10, on_outcome=outcome
        )
        request = _request()
        answer = first(service_pb2.ModelInferRequest.FromString(request))
        assert isinstance(answer, service_pb2.ModelInferResponse)
        verifier.sample(MODEL, "1", request, answer.SerializeToString(), "n0")
        await asyncio.wait_for(judged.wait(), 30)
        await verifier.stop()
    return outcomes, reports


async def test_an_answer_two_replicas_agree_with_is_left_alone() -> None:
    outcomes, reports = await _verdict([simple_answer] * 3, simple_answer)
    assert (outcomes, reports) == ([Outcome.AGREED], [])


async def test_a_wrong_first_answer_is_reported() -> None:
    outcomes, reports = await _verdict([_off_by(1), simple_answer, simple_answer], _off_by(1))
    assert outcomes == [Outcome.CAUGHT]
    assert [node for node, _ in reports] == ["n0"]
    assert reports[0][1].startswith("REDUNDANCY_MISMATCH: checked v1: output OUTPUT0")


async def test_a_replica_that_lies_when_asked_to_check_is_reported() -> None:
    # n0 answered right; whichever of n1 and n2 is asked first, the liar n1 is the odd one out.
    for _ in range(4):
        outcomes, reports = await _verdict(
            [simple_answer, _off_by(1), simple_answer], simple_answer
        )
        assert outcomes in ([Outcome.AGREED], [Outcome.CAUGHT])
        assert [node for node, _ in reports] == (["n1"] if outcomes == [Outcome.CAUGHT] else [])


@pytest.mark.parametrize(
    "answers",
    [
        pytest.param([_off_by(1), simple_answer], id="two-replicas"),
        pytest.param([_off_by(1), simple_answer, _off_by(2)], id="three-ways"),
    ],
)
async def test_answers_without_a_majority_judge_nobody(answers: list[Answer]) -> None:
    outcomes, reports = await _verdict(answers, answers[0])
    assert (outcomes, reports) == ([Outcome.UNDECIDED], [])


async def test_an_answer_with_no_other_replica_is_unchecked() -> None:
    outcomes, reports = await _verdict([simple_answer], simple_answer)
    assert (outcomes, reports) == ([Outcome.UNCHECKED], [])

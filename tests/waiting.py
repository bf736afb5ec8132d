"""Waiting for a condition in a test: poll it until it holds, with a deadline a loaded CI
machine meets, and fail saying what never happened."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

Check = Callable[[], bool] | Callable[[], Awaitable[bool]]


async def until(check: Check, failure: str, *, timeout: float = 60, every: float = 0.1) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        held = check()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        assert asyncio.get_running_loop().time() < deadline, failure
        await asyncio.sleep(every)

"""Running the core's steps (engine/disk/steps.py) with trio: each operation a step yields is awaited."""

from __future__ import annotations

from typing import TypeVar

from ..disk.steps import Step

T = TypeVar("T")


async def drive(step: Step[T]) -> T:
    """Run ``step`` to its end, awaiting each operation it yields; errors are thrown back into it."""
    try:
        op = step.send(None)
        while True:
            try:
                result = await op[0](*op[1:])
            except BaseException as exc:  # thrown back so the step's own clean-up (locks) runs
                op = step.throw(exc)
            else:
                op = step.send(result)
    except StopIteration as stop:
        value: T = stop.value
        return value

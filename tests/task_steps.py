"""Counting the steps one Trio task takes (a step ends at each of its yields)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import trio


class TaskSteps(trio.abc.Instrument):
    """The steps ``task`` started while installed, in :attr:`count`."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.count = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.count += 1


@contextmanager
def counting_steps(task: trio.lowlevel.Task | None = None) -> Iterator[TaskSteps]:
    """Count the steps of ``task`` (the calling one by default) within the block."""
    steps = TaskSteps(task or trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        yield steps
    finally:
        trio.lowlevel.remove_instrument(steps)

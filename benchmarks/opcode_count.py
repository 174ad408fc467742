"""Count the Python instructions a run executes, by code object and offset (the opcode
scripts' counter: ``fanout_opcodes.py``, ``fanout_drain.py --lines``, ``attr_forms.py``).

Python 3.12+: ``sys.monitoring``'s INSTRUCTION events. Python 3.11: ``sys.settrace`` with
``f_trace_opcodes``, each frame asking in its "call" event. The tracer missed runs on
3.12+: it emits no opcode events to a tracer that asks for them only in its "call"
events (the scripts' frame asking before ``settrace`` worked around that), and 3.13
still leaves out a code object's first run (a function run once in the counted run, the
first call of each other one). ``sys.monitoring`` sees every instruction of every run.
"""

from __future__ import annotations

import collections
import sys
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

#: executions of each instruction, by (code, offset)
Hits = collections.Counter[tuple[CodeType, int]]


def _everything(code: CodeType) -> bool:
    return True


class InstructionCounter:
    """``start()`` ... ``stop()`` (or a ``with`` block): ``hits`` counts each instruction
    of the code objects ``wanted`` accepts (once asked, per code object) run between."""

    def __init__(self, wanted: Callable[[CodeType], bool] = _everything) -> None:
        self.hits: Hits = collections.Counter()
        self.wanted = wanted
        self._tool: int | None = None

    def start(self) -> None:
        monitoring = getattr(sys, "monitoring", None)
        if monitoring is None:
            sys.settrace(self._on_call)
            return
        tool = next(i for i in range(6) if monitoring.get_tool(i) is None)
        monitoring.use_tool_id(tool, "nexus_trio opcode count")
        hits, wanted, disable = self.hits, self.wanted, monitoring.DISABLE

        def on_instruction(code: CodeType, offset: int) -> Any:
            if wanted(code):
                hits[code, offset] += 1
                return None
            return disable  # (this instruction of this code only: each asks once)

        monitoring.register_callback(tool, monitoring.events.INSTRUCTION, on_instruction)
        monitoring.set_events(tool, monitoring.events.INSTRUCTION)
        self._tool = tool

    def stop(self) -> None:
        tool, self._tool = self._tool, None
        if tool is None:
            sys.settrace(None)
            return
        monitoring = sys.monitoring
        monitoring.set_events(tool, 0)
        monitoring.register_callback(tool, monitoring.events.INSTRUCTION, None)
        monitoring.restart_events()  # (what DISABLE turned off, for a later count)
        monitoring.free_tool_id(tool)

    def __enter__(self) -> InstructionCounter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _on_call(self, frame: FrameType, event: str, arg: Any) -> Any:
        code = frame.f_code
        if not self.wanted(code):
            return None
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        hits = self.hits

        def on_opcode(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "opcode":
                hits[code, frame.f_lasti] += 1
            return on_opcode

        return on_opcode


def by_code(hits: Hits) -> collections.Counter[CodeType]:
    """The instructions run by each code object."""
    total: collections.Counter[CodeType] = collections.Counter()
    for (code, _), n in hits.items():
        total[code] += n
    return total


def line_of(code: CodeType, offset: int) -> int:
    """The source line of the instruction at ``offset`` (0 for none), as ``f_lineno``."""
    positions = _LINES.get(code)
    if positions is None:
        positions = _LINES[code] = [p[0] or 0 for p in code.co_positions()]
    return positions[offset // 2]


_LINES: dict[CodeType, list[int]] = {}

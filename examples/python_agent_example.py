"""A calculator agent in Python that runs as a child process of a nexus_trio kernel.

Send it a Command (or Query) with ``{"operation": "add", "a": 40, "b": 2}`` and it answers
``{"result": 42}``. Operations: add, subtract, multiply, divide, power. Problems are answered
with a specific payload ``{"error": <text>, "code": <code>[, "field": <name>]}``; codes:
``invalid_payload``, ``unknown_operation``, ``operand_missing``, ``operand_not_numeric``,
``division_by_zero``, ``overflow``, ``domain_error``. Events are ignored (answered with null).

Run it under the kernel with ``nexus run --spawn "python3 examples/python_agent_example.py"``,
or by hand: ``python3 examples/python_agent_example.py`` and type frames (see docs/protocol.md).
It needs only Python 3.9+: when nexus_trio is not installed it loads the bridge module from
``nexus_trio/bridges/python.py`` next to this checkout.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

try:
    from nexus_trio.bridges.python import NexusAgent
except ImportError:  # not installed: load the stdlib-only bridge file from this checkout
    _BRIDGE = Path(__file__).resolve().parent.parent / "nexus_trio" / "bridges" / "python.py"
    _spec = importlib.util.spec_from_file_location("nexus_bridge_python", _BRIDGE)
    if _spec is None or _spec.loader is None:
        raise ImportError(f"cannot load the Nexus Python bridge from {_BRIDGE}") from None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = _module
    _spec.loader.exec_module(_module)
    NexusAgent = _module.NexusAgent  # type: ignore[misc]

OPERATIONS = ("add", "subtract", "multiply", "divide", "power")

#: Results beyond the largest double are refused: JSON readers in other languages (and the
#: kernel's peers) cannot represent them, and computing them can take unbounded time.
MAX_MAGNITUDE = sys.float_info.max


class CalculationError(Exception):
    """A problem with the request, answered as an error payload (not a failed message)."""

    def __init__(self, code: str, text: str, field: str | None = None) -> None:
        super().__init__(text)
        self.code = code
        self.field = field

    def payload(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"error": str(self), "code": self.code}
        if self.field is not None:
            answer["field"] = self.field
        return answer


def _operand(payload: dict[str, Any], field: str) -> int | float:
    if field not in payload:
        raise CalculationError("operand_missing", f"operand {field!r} is missing", field)
    value = payload[field]
    # bool is an int subclass, but true + 1 is not arithmetic anyone means.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalculationError(
            "operand_not_numeric",
            f"operand {field!r} must be a number, got {type(value).__name__} {value!r}",
            field,
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculationError(
            "operand_not_numeric", f"operand {field!r} must be finite, got {value!r}", field
        )
    return value


def _power(a: int | float, b: int | float) -> int | float:
    if a == 0 and b < 0:
        raise CalculationError("division_by_zero", "zero cannot be raised to a negative power")
    if isinstance(a, int) and isinstance(b, int) and b >= 0:
        # Estimate the size first: 10 ** 10_000_000 would be exact but take seconds to build.
        if abs(a) > 1 and b * math.log10(abs(a)) > math.log10(MAX_MAGNITUDE):
            raise CalculationError("overflow", f"power({a}, {b}) is too large")
        exact: int = a**b  # int ** non-negative int is an int (typeshed says Any)
        return exact
    try:
        return math.pow(a, b)
    except OverflowError:
        raise CalculationError("overflow", f"power({a}, {b}) is too large") from None
    except ValueError:
        raise CalculationError(
            "domain_error", f"power({a}, {b}) is not a real number", "b"
        ) from None


def calculate(payload: Any) -> dict[str, Any]:
    """Evaluate one request; raises :class:`CalculationError` for a bad one."""
    if not isinstance(payload, dict):
        raise CalculationError(
            "invalid_payload", f"payload must be an object, got {type(payload).__name__}"
        )
    operation = payload.get("operation")
    if operation not in OPERATIONS:
        raise CalculationError(
            "unknown_operation",
            f"unknown operation {operation!r} (expected one of {', '.join(OPERATIONS)})",
            "operation",
        )
    a, b = _operand(payload, "a"), _operand(payload, "b")
    result: int | float
    try:
        if operation == "add":
            result = a + b
        elif operation == "subtract":
            result = a - b
        elif operation == "multiply":
            result = a * b
        elif operation == "divide":
            if b == 0:
                raise CalculationError("division_by_zero", "division by zero", "b")
            result = a / b
        else:
            result = _power(a, b)
    except OverflowError:
        raise CalculationError("overflow", f"{operation} overflowed") from None
    if abs(result) > MAX_MAGNITUDE or (isinstance(result, float) and not math.isfinite(result)):
        raise CalculationError("overflow", f"the result of {operation} is too large")
    return {"result": result}


class CalculatorAgent(NexusAgent):
    """Answers arithmetic Commands and Queries; counts what it computed."""

    default_name = "calculator"

    def on_start(self) -> None:
        self.computed = 0
        self.log(f"calculator {self.name} ready (protocol {self.protocol})")

    def handle_message(self, message: dict[str, Any]) -> Any:
        if message.get("kind") not in ("Command", "Query"):
            return None
        try:
            answer = calculate(message.get("payload"))
        except CalculationError as exc:
            return exc.payload()
        self.computed += 1
        return answer

    def on_stop(self) -> None:
        self.log(f"calculator {self.name} stopping after {self.computed} calculations")


if __name__ == "__main__":
    sys.exit(CalculatorAgent().run_agent())

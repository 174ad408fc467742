"""An agent on a bridge that behaves exactly as the original Nexus Python bridge did.

Stdlib only and independent of our bridges: it re-creates the original's wire behaviour
so the kernel can be tested against it. Protocol 1 (``register`` has only ``id`` and
``name``); messages are read with asyncio from stdin; a handler that returns ``None``
writes **no frame at all**; any other result is written as a ``response`` without ``id``
or ``reply_to``, whose ``conversation_id`` and ``trace_id`` are those of the message when
they are set; a handler exception becomes a response ``{"error": text}``; unknown frame
types are ignored; ``shutdown`` or end of input stops it.

The agent counts: payload ``{"op": "add", "n": N}`` adds N and answers nothing;
``{"op": "total"}`` answers ``{"total": T}``; ``{"op": "echo", "value": V}`` answers V
(to a tell too); ``{"op": "trace"}`` answers the message's trace_id; ``{"op": "hang"}``
blocks. Events are counted in ``events`` and never answered.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class CounterAgent:
    def __init__(self, name: str) -> None:
        self.name = name
        self.id = str(uuid.uuid4())
        self.total = 0
        self.events = 0

    async def handle_message(self, message: dict[str, Any]) -> Any:
        if message["kind"] == "Event":
            self.events += 1
            return None
        payload = message["payload"]
        op = payload.get("op")
        if op == "add":
            self.total += payload["n"]
            return None
        if op == "total":
            return {"total": self.total, "events": self.events}
        if op == "echo":
            return payload["value"]
        if op == "trace":
            return {"trace_id": message.get("trace_id")}
        if op == "hang":
            time.sleep(3600)
        raise ValueError(f"unknown op {op!r}")


async def serve(agent: CounterAgent) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def write(kind: str, payload: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps({"type": kind, "payload": payload}) + "\n")
        sys.stdout.flush()

    write("register", {"id": agent.id, "name": agent.name})
    while True:
        line = await reader.readline()
        if not line:
            return
        frame = json.loads(line)
        if frame.get("type") == "shutdown":
            return
        if frame.get("type") != "message":
            continue
        message = frame["payload"]
        message["timestamp"]  # the original required it (KeyError otherwise)
        try:
            result = await agent.handle_message(message)
        except Exception as exc:
            result = {"error": str(exc)}
        if result is None:
            continue  # the original wrote nothing for None
        response: dict[str, Any] = {
            "from": agent.id,
            "to": message["from"],
            "kind": "Response",
            "payload": result,
            "timestamp": now(),
        }
        for field in ("conversation_id", "trace_id"):
            if message.get(field):
                response[field] = message[field]
        write("response", response)


if __name__ == "__main__":
    asyncio.run(serve(CounterAgent(sys.argv[1] if len(sys.argv) > 1 else "counter")))

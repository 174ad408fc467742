#!/usr/bin/env python3
"""A Python agent written for the original Nexus bridge API, running unchanged on ours.

This is how the original README and article wrote an agent: subclass ``NexusAgent`` from
the ``nexus_bridge`` module, give it a name, write ``async def handle_message(self,
message)`` that reads ``message.kind`` and ``message.payload``, and call
``run_agent(agent)``. It keeps a word count: a Command ``{"text": "..."}`` adds the words
of the text and answers the count of that text; a Query answers the totals; an Event is
counted and answered with nothing (``None``).

Run it under the kernel: ``nexus run --spawn "python3 examples/original_python_agent.py"``.
"""

import os
import sys

# As in the original: put the bridge directory on the path (here, the one in nexus_trio).
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "nexus_trio", "bridges"))

from nexus_bridge import Message, MessageKind, NexusAgent, run_agent


class WordCountAgent(NexusAgent):
    """Counts the words of the texts it is sent."""

    def __init__(self):
        super().__init__("PythonWordCounter")
        self.words = 0
        self.texts = 0
        self.events = 0

    async def handle_message(self, message: Message):
        payload = message.payload
        if message.kind == MessageKind.EVENT.value:
            self.events += 1
            return None
        if message.kind == MessageKind.QUERY.value:
            return {"words": self.words, "texts": self.texts, "events": self.events}
        if message.kind == MessageKind.COMMAND.value:
            text = payload.get("text") if isinstance(payload, dict) else None
            if not isinstance(text, str):
                return {"error": "send a Command with a 'text' string", "agent": self.name}
            count = len(text.split())
            self.words += count
            self.texts += 1
            return {"words": count, "agent": self.name}
        return None

    async def on_start(self):
        print(f"Word counter '{self.name}' started (ID: {self.id})", file=sys.stderr)

    async def on_stop(self):
        print(f"Word counter '{self.name}' stopped after {self.texts} texts", file=sys.stderr)


if __name__ == "__main__":
    agent = WordCountAgent()
    run_agent(agent)

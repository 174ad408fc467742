"""Dead letters: where every accepted message that was not handled ends up.

The kernel's conservation law is ``accepted == handled + dead_lettered + in_flight``:
a message the kernel accepted is either handled by its recipient or recorded here with
a :class:`DeadLetterReason`, counted, logged and published on the dead-letter stream.
"""

from __future__ import annotations

import enum
import uuid
from typing import final

import attrs

from ._message import Address, Message


class DeadLetterReason(enum.Enum):
    """Why a message was not handled."""

    #: the recipient does not exist (a routed or returned message)
    NO_SUCH_AGENT = "no_such_agent"
    #: the recipient's mailbox stayed full past the send deadline, or until the agent
    #: that routed the message was stopped (routed message)
    MAILBOX_FULL = "mailbox_full"
    #: evicted or refused by a ``drop_newest``/``drop_oldest`` overflow policy
    MAILBOX_OVERFLOW = "mailbox_overflow"
    #: the handler raised
    HANDLER_ERROR = "handler_error"
    #: the handler ran past ``handle_timeout`` and was cancelled
    HANDLER_TIMEOUT = "handler_timeout"
    #: the requester stopped waiting; the handler was cancelled or never started
    REQUEST_TIMEOUT = "request_timeout"
    #: a reply arrived after its request had timed out
    LATE_REPLY = "late_reply"
    #: a reply to a sender that is neither an agent nor a pending request
    UNROUTABLE_REPLY = "unroutable_reply"
    #: the recipient was stopped with messages still queued
    AGENT_STOPPED = "agent_stopped"
    #: the kernel shut down before the message was handled
    SHUTDOWN = "shutdown"
    #: an external agent sent a frame that could not be used
    MALFORMED = "malformed"
    #: the recipient is not local and the transport to remote kernels could not take it
    TRANSPORT_UNAVAILABLE = "transport_unavailable"
    #: the payload could not be encoded for the recipient (e.g. a process agent's JSON)
    UNSERIALISABLE = "unserialisable"


@final
@attrs.frozen
class DeadLetter:
    """One message that was not handled, and why."""

    message: Message
    reason: DeadLetterReason
    #: the agent the message was meant for (its id if known, else the address used)
    recipient: Address
    #: the handler's exception, for ``handler_error``
    error: BaseException | None = None
    detail: str = ""

    @property
    def message_id(self) -> uuid.UUID:
        return self.message.id

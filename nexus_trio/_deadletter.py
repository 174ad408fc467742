"""Dead letters: where every accepted message that was not handled ends up.

The kernel's conservation law is ``accepted == handled + dead_lettered + in_flight``:
a message the kernel accepted is either handled by its recipient or recorded here with
a :class:`DeadLetterReason`, counted, logged and published on the dead-letter stream.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import enum
import uuid
from typing import final

import attrs

from ._errors import FramelessTraceback, traceback_text, without_frames
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
    #: the handler's exception, for ``handler_error``; in ``recent_dead_letters()`` a copy
    #: that holds no frames (see ``without_frames``): the same class, ``args``,
    #: attributes, notes, cause and context, no ``__traceback__``
    error: BaseException | None = None
    detail: str = ""
    #: the error's traceback without its frames, in ``recent_dead_letters()`` (see
    #: ``traceback``)
    frameless_traceback: FramelessTraceback | None = attrs.field(default=None, repr=False, eq=False)

    @property
    def message_id(self) -> uuid.UUID:
        return self.message.id

    @property
    def traceback(self) -> str:
        """``error`` formatted as a traceback (at most 8,192 characters: its first lines
        and its end), "" for no error or one never raised; formatted when read."""
        if self.frameless_traceback is not None:
            return self.frameless_traceback.text()
        if self.error is None or self.error.__traceback__ is None:
            return ""
        return traceback_text(self.error)

    def without_frames(self) -> DeadLetter:
        """This dead letter as the ring of recent ones keeps it: its error's traceback
        (and with it the frames and locals of the handler that raised) dropped, where it
        passed kept for ``traceback``."""
        if self.error is None:
            return self
        return DeadLetter.kept(self.message, self.reason, self.recipient, self.error, self.detail)

    @staticmethod
    def kept(
        message: Message,
        reason: DeadLetterReason,
        recipient: Address,
        error: BaseException,
        detail: str = "",
    ) -> DeadLetter:
        """The dead letter of ``error`` as the ring of recent ones keeps it (see
        ``without_frames``), built at once: what a dead letter nobody subscribes to is.
        (Built directly, not by attrs.evolve, which looks every field up by name: this
        runs once per restart of a failing agent.)"""
        copy, frameless = without_frames(error)
        return DeadLetter(message, reason, recipient, copy, detail, frameless)

"""Node batches: many frames for one destination kernel in one NATS message, with credit.

Between two nexus_trio kernels, tells do not go one NATS message each: they are frames
in the batch of their destination *process* (one :class:`NodeLink` per stream, i.e.
destination node and its id prefix), which leaves as one NATS message on
``<prefix>.node.<node>.batch`` when it fills (``batch_frames`` / ``batch_bytes``, never
past the server's ``max_payload``) or on the next scheduler tick. A batch is binary,
length-prefixed, and checked before any frame of it is used::

    batch  = MAGIC "NXB2" | sender id prefix u64 | sender session u64
             | destination id prefix u64 | first number u64 | numbered count u32
             | node name length u16 | node name | frame*
    frame  = length u32 (of kind + body) | kind u8 | body

Frame kinds: ``TELL`` (a message in the binary form of ``_wire.encode_tell``, numbered;
in a batch "NXB1" of the version before, the compact JSON form),
``CANCEL`` (a query id, 16 bytes, then the address it was sent to: ``0`` + 16 id bytes or
``1`` + a UTF-8 name) and ``CREDIT`` (u64 session, u64 count: how many tells of the
stream the other way, from that session, the sender of this batch consumed so far).
The *session* is random per joined :class:`Cluster`: a kernel that leaves and joins
again in the same process (same id prefix) starts new streams. Numbers: the tells of a
batch carry the consecutive numbers ``first .. first + count - 1`` of their stream,
given when the batch is sealed, so the sequence checks of ``_sequence`` count every
tell NATS loses.

Credit is the per-node backpressure: a link holds at most ``window`` tells that the
destination has not yet consumed (taken into a mailbox, refused, or counted lost); a
``send`` past that waits for credit within the send deadline.

PYTEST_DONT_REWRITE: under pytest this module runs as written (see nexus_trio.testing).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from typing import Any, Final, final

import trio

from .._errors import MessageDecodeError
from .._message import Address, Message
from . import _wire as wire
from ._wire import NODE_NAME_MAX, is_node_name

MAGIC: Final = b"NXB2"
#: the columnar version: NXB2's head and frames, and a frame kind of its own (``ROWS``)
#: for a block of common tells; written only to a node whose membership record lists it
MAGIC_COLUMNAR: Final = b"NXB3"
COLUMNAR: Final = "NXB3"
#: the batch versions this node reads, as its membership record lists them (a record
#: without the list is a node of an earlier version: NXB2 only)
READ_VERSIONS: tuple[str, ...] | None = ("NXB2", COLUMNAR)
#: NXB1, the version before binary tells, is still read (its tells are format 1 JSON,
#: which the decoder of a tell reads too); a node of that version refuses NXB2 batches
#: as a whole, counted and logged, instead of failing on each tell
_READ_MAGICS: Final = frozenset((b"NXB1", MAGIC, MAGIC_COLUMNAR))
_HEAD: Final = struct.Struct(">4sQQQQIH")
_FRAME: Final = struct.Struct(">IB")
_CREDIT: Final = struct.Struct(">QQ")
#: the fixed part of a batch, before the node name
HEAD_SIZE: Final = _HEAD.size
#: what every frame costs on top of its body
FRAME_OVERHEAD: Final = _FRAME.size
#: ``frame_head(length, kind)``: a frame's length (of kind and body) and kind, packed
frame_head: Final = _FRAME.pack

TELL: Final = 1
CANCEL: Final = 2
CREDIT: Final = 3
#: a block of rows (NXB3 only): see :func:`close_rows`
ROWS: Final = 4
_KINDS: Final = frozenset((TELL, CANCEL, CREDIT))

#: what a row adds to its block besides its payload's JSON (the row, a comma)
ROW_COST: Final = wire.ROW_SIZE + 1
#: what a block costs once: its frame's length and kind, its head, the array's brackets
BLOCK_COST: Final = FRAME_OVERHEAD + wire.BLOCK_HEAD_SIZE + 2
#: the most addresses one block's table holds (an index is a u16)
TABLE_MAX: Final = 0xFFFF
#: the creation times (nanoseconds) a row carries: its microseconds in 64 bits
NS_MIN: Final = -(1 << 63) * 1000
NS_MAX: Final = (1 << 63) * 1000


class BatchError(ValueError):
    """A batch that is not well formed: the text says what and where."""


@final
class BatchHead:
    """What the fixed part of a batch says."""

    __slots__ = ("columnar", "dest_prefix", "first", "node", "numbered", "sender_prefix", "session")

    def __init__(
        self,
        node: str,
        sender_prefix: int,
        session: int,
        dest_prefix: int,
        first: int,
        numbered: int,
        columnar: bool = False,
    ) -> None:
        #: an NXB3 batch (see :func:`read_columnar`)
        self.columnar = columnar
        self.node = node
        self.sender_prefix = sender_prefix
        self.session = session
        self.dest_prefix = dest_prefix
        self.first = first
        self.numbered = numbered


def parse_head(data: bytes) -> tuple[BatchHead, int]:
    """The head of batch ``data`` and the offset of its first frame; BatchError if bad."""
    if len(data) < HEAD_SIZE:
        raise BatchError(f"batch of {len(data)} bytes is shorter than its {HEAD_SIZE}-byte head")
    magic, sender_prefix, session, dest_prefix, first, numbered, name_len = _HEAD.unpack_from(data)
    if magic not in _READ_MAGICS:
        raise BatchError(f"batch starts with {magic!r}, not {MAGIC!r} or {MAGIC_COLUMNAR!r}")
    end = HEAD_SIZE + name_len
    if name_len == 0 or end > len(data):
        raise BatchError(f"batch node name of {name_len} bytes does not fit")
    try:
        node = data[HEAD_SIZE:end].decode()
    except UnicodeDecodeError as exc:
        raise BatchError(f"batch node name is not UTF-8: {exc}") from None
    if not is_node_name(node):
        # the receiver returns credit on a subject holding the name (see _cluster)
        raise BatchError(
            f"batch node name {node[:40]!r} ({len(node)} characters) is no node name:"
            f" letters, digits, '-' or '_', at most {NODE_NAME_MAX}"
        )
    if first < 1:
        raise BatchError(f"batch first number {first} (numbers start at 1)")
    head = BatchHead(
        node, sender_prefix, session, dest_prefix, first, numbered, magic == MAGIC_COLUMNAR
    )
    return head, end


def read_head(data: bytes) -> tuple[BatchHead, int]:
    """:func:`parse_head` of a batch received whole: also BatchError if its head numbers
    more tells than its frames' bytes could hold (``FRAME_OVERHEAD`` a frame at least).
    Refused before its numbers are taken: a head's count is what a malformed batch is
    counted as (``malformed``), so it may not claim more than the batch could carry."""
    head, end = parse_head(data)
    room = (len(data) - end) // FRAME_OVERHEAD
    if head.numbered > room:
        raise BatchError(
            f"batch head says {head.numbered} tells, its {len(data) - end} bytes of frames"
            f" hold at most {room}"
        )
    return head, end


def split_frames(
    data: bytes, offset: int, numbered: int, blocks: list[tuple[int, int, int]] | None = None
) -> tuple[list[bytes], list[tuple[int, bytes]]]:
    """The batch's frames from ``offset``: the bodies of its tells in order, and its
    control frames (``CANCEL``, ``CREDIT``) as ``(kind, body)`` in order. Checked as a
    whole first (a hostile or truncated batch is refused before any frame is used):
    lengths that run past the end, unknown kinds, or a number of tells other than the
    head's raise BatchError.

    Tells and control frames come apart because nothing orders one against the other (a
    query never travels in a batch, so a cancel concerns no tell of it, and credit is for
    the stream the other way): a tell costs no tuple here and no kind test later.

    ``blocks`` (an NXB3 batch, see :func:`read_columnar`): ``ROWS`` frames are taken too,
    as ``(place, start, end)`` added to ``blocks``: how many single tells come before
    the block, and where its body is in ``data`` (not copied out: a block is most of a
    batch's bytes, and :func:`_wire.decode_block` reads it in place, fiftieth pass); the
    count of tells is then the caller's to check.
    """
    tells: list[bytes] = []
    controls: list[tuple[int, bytes]] = []
    add_tell = tells.append
    size = len(data)
    unpack = _FRAME.unpack_from
    try:
        while offset < size:
            length, kind = unpack(data, offset)
            end = offset + 4 + length
            if length < 1 or end > size:
                raise BatchError(
                    f"frame {_frames(tells, controls, blocks)} at byte {offset}: length"
                    f" {length} runs past the batch's {size} bytes"
                )
            if kind == TELL:
                add_tell(data[offset + FRAME_OVERHEAD : end])
            elif kind in _KINDS:
                controls.append((kind, data[offset + FRAME_OVERHEAD : end]))
            elif kind == ROWS and blocks is not None:
                blocks.append((len(tells), offset + FRAME_OVERHEAD, end))
            else:
                raise BatchError(
                    f"frame {_frames(tells, controls, blocks)} at byte {offset}:"
                    f" unknown kind {kind}"
                )
            offset = end
    except struct.error:
        # fewer than FRAME_OVERHEAD bytes left for a frame's length and kind
        raise BatchError(
            f"frame {_frames(tells, controls, blocks)} at byte {offset}: truncated length"
        ) from None
    if blocks is None and len(tells) != numbered:
        raise BatchError(f"batch head says {numbered} tells, it holds {len(tells)}")
    return tells, controls


def _frames(tells: list[bytes], controls: list[tuple[int, bytes]], blocks: list[Any] | None) -> int:
    """How many frames :func:`split_frames` took so far (for its errors)."""
    return len(tells) + len(controls) + (len(blocks) if blocks else 0)


def read_columnar(
    data: bytes,
    offset: int,
    numbered: int,
    undecodable: Callable[[MessageDecodeError], object],
    bad_rows: Callable[[int, BatchError], object] | None = None,
) -> tuple[list[Message], list[tuple[int, bytes]]]:
    """The messages and control frames of an NXB3 batch from ``offset``, the messages in
    the order of their frames (single tells and blocks of rows). Checked as a whole
    before any message is used, as :func:`split_frames` checks a batch, and every block
    whole (:func:`_wire.decode_block`); a single tell that does not decode is handed to
    ``undecodable`` alone, as in NXB2; a count of tells other than the head's is a
    BatchError.

    A block that does not check is the whole batch's BatchError, none of its tells
    used, without ``bad_rows``. With it (the node's reading, forty-fifth pass), such a
    block is left out as a single tell that does not decode is: ``bad_rows(rows,
    error)`` with the rows its head counts, in its place in the order, and the batch's
    other tells are read; only if its head says at least one row, the block's own bytes
    could hold that many (forty-sixth pass: a head is not taken on its word) and the
    batch's count (with those rows) is the head's, else the batch is refused whole as
    before. Its rows
    are one JSON array of payloads and one table of addresses: no row of a bad block is
    read alone (a row's payload cannot be told from its neighbours' in an array that
    does not parse)."""
    places: list[tuple[int, int, int]] = []
    bodies, controls = split_frames(data, offset, numbered, places)
    if not places:
        if len(bodies) != numbered:
            raise BatchError(f"batch head says {numbered} tells, it holds {len(bodies)}")
        return wire.decode_tells(bodies, undecodable), controls
    decoded: list[list[Message] | tuple[int, BatchError]] = []
    count = len(bodies)
    for place, start, end in places:
        try:
            msgs = wire.decode_block(data, start, end)
        except wire.BlockError as exc:
            # (after its frames before: single tells and blocks)
            after = place + len(decoded)
            error = BatchError(f"block of rows {len(decoded)}, after {after} tells: {exc}")
            # its head's count, only if the block's own bytes could hold as many rows:
            # else no count of it can be trusted, and the batch is refused whole
            rows = exc.rows
            if bad_rows is None or rows < 1:
                raise error from None
            decoded.append((rows, error))
            count += rows
            continue
        decoded.append(msgs)
        count += len(msgs)
    if count != numbered:
        bad = next((f" ({d[1]})" for d in decoded if isinstance(d, tuple)), "")
        raise BatchError(f"batch head says {numbered} tells, it holds {count}{bad}")
    out: list[Message] = []
    start = 0
    for (place, _, _), block in zip(places, decoded, strict=True):
        if place > start:
            out += wire.decode_tells(bodies[start:place], undecodable)
        if isinstance(block, tuple):
            assert bad_rows is not None
            bad_rows(*block)
        else:
            out += block
        start = place
    if start < len(bodies):
        out += wire.decode_tells(bodies[start:], undecodable)
    return out, controls


def cancel_body(query_id: uuid.UUID, to: Address) -> bytes:
    if isinstance(to, uuid.UUID):
        return query_id.bytes + b"\x00" + to.bytes
    return query_id.bytes + b"\x01" + to.encode()


def parse_cancel(body: bytes) -> tuple[uuid.UUID, Address]:
    """The query id and address of a CANCEL body; BatchError if malformed."""
    if len(body) < 18:
        raise BatchError(f"cancel frame of {len(body)} bytes (at least 18)")
    query_id = uuid.UUID(bytes=body[:16])
    tag, rest = body[16], body[17:]
    if tag == 0 and len(rest) == 16:
        return query_id, uuid.UUID(bytes=rest)
    if tag == 1:
        try:
            return query_id, rest.decode()
        except UnicodeDecodeError:
            raise BatchError("cancel frame: the address is not UTF-8") from None
    raise BatchError(f"cancel frame: bad address tag {tag} or length {len(rest)}")


def parse_credit(body: bytes) -> tuple[int, int]:
    """``(session, consumed)`` of a CREDIT body; BatchError if malformed."""
    if len(body) != _CREDIT.size:
        raise BatchError(f"credit frame of {len(body)} bytes ({_CREDIT.size} expected)")
    session, consumed = _CREDIT.unpack(body)
    return session, consumed


@final
class NodeLink:
    """The sending side of one stream (this process -> one destination process).

    Frames wait here until :meth:`seal`; ``sent`` counts the tells sealed so far (the
    last number given), ``consumed`` those the destination reported consumed (credit).
    ``in_flight`` tells (waiting here or not yet consumed there) never exceed ``window``
    as long as senders ask :meth:`has_room` first.
    """

    __slots__ = (
        "_base",
        "_peer_session",
        "_room",
        "cancels",
        "columnar",
        "consumed",
        "credit_due",
        "dest_prefix",
        "entries",
        "frames",
        "jsons",
        "node",
        "rows",
        "sent",
        "size",
        "table",
        "tells",
        "upgrade",
        "window",
    )

    def __init__(self, node: str, dest_prefix: int, window: int, columnar: bool = False) -> None:
        self.node = node
        self.dest_prefix = dest_prefix
        self.window = window
        #: whether the destination reads NXB3 (its membership record lists it): the
        #: common tells then go as rows of a block (see :meth:`close_rows`)
        self.columnar = columnar
        #: the destination's record came to list NXB3 while this link's open batch held
        #: frames: the batches after that one are NXB3 (see :meth:`read_columnar_next`)
        self.upgrade = False
        #: the open block of rows: ``(stored_fields, index in entries)`` a tell, the
        #: payloads' JSON, the table of addresses (its entries, and their index by the
        #: address: a name, or an id's 128-bit value)
        self.rows: list[tuple[tuple[Any, ...], int]] = []
        self.jsons: list[bytes] = []
        self.entries: list[bytes] = []
        self.table: dict[str | int, int] = {}
        #: frames of the open batch, ready to join (a tell's as two parts: its length and
        #: kind, then its body)
        self.frames: list[bytes] = []
        #: bytes of ``frames``
        self.size = 0
        #: tells among ``frames``
        self.tells = 0
        #: cancel frames sent so far (statistics)
        self.cancels = 0
        self.sent = 0
        self.consumed = 0
        #: credit to return the other way with the next batch: (session, consumed)
        self.credit_due: tuple[int, int] | None = None
        self._room: trio.Event | None = None
        # the destination's session, and what its counts start from (see credit)
        self._peer_session: int | None = None
        self._base = 0

    @property
    def in_flight(self) -> int:
        return self.sent + self.tells - self.consumed

    def has_room(self) -> bool:
        return self.sent + self.tells - self.consumed < self.window

    def add_tell(self, body: bytes) -> int:
        """Add a tell's frame to the open batch; returns the batch's size in bytes now.
        (Its length and kind go in as a part of their own: the body is not copied.)
        After the open block of rows, if any: in order."""
        if self.rows:
            self.close_rows()
        frames = self.frames
        frames.append(frame_head(len(body) + 1, TELL))
        frames.append(body)
        self.tells += 1
        size = self.size = self.size + len(body) + FRAME_OVERHEAD
        return size

    def close_rows(self) -> None:
        """The open block of rows, packed, as a ``ROWS`` frame after the frames before
        it (a single tell or the seal comes next); ``size`` counted it row by row."""
        rows = self.rows
        if rows:
            body = wire.encode_block(rows, self.entries, self.jsons)
            self.frames.append(frame_head(len(body) + 1, ROWS))
            self.frames.append(body)
            self.rows = []
            self.jsons = []
            self.entries = []
            self.table = {}

    def read_columnar_next(self) -> None:
        """The destination reads NXB3 (its record, which came after this link was made,
        lists it): the next batch is NXB3, this one too if it holds no frame yet; never
        a batch whose frames went in as NXB2 (:meth:`seal` switches at the boundary)."""
        if self.columnar:
            return
        if self.frames or self.tells:
            self.upgrade = True
        else:
            self.columnar = True

    def add_cancel(self, query_id: uuid.UUID, to: Address) -> None:
        body = cancel_body(query_id, to)
        self.frames.append(_FRAME.pack(len(body) + 1, CANCEL) + body)
        self.size += len(body) + FRAME_OVERHEAD
        self.cancels += 1

    @property
    def pending(self) -> bool:
        return bool(self.frames) or bool(self.rows) or self.credit_due is not None

    def seal(self, node: bytes, sender_prefix: int, session: int) -> tuple[bytes, int]:
        """The open batch as one body (numbering its tells), and how many tells it holds;
        the link starts a new batch. ``node`` is this node's name, encoded."""
        if self.rows:
            self.close_rows()
        frames = self.frames
        if self.credit_due is not None:
            frames.insert(0, _FRAME.pack(_CREDIT.size + 1, CREDIT) + _CREDIT.pack(*self.credit_due))
            self.credit_due = None
        tells = self.tells
        head = _HEAD.pack(
            MAGIC_COLUMNAR if self.columnar else MAGIC,
            sender_prefix,
            session,
            self.dest_prefix,
            self.sent + 1,
            tells,
            len(node),
        )
        body = b"".join((head, node, *frames))
        self.sent += tells
        self.frames = []
        self.size = 0
        self.tells = 0
        if self.upgrade:
            self.upgrade = False
            self.columnar = True
        return body, tells

    def credit(self, peer_session: int, consumed: int) -> None:
        """The destination (session ``peer_session``) consumed ``consumed`` tells of this
        stream so far: wake senders waiting for room."""
        if peer_session != self._peer_session:
            if self._peer_session is not None:
                # The destination left and joined again in the same process: what was
                # in flight to the old one is gone (it counted it, or NATS lost it);
                # the new one counts from the tells it got. (Only for a destination of
                # an earlier version: the cluster passes on the credit of the join that
                # its member table holds, and a new join gets a new link.)
                self._base = self.sent - consumed
            self._peer_session = peer_session
        consumed += self._base
        if consumed > self.consumed:
            self.consumed = min(consumed, self.sent)
            room = self._room
            if room is not None and self.has_room():
                self._room = None
                room.set()

    def wake_waiters(self) -> None:
        """Wake the senders waiting for room without giving any: the link was dropped,
        or its destination lost (each checks why it woke, see :meth:`wait_for_room`)."""
        room = self._room
        if room is not None:
            self._room = None
            room.set()

    async def wait_for_room(self) -> None:
        """Return once :meth:`has_room`, or once :meth:`wake_waiters` was called, or when
        another waiter took the room first: the caller checks which, and bounds the wait."""
        if not self.has_room():
            if self._room is None:
                self._room = trio.Event()
            await self._room.wait()


def batch_limit(max_payload: int, node: str, configured: int) -> int:
    """The largest batch body to build: ``configured`` bytes, never past the server's
    ``max_payload`` (the head and node name included)."""
    return max(1, min(configured, max_payload) - HEAD_SIZE - len(node.encode()))

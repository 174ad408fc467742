"""Machine instructions per tell of the node-batch codec, today's layout against two
designs of a batch encoded whole: counts that do not move with the machine's load
(``valgrind --tool=cachegrind``).

    python benchmarks/batch_codec.py [--short 4] [--long 12] [--ways send,receive]

Each way runs under cachegrind once with ``--short`` and once with ``--long`` batches of
512 tells (bench_nats's payload, to the name ``sink``, from ``SYSTEM_ID``), the garbage
collector off over the measured part, and the difference divided by the difference in
tells is printed: what one more tell costs. The ways (docs/distributed.md, "A batch
encoded whole, forty-fourth pass"):

* ``messages``: building the messages alone (``new_message``), in every way below;
* ``send``: today's sending side: ``stored_fields``, ``encode_stored_tell``, the frame
  head and two appends a tell (as ``Cluster.take_tell`` writes them), the seal's join;
* ``send_deferred``: the same NXB2 bytes, but a tell leaves only its checked payload
  JSON and its address bytes at the send (what must be taken then: the payload may
  change after the send, and a payload JSON refuses raises at the send); the heads (ids,
  time, kind, all fixed once sent) are packed at the seal, in one comprehension;
* ``send_columnar``: NXB3, the columnar batch (forty-fourth pass, its second part:
  the prototype's layout made a wire format), as the kernel writes it: the heads
  packed at the seal as fixed-size rows (an address as an index into the block's
  table of addresses), the payloads as one JSON array;
* ``receive`` / ``receive_columnar``: reading such a batch back into messages (NXB2:
  ``read_head``, ``split_frames`` and ``decode_tells``; NXB3: ``read_head`` and
  ``read_columnar``); these counts include the sending side that made the batches
  (subtract ``send`` / ``send_columnar``).

A check at the start reads back what each way wrote: the same messages.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))

from nexus_trio._message import (  # noqa: E402
    SYSTEM_ID,
    Message,
    MessageKind,
    new_message,
    row_fields,
    stored_fields,
)
from nexus_trio._nats import _batch as batch  # noqa: E402
from nexus_trio._nats import _wire as wire  # noqa: E402

PAYLOAD = {"task": "resize", "n": 0, "args": [1, 2, 3]}
TELLS = 512
WAYS = ("messages", "send", "send_deferred", "send_columnar", "receive", "receive_columnar")

_dumps = wire._dumps
_SCALARS = wire._NO_FLOAT
_KINDS = tuple(MessageKind)
_KIND_CODES = {kind: code for code, kind in enumerate(_KINDS)}
#: a frame's length and kind, then a tell's tag, kind, time, id and sender (NXB2)
_FRAMED_HEAD = struct.Struct(">IBBBq16s16s")


def messages() -> list[Message]:
    return [
        new_message(SYSTEM_ID, "sink", PAYLOAD, MessageKind.COMMAND, None) for _ in range(TELLS)
    ]


def send(msgs: list[Message]) -> bytes:
    link = batch.NodeLink("responder", 7, 1 << 30)
    frames = link.frames
    head = batch.frame_head
    for msg in msgs:
        body = wire.encode_stored_tell(msg, stored_fields(msg))
        frames.append(head(len(body) + 1, batch.TELL))
        frames.append(body)
        link.tells += 1
        link.size += len(body) + batch.FRAME_OVERHEAD
    return link.seal(b"client", 9, 11)[0]


def payload_json(payload: dict[str, Any]) -> bytes:
    """The checked JSON of bench_nats's kind of payload (a dict of scalars and lists of
    scalars: encode_stored_tell's walk, cut down to that)."""
    for key, value in payload.items():
        if key.__class__ is not str:
            raise TypeError(key)
        cls = value.__class__
        if cls in _SCALARS:
            continue
        if cls is list:
            for item in value:
                cls = item.__class__
                if cls not in _SCALARS and not (cls is float and item - item == 0.0):
                    raise TypeError(item)
            continue
        raise TypeError(value)
    return _dumps(payload)


def send_deferred(msgs: list[Message]) -> bytes:
    link = batch.NodeLink("responder", 7, 1 << 30)
    named = wire._NAMED
    pending = []
    add = pending.append
    for msg in msgs:
        fields = stored_fields(msg)
        to = fields[1]
        if to.__class__ is str:
            address, tag = named[to], 0x81
        else:
            address, tag = to.int.to_bytes(16), 0x80
        json = payload_json(fields[2])
        add((fields, tag, address, json))
        link.size += len(json) + len(address) + 47
    pack = _FRAMED_HEAD.pack
    link.frames = [
        pack(
            len(json) + len(address) + 43,
            batch.TELL,
            tag,
            _KIND_CODES[f[3]],
            f[5] // 1000,
            f[4].to_bytes(16),
            f[0].int.to_bytes(16),
        )
        + address
        + json
        for f, tag, address, json in pending
    ]
    link.tells = len(pending)
    return link.seal(b"client", 9, 11)[0]


def send_columnar(msgs: list[Message]) -> bytes:
    """NXB3 as the kernel writes it (``Cluster.take_tell`` and ``_add_row``: the
    payload's JSON and the address's place in the block's table at the send, the rows
    packed at the seal, their ids drawn there)."""
    link = batch.NodeLink("responder", 7, 1 << 30, columnar=True)
    table = link.table
    for msg in msgs:
        fields = row_fields(msg)  # (the id drawn at the block's close, as take_tell)
        json = wire.tell_payload_json(fields[2])
        to = fields[1]
        key = to if to.__class__ is str else to.int
        index = table.get(key)
        size = len(json) + batch.ROW_COST
        if index is None:
            entry = wire.table_entry(to)
            assert entry is not None
            index = table[key] = len(table)
            link.entries.append(entry)
            size += len(entry)
        link.rows.append((fields, index))
        link.jsons.append(json)
        link.tells += 1
        link.size += size
    return link.seal(b"client", 9, 11)[0]


def receive(data: bytes) -> list[Message]:
    head, offset = batch.read_head(data)
    tells, _ = batch.split_frames(data, offset, head.numbered)
    return wire.decode_tells(tells, print)


def receive_columnar(data: bytes) -> list[Message]:
    """NXB3 as the kernel reads it (``read_head``, ``read_columnar``)."""
    head, offset = batch.read_head(data)
    return batch.read_columnar(data, offset, head.numbered, print)[0]


def _same(one: list[Message], other: list[Message]) -> bool:
    def key(msg: Message) -> tuple[Any, ...]:
        return (msg.sender, msg.to, msg.payload, msg.kind, msg.timestamp)

    return [key(m) for m in one] == [key(m) for m in other]


def run_way(way: str, batches: int) -> None:
    """``way`` over ``batches`` batches, after a check and a warm-up of the caches."""
    msgs = messages()
    today = send(msgs)
    if send_deferred(msgs) != today:
        raise SystemExit("send_deferred wrote other bytes than send")
    if not _same(receive(today), msgs) or not _same(receive_columnar(send_columnar(msgs)), msgs):
        raise SystemExit("a batch read back differs from what was sent")
    gc.collect()
    gc.disable()
    made = [messages() for _ in range(batches)]
    if way in ("receive", "receive_columnar"):
        encode = send if way == "receive" else send_columnar
        decode = receive if way == "receive" else receive_columnar
        for data in [encode(msgs) for msgs in made]:
            decode(data)
    elif way != "messages":
        encode = {"send": send, "send_deferred": send_deferred, "send_columnar": send_columnar}[way]
        for msgs in made:
            encode(msgs)


def _instructions(way: str, batches: int, folder: str) -> subprocess.Popen[bytes]:
    command = ["valgrind", "--tool=cachegrind", "--cache-sim=no"]
    command += [f"--cachegrind-out-file={folder}/{way}.{batches}", sys.executable, __file__]
    command += ["--run", way, "--batches", str(batches)]
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _total(process: subprocess.Popen[bytes]) -> int:
    _, err = process.communicate()
    if process.returncode != 0:
        raise SystemExit(f"cachegrind run failed:\n{err.decode()}")
    found = re.search(rb"I\s+refs:\s+([\d,]+)", err)
    if found is None:
        raise SystemExit(f"no instruction count in cachegrind's output:\n{err.decode()}")
    return int(found.group(1).replace(b",", b""))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=int, default=4, help="batches of the short run")
    parser.add_argument("--long", type=int, default=12, help="batches of the long run")
    parser.add_argument("--ways", default=",".join(WAYS), help="the ways to count, by comma")
    parser.add_argument("--run", choices=WAYS, help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run is not None:
        run_way(args.run, args.batches)
        return
    if not 1 <= args.short < args.long:
        parser.error("--short must be at least 1 and less than --long")
    ways = args.ways.split(",")
    unknown = [way for way in ways if way not in WAYS]
    if unknown:
        parser.error(f"no way {unknown[0]!r} (the ways: {', '.join(WAYS)})")
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    tells = (args.long - args.short) * TELLS
    with tempfile.TemporaryDirectory(prefix="batch-codec-") as folder:
        for way in ways:
            runs = [_instructions(way, batches, folder) for batches in (args.short, args.long)]
            try:
                short, long = (_total(run) for run in runs)
            finally:
                for run in runs:  # a failed run leaves the other one running no longer
                    if run.poll() is None:
                        run.kill()
                        run.wait()
            print(f"{way:18} {(long - short) / tells:9,.0f} instructions a tell")


if __name__ == "__main__":
    main(sys.argv[1:])

"""A TCP proxy in front of a nats-server, for the tests that cut one client's connections
while its process lives (a dropped link, a pulled cable, a NAT that forgot the flow).

Each connection is tagged with the ``name`` its client gives in its ``CONNECT`` (a node's
are ``nexus:<node>:data`` and ``nexus:<node>:control``), read from the bytes it forwards,
so a test can cut the connections of one node only (:meth:`NatsProxy.cut`) and refuse
that node's new ones for a while (:meth:`NatsProxy.refuse`): what a network partition
between one process and the server does, the server and the other clients untouched;
or stall one direction of one of its connections, mid-write, without closing it
(:meth:`NatsProxy.stall`, :meth:`NatsProxy.resume`): a link that stops carrying bytes
one way (a congested or flapping path) and then carries them again; or lose some of the
messages the server writes to one connection, whole, the link kept (:meth:`NatsProxy.lose`):
what the server does to a slow consumer.
Two threads a connection (one a direction, blocking): a slow end holds back its own
direction only, as TCP does."""

from __future__ import annotations

import contextlib
import json
import socket
import threading


class _Pair:
    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.name: str | None = None  # (from the client's CONNECT)
        self.closed = False
        self.seen = 0  # (messages to it that a loss rule of NatsProxy.lose matched)
        self.pending = b""  # (the server's bytes to it not yet a whole message)

    def frames(self, data: bytes) -> list[bytes]:
        """The whole protocol lines and messages the server wrote to the client, with
        ``data`` read now; the rest waits for the next read."""
        buf = self.pending + data if self.pending else data
        out: list[bytes] = []
        at = 0
        while True:
            end = buf.find(b"\r\n", at)
            if end < 0:
                break
            size = 0
            if buf.startswith((b"MSG ", b"HMSG "), at):
                size = int(buf[buf.rfind(b" ", at, end) + 1 : end]) + 2
            if len(buf) < end + 2 + size:
                break
            out.append(buf[at : end + 2 + size])
            at = end + 2 + size
        self.pending = buf[at:]
        return out

    def node(self) -> str | None:
        parts = (self.name or "").split(":")
        return parts[1] if len(parts) == 3 and parts[0] == "nexus" else None

    def role(self) -> str | None:
        """``data`` or ``control`` for a node's connection (None: not named yet)."""
        parts = (self.name or "").split(":")
        return parts[2] if len(parts) == 3 and parts[0] == "nexus" else None

    def close(self) -> None:
        self.closed = True
        for sock in (self.client, self.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class NatsProxy:
    """Listens on 127.0.0.1 (``port``, ``url``) and forwards each connection to
    ``target_port``; :meth:`close` ends it and every connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.url = f"nats://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._refused: set[str] = set()  # (nodes whose connections are closed)
        self.cuts: dict[str, int] = {}  # node -> its connections cut or refused
        #: (node, role, upstream) of the directions stalled now, and how many bytes each
        #: stalled direction held back at its stall (the rest of the chunk it cut in two)
        self._stalled: set[tuple[str, str, bool]] = set()
        self._resumed = threading.Condition(self._lock)
        self.held_back: dict[tuple[str, str, bool], int] = {}
        #: (node, role) -> (subject part, every how many such messages one is lost)
        self._losing: dict[tuple[str, str], tuple[bytes, int]] = {}
        #: (node, role) -> the messages the server wrote to it that :meth:`lose` dropped
        self.lost: dict[tuple[str, str], int] = {}
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self, node: str) -> int:
        """Close every connection of ``node`` now (both ends: the client reads EOF, the
        server sees its client gone); how many were cut."""
        with self._lock:
            mine = [pair for pair in self._pairs if pair.node() == node]
            for pair in mine:
                self._drop(pair)
            self.cuts[node] = self.cuts.get(node, 0) + len(mine)
            return len(mine)

    def refuse(self, node: str, refused: bool = True) -> None:
        """Cut ``node``'s connections and close each new one of it as soon as its CONNECT
        names it, until ``refuse(node, False)``: a partition between it and the server."""
        with self._lock:
            if refused:
                self._refused.add(node)
            else:
                self._refused.discard(node)
        if refused:
            self.cut(node)

    def stall(self, node: str, role: str = "data", *, upstream: bool = True) -> None:
        """Stop forwarding one direction of ``node``'s ``role`` connection (``upstream``:
        what the node writes to the server; else what the server writes to it) until
        :meth:`resume`, without closing it: the next chunk read that way is cut in two,
        its first half forwarded (so a NATS message, e.g. a batch, is left half written)
        and the rest held with everything after it; the other direction flows."""
        with self._lock:
            self._stalled.add((node, role, upstream))
            self.held_back.pop((node, role, upstream), None)

    def resume(self, node: str, role: str = "data", *, upstream: bool = True) -> None:
        """Forward a direction :meth:`stall` stopped again, what it held first."""
        with self._lock:
            self._stalled.discard((node, role, upstream))
            self._resumed.notify_all()

    def _hold(self, pair: _Pair, upstream: bool, data: bytes, sink: socket.socket) -> bytes:
        """The rest of ``data`` to forward once the direction is no longer stalled (at
        once if it is not): half of it goes now, the rest waits."""
        key = (pair.node() or "", pair.role() or "", upstream)
        with self._lock:
            if key not in self._stalled:
                return data
        half = len(data) // 2
        sink.sendall(data[:half])
        with self._lock:
            self.held_back[key] = len(data) - half
            while key in self._stalled and not pair.closed and not self._closed:
                self._resumed.wait(0.05)
        return data[half:]

    def lose(self, node: str, role: str, subject: str, every: int) -> None:
        """From now on, of the messages (``MSG``/``HMSG``) the server writes to ``node``'s
        ``role`` connection whose subject contains ``subject``, drop each ``every``-th,
        whole (the 1st, the ``every+1``-th, ...; counted in :attr:`lost`), the connection
        and every other message kept; ``every=0`` stops it. The server-to-client direction
        of every connection is read message by message for this (each a whole write)."""
        with self._lock:
            if every:
                self._losing[(node, role)] = (subject.encode(), every)
            else:
                self._losing.pop((node, role), None)

    def _losing_now(self, pair: _Pair, frame: bytes) -> bool:
        """Whether the proxy drops ``frame``, a whole message the server wrote to ``pair``."""
        key = (pair.node() or "", pair.role() or "")
        with self._lock:
            rule = self._losing.get(key)
            if rule is None or not frame.startswith((b"MSG ", b"HMSG ")):
                return False
            if rule[0] not in frame.split(b" ", 2)[1]:
                return False
            pair.seen += 1
            if (pair.seen - 1) % rule[1]:
                return False
            self.lost[key] = self.lost.get(key, 0) + 1
            return True

    def nodes(self) -> list[str | None]:
        """The node of each connection open now (None: not named yet, or no node's)."""
        with self._lock:
            return sorted((p.node() for p in self._pairs), key=str)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for pair in list(self._pairs):
                self._drop(pair)

    def _drop(self, pair: _Pair) -> None:
        self._pairs.discard(pair)
        pair.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            pair = _Pair(client, server)
            with self._lock:
                self._pairs.add(pair)
            threading.Thread(target=self._pump, args=(pair, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(pair, False), daemon=True).start()

    def _pump(self, pair: _Pair, upstream: bool) -> None:
        source, sink = (pair.client, pair.server) if upstream else (pair.server, pair.client)
        head = b""
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                with self._lock:
                    if not pair.closed:
                        self._drop(pair)
                return
            if upstream and pair.name is None:
                head += data
                if b"\r\n" in head:
                    line = head.split(b"\r\n", 1)[0]
                    try:
                        name = json.loads(line.partition(b" ")[2]).get("name")
                    except (ValueError, AttributeError):
                        name = None
                    with self._lock:
                        pair.name = str(name or "")
                        node = pair.node()
                        if node is not None and node in self._refused:
                            self.cuts[node] = self.cuts.get(node, 0) + 1
                            self._drop(pair)
                            return
            if not upstream:
                data = b"".join(f for f in pair.frames(data) if not self._losing_now(pair, f))
            try:
                if self._stalled:
                    data = self._hold(pair, upstream, data, sink)
                sink.sendall(data)
            except OSError:
                with self._lock:
                    if not pair.closed:
                        self._drop(pair)
                return

"""The metrics endpoint (nexus_trio.metrics) against hostile clients, property-tested.

``test_hostile_clients_never_stall_or_break_the_metrics_endpoint``: an endpoint with a
small ``max_connections`` (1 to 4) and several clients connecting at once over loopback,
each with a drawn script: a request (a valid ``GET`` or ``HEAD`` of ``/metrics``,
``/healthz``, ``/`` or an unknown path, in origin or absolute form, with a query string
or percent-escapes, HTTP/1.0, 1.1 or a higher 1.x (answered as 1.1), bare ``LF`` line ends, empty lines before it,
keep-alive or not, benign extra headers: duplicates, NUL and control bytes, non-ASCII,
a body with or without ``Content-Length``; another method; the same with one fault that
decides the answer: obsolete line folding, a line without a colon, whitespace before a
colon, no ``Host``, two, or one that is not ``host[:port]``, a bad request line, a
version that is not ``HTTP/DIGIT.DIGIT`` (400) or of a major other than 1 (505), a huge
header or very many headers; an odd request line: odd methods, targets (absolute forms
that are no URL), versions, separators, bytes such as 0xA0 that separate nothing in
HTTP; or random bytes), perhaps a second request pipelined behind
it, sent cut into pieces with pauses, maybe only a prefix of it (a slow client that then
goes silent); then the client reads the answer, half-closes and reads, closes without
reading, resets the connection (``SO_LINGER`` 0) before the answer or in the middle of
it.

Then: no hang (the property ends; a silent client is cut at the 10 s request timeout, or,
with the endpoint at its limit, shed 2 s after its accept),
every answer a client read is one well-formed response (status line, headers, a body of
its ``Content-Length``, none to a ``HEAD``, nothing after it) with the status the docs
give for what was sent, or the connection was closed without one (a head not all in);
no answer is a ``500`` and nothing is logged at ``ERROR``; the refusal counters
(``nexus_metrics_requests_refused_total{status}``) are what the answers say; a
well-formed ``GET /metrics`` after the hostile clients gets ``200`` and the Prometheus
text; no task is left once the endpoint closes, and the kernel's books are those before.

Mock time (``MockClock(autojump_threshold=0)``) with real sockets on 127.0.0.1: only the
timeouts jump. A client sends all it sends within 8 mock seconds of connecting, and an
endpoint's request timeout starts at ``accept``, so whether a head was all in in time
does not depend on the machine's speed. Derandomized, without an example database.
"""

from __future__ import annotations

import collections
import functools
import logging
import re
import socket
import struct

import attrs
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from nexus_trio.metrics import MetricsRenderer, serve_metrics
from nexus_trio.testing import open_test_kernel

from .hang_guard import fault_settings, run_on_mock_clock, tasks_living

#: real seconds one example may take before it counts as hung
REAL_LIMIT = 60
#: the statuses the endpoint counts as refusals
REFUSALS = (400, 404, 405, 431, 505)
#: a head longer than this gets 431 (docs/cli.md: 8 KiB, the empty lines before it included)
MAX_HEAD = 8192
HEAD_END = re.compile(rb"\n\r?\n")


@attrs.frozen
class Request:
    """Bytes a client sends, and the status the endpoint answers once it has read their
    head (None: not predicted, random bytes)."""

    data: bytes
    status: int | None
    head: bool = False  # a HEAD request: its answer has no body


@attrs.frozen
class Script:
    request: Request
    #: the bytes sent: all of ``request.data`` (and a pipelined request), or a prefix
    sent: bytes
    #: where ``sent`` is cut into sends, and the mock seconds paused before each piece
    pieces: tuple[tuple[int, float], ...]
    #: "read": read the answer; "eof": half-close, then read; "close": close without
    #: reading; "reset": reset (SO_LINGER 0) without reading; "reset_mid_answer": read
    #: the status line of the answer, then reset
    ending: str
    start_after: float


@attrs.frozen
class RequestParts:
    """A well-formed request, in parts, so that a fault can be put in."""

    lead: bytes  # empty lines before the request line
    request_line: bytes
    headers: list[bytes]
    eol: bytes
    body: bytes
    status: int
    head: bool

    def request(self) -> Request:
        eol = self.eol
        head = self.request_line + eol + b"".join(h + eol for h in self.headers) + eol
        return Request(self.lead + head + self.body, self.status, self.head)


TOKEN = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=8).map(str.encode)
#: header values that make no request bad: the endpoint reads only Host
BENIGN_VALUE = st.one_of(
    st.sampled_from([b"*/*", b"keep-alive", b"close", b"gzip, deflate", b""]),
    st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.text(max_size=10).map(lambda t: t.replace("\r", "").replace("\n", "").encode()),
)
GOOD_HOSTS = (b"localhost", b"127.0.0.1:9464", b"[::1]:80", b"", b"a%20b", b"example.com:")
#: Host values that are not host[:port]
BAD_HOSTS = (b"a b", b"x\x00y", b"h\xc3\xa9", b"x/y", b"a@b", b"[::1", b"\x7f", b"x:y")


@st.composite
def valid_requests(draw: st.DrawFn) -> RequestParts:
    """A well-formed request: the endpoint serves it, or answers 404 or 405."""
    method = draw(
        st.sampled_from([b"GET"] * 4 + [b"HEAD"] * 2 + [b"POST", b"PUT", b"OPTIONS", b"get"])
    )
    path, status = draw(
        st.sampled_from(
            [
                (b"/metrics", 200),
                (b"/healthz", 200),
                (b"/", 200),
                (b"/nope", 404),
                (b"/metrics/", 404),
                (b"/%6detrics", 404),
                (b"/healthz/../metrics", 404),
            ]
        )
    )
    if method not in (b"GET", b"HEAD"):
        status = 405
    query = draw(st.sampled_from([b"", b"?x=1", b"?a=%00&b=\xff", b"?"]))
    form = draw(st.sampled_from([b"", b"", b"http://127.0.0.1:9464", b"HTTP://Example.com"]))
    target = form + path + query
    if form and path == b"/" and draw(st.booleans()):
        target = form + query  # an empty path: "/"
    # (a higher minor of 1 is served as 1.1: RFC 9110 6.2)
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1", b"HTTP/1.9"]))
    eol = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n"]))
    headers = [
        name + b": " + value
        for name, value in draw(
            st.lists(
                st.tuples(
                    st.sampled_from([b"Accept", b"Connection", b"X-Dup", b"User-Agent"]) | TOKEN,
                    BENIGN_VALUE,
                ),
                max_size=5,
            )
        )
        if name.lower() != b"host"
    ]
    if version != b"HTTP/1.0" or draw(st.booleans()):
        host = draw(st.sampled_from(GOOD_HOSTS))
        headers.insert(draw(st.integers(0, len(headers))), b"Host: " + host)
    body = b""
    if draw(st.booleans()):
        body = draw(st.binary(max_size=200))
        if draw(st.booleans()):
            headers.append(b"Content-Length: " + str(len(body)).encode())
    lead = draw(st.sampled_from([b"", b"", b"\r\n", b"\n\r\n"]))
    request_line = method + b" " + target + b" " + version
    return RequestParts(lead, request_line, headers, eol, body, status, method == b"HEAD")


FAULTS = (
    "fold",
    "no_colon",
    "space_before_colon",
    "two_hosts",
    "bad_host",
    "no_host",
    "bad_request_line",
    "bad_version",
    "unsupported_version",
    "huge_header",
    "many_headers",
)


@st.composite
def faulty_requests(draw: st.DrawFn) -> Request:
    """A valid request with one fault that decides its answer (400, 505 for a version it
    does not speak, or 431 for a head past 8 KiB, which is checked first)."""
    parts = draw(valid_requests())
    request_line = parts.request_line
    fault = draw(st.sampled_from(FAULTS))
    headers = [h for h in parts.headers if not h.startswith(b"Host:")]
    host = [b"Host: localhost"]
    at = draw(st.integers(0, len(headers)))
    status = 400
    if fault == "fold":
        headers = [*host, *headers[:at], b"X-A: b", b" folded", *headers[at:]]
    elif fault == "no_colon":
        headers = [*host, *headers[:at], draw(st.sampled_from([b"X-Thing", b"Host x"]))]
    elif fault == "space_before_colon":
        headers = [*headers[:at], draw(st.sampled_from([b"Host : x", b"X-A\t: b"])), *host]
    elif fault == "two_hosts":
        headers = [*host, *headers[:at], b"hOST: other", *headers[at:]]
    elif fault == "bad_host":
        headers = [*headers[:at], b"Host: " + draw(st.sampled_from(BAD_HOSTS)), *headers[at:]]
    elif fault == "no_host":
        request_line = request_line.rsplit(b" ", 1)[0] + b" HTTP/1.1"
    elif fault == "bad_request_line":
        request_line = draw(
            st.sampled_from(
                [
                    b"GET /metrics",
                    b"GET /metrics HTTP/1.1 extra",
                    b"GET /metrics FTP/1.0",
                    b"/metrics",
                    b"\x16\x03\x01\x02\x00\x01",  # a TLS ClientHello's start
                ]
            )
        )
        headers = [*host, *headers]
    elif fault in ("bad_version", "unsupported_version"):
        if fault == "bad_version":
            versions = [b"HTTP/1", b"HTTP/a.b", b"HTTP/1.10", b"HTTP/01.1", b"HTTP/", b"HTTP/1."]
        else:
            versions = [b"HTTP/2.0", b"HTTP/9.9", b"HTTP/0.9", b"HTTP/3.0"]
            status = 505
        request_line = request_line.rsplit(b" ", 1)[0] + b" " + draw(st.sampled_from(versions))
        headers = [*host, *headers]
    elif fault == "huge_header":
        headers = [*host, *headers, b"X-Huge: " + b"v" * draw(st.integers(8200, 12000))]
        status = 431
    else:
        headers = [*host, *headers, *(b"X-%d: %s" % (i, b"v" * 40) for i in range(200))]
        status = 431
    head = parts.head and fault != "bad_request_line"
    request = attrs.evolve(
        parts, request_line=request_line, headers=headers, status=status, head=head
    ).request()
    end = HEAD_END.search(request.data, len(parts.lead))
    assert end is not None
    if end.end() > MAX_HEAD:
        return attrs.evolve(request, status=431)
    return request


#: whitespace between the parts of a request line (RFC 9112 3: SP, HTAB, VT, FF, bare CR)
SEPARATORS = (b" ", b" ", b"\t", b"  ", b"\x0b", b"\x0c", b"\r")
#: bytes that separate nothing in HTTP, though Python's str.split() takes them for spaces
NOT_SEPARATORS = (b"\xa0", b"\x85", b"\x1c", b"\x1f")


#: pieces of odd request targets
TARGET_PIECES = st.lists(
    st.sampled_from(
        [
            b"[",
            b"]",
            b"::1",
            b"%",
            b"%zz",
            b"/",
            b"?",
            b"#",
            b"metrics",
            b"x",
            b":",
            b"99999",
            b"\x00",
            b"\xff",
            b"@",
            b"\\",
            b"\xef\xbc\x83",
        ]
    ),
    min_size=1,
    max_size=8,
).map(b"".join)
ODD_TARGETS = st.one_of(
    st.sampled_from([b"/metrics", b"/healthz", b"*", b"//", b""]),
    st.tuples(st.sampled_from([b"http://", b"https://", b"HTTP://", b""]), TARGET_PIECES).map(
        b"".join
    ),
)
ODD_METHODS = st.sampled_from([b"GET", b"HEAD", b"POST", b"", b"G\x00T", b"\xffGET"])
ODD_VERSIONS = st.sampled_from(
    [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/", b"HTTP/2", b"http/1.1", b"HTTP/2.0", b"HTTP/1.2"]
)
#: a version the endpoint speaks (RFC 9112 2.3; HTTP/1.x), or that is one at all
SPOKEN_VERSION = re.compile(rb"HTTP/1\.[0-9]")
VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")


@st.composite
def odd_request_lines(draw: st.DrawFn) -> Request:
    """A request line of odd parts and separators, with a valid Host: 400 if it is not
    ``METHOD TARGET HTTP/x`` (docs/cli.md) or its version is not ``HTTP/DIGIT.DIGIT``, 505
    for a version of a major other than 1, else whatever its method and target ask."""
    if draw(st.booleans()):
        parts = [draw(ODD_METHODS), draw(ODD_TARGETS), draw(ODD_VERSIONS)]
    else:
        parts = draw(st.lists(ODD_METHODS | ODD_TARGETS | ODD_VERSIONS, min_size=1, max_size=4))
    joined = parts[0]
    for part in parts[1:]:
        joined += draw(st.sampled_from(SEPARATORS + NOT_SEPARATORS)) + part
    words = re.split(rb"[ \t\x0b\x0c\r]+", joined.strip(b" \t\x0b\x0c\r"))
    well_formed = len(words) == 3 and words[2].startswith(b"HTTP/")
    status = None if well_formed else 400
    if well_formed and VERSION.fullmatch(words[2]) is None:
        status = 400
    elif well_formed and SPOKEN_VERSION.fullmatch(words[2]) is None:
        status = 505
    data = joined + b"\r\nHost: x\r\n\r\n"
    return Request(data, status, head=well_formed and words[0] == b"HEAD")


RANDOM_REQUEST = st.one_of(
    st.binary(max_size=300),
    st.lists(
        st.sampled_from(
            [
                b"GET",
                b"HEAD",
                b"/metrics",
                b"HTTP/1.1",
                b" ",
                b"\t",
                b"\x00",
                b"\xff",
                b"\r",
                b"\n",
                b"\r\n",
                b"Host: x",
                b":",
                b"http://[",
                b"]",
                b"%",
                b"\x0b",
                b"\xa0",
            ]
        ),
        max_size=30,
    ).map(b"".join),
).map(lambda data: Request(data, None))


@st.composite
def scripts(draw: st.DrawFn) -> Script:
    request = draw(
        st.one_of(
            valid_requests().map(RequestParts.request),
            valid_requests().map(RequestParts.request),
            faulty_requests(),
            odd_request_lines(),
            RANDOM_REQUEST,
        )
    )
    sent = request.data
    if request.status is not None and draw(st.booleans()):  # a second one pipelined
        sent += draw(valid_requests()).request().data
    if draw(st.integers(0, 3)) == 0:  # only a prefix: a slow client gone silent, or away
        sent = sent[: draw(st.integers(0, len(sent)))]
    cuts = sorted(draw(st.lists(st.integers(0, len(sent)), max_size=3)))
    # (at most 8 s in all: the request timeout, 10 s, cuts none of them)
    pauses = draw(st.lists(st.sampled_from([0.0, 0.0, 0.1, 1.0, 2.0]), min_size=4, max_size=4))
    pieces = tuple(zip([0, *cuts], pauses, strict=False))
    ending = draw(st.sampled_from(["read", "read", "eof", "eof", "close", "reset"]))
    if request.status is not None and request.status != 431 and draw(st.integers(0, 4)) == 0:
        ending = "reset_mid_answer"
    return Script(request, sent, pieces, ending, draw(st.sampled_from([0.0, 0.0, 0.5, 3.0])))


def decided(sent: bytes) -> tuple[bool, bool]:
    """Whether the endpoint has the whole head of ``sent`` (its end, or 8 KiB), and whether
    it is past 8 KiB (docs/cli.md: empty lines before the request line are skipped, and
    count in the 8 KiB)."""
    skipped = len(sent) - len(sent.lstrip(b"\r\n"))
    end = HEAD_END.search(sent, skipped)
    if end is not None:
        return True, end.end() > MAX_HEAD
    return len(sent) > MAX_HEAD, len(sent) > MAX_HEAD


def parse_answer(data: bytes, head_only: bool | None) -> int:
    """The status of ``data``, checked to be one well-formed response: a status line,
    header lines, ``Content-Length`` bytes of body (none to a HEAD; ``head_only`` None:
    either), nothing after it."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"an answer without the end of its head: {data[:200]!r}"
    status_line, *lines = head.split(b"\r\n")
    match = re.fullmatch(rb"HTTP/1\.1 ([1-5][0-9][0-9]) [A-Za-z ]+", status_line)
    assert match, f"a bad status line: {status_line!r}"
    headers: dict[bytes, bytes] = {}
    for line in lines:
        name, colon, value = line.partition(b": ")
        assert colon and re.fullmatch(rb"[A-Za-z-]+", name), f"a bad header line: {line!r}"
        assert name.lower() not in headers, f"a header twice: {head!r}"
        headers[name.lower()] = value
    assert headers[b"connection"] == b"close"
    length = int(headers[b"content-length"])
    if head_only is None:
        assert len(body) in (0, length), f"{len(body)} bytes of body, {length} said: {data!r}"
    elif head_only:
        assert body == b"", f"an answer to HEAD with a body: {data!r}"
    else:
        assert len(body) == length, f"{len(body)} bytes of body, {length} said: {data!r}"
    return int(match[1])


@attrs.define
class Outcome:
    script: Script
    #: what the client read (None: it read nothing, or its read was reset)
    answer: bytes | None = None
    #: mock seconds from its connection to the end of what it read
    read_for: float = 0.0


def set_reset_on_close(stream: trio.SocketStream) -> None:
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def run_client(port: int, script: Script, outcome: Outcome) -> None:
    await trio.sleep(script.start_after)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    connected = trio.current_time()
    try:
        ends = [at for at, _ in script.pieces[1:]] + [len(script.sent)]
        for (start, pause), end in zip(script.pieces, ends, strict=True):
            await trio.sleep(pause)
            if end > start:
                await stream.send_all(script.sent[start:end])
        if script.ending in ("close", "reset"):
            if script.ending == "reset":
                set_reset_on_close(stream)
            return
        if script.ending == "eof":
            await stream.send_eof()
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
            if script.ending == "reset_mid_answer" and b"\r\n" in data:
                set_reset_on_close(stream)
                break
        outcome.answer = data
        outcome.read_for = trio.current_time() - connected
    except (trio.BrokenResourceError, OSError):
        pass  # reset: what was read is unknown
    finally:
        await stream.aclose()


#: what a client is answered when its head is not all in and it keeps its side open
NOTHING = 0


#: at its limit of connections, the endpoint sheds one whose head is not all in this
#: many seconds after its accept (docs/cli.md)
SHED_AFTER = 2.0


def sheddable(script: Script) -> bool:
    """Whether the head of ``script`` may not be all in ``SHED_AFTER`` seconds after its
    accept (which is at its connection or later): a client whose head is not decided by
    then may be shed while the endpoint is at its limit."""
    ends = [at for at, _ in script.pieces[1:]] + [len(script.sent)]
    elapsed = 0.0
    for (_, pause), end in zip(script.pieces, ends, strict=True):
        elapsed += pause
        if decided(script.sent[:end])[0]:
            return elapsed >= SHED_AFTER
    return True


def prediction(script: Script) -> int | None:
    """The status the endpoint answers ``script`` with, once it has read it (``NOTHING``:
    it closes the connection without an answer at the request timeout), or None if that
    is not predicted (random bytes, or a head cut by the client ending its side)."""
    complete, too_large = decided(script.sent)
    if too_large:
        return 431
    if complete:
        return script.request.status
    if script.ending in ("eof", "close"):
        return None  # what came is the head
    return NOTHING


async def _scenario(scripts: list[Script], max_connections: int) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("nexus_trio.metrics")
    logger.addHandler(handler)
    try:
        async with open_test_kernel() as kernel:
            books = kernel.stats()
            renderer = MetricsRenderer(kernel, cache_seconds=0, process=False)
            baseline = tasks_living()
            outcomes = [Outcome(s) for s in scripts]
            with trio.fail_after(600):
                async with trio.open_nursery() as nursery:
                    serve = functools.partial(
                        serve_metrics,
                        kernel,
                        "127.0.0.1",
                        0,
                        renderer=renderer,
                        max_connections=max_connections,
                    )
                    port = await nursery.start(serve)
                    async with trio.open_nursery() as clients:
                        for outcome in outcomes:
                            clients.start_soon(run_client, port, outcome.script, outcome)
                    # The clients are done (those cut by the request timeout too), and
                    # their ends are in: each connection closes within the second of its
                    # drain (a scrape before would share a render still in progress for
                    # a client gone, of before the last refusals).
                    await trio.sleep(1.5)
                    endpoint = renderer.endpoint
                    assert endpoint is not None and endpoint.open == 0
                    final = await trio.open_tcp_stream("127.0.0.1", port)
                    async with final:
                        await final.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                        data = b""
                        while chunk := await final.receive_some(65536):
                            data += chunk
                    nursery.cancel_scope.cancel()
            assert tasks_living() == baseline, "the endpoint left tasks behind"
            assert endpoint.open == 0
            assert kernel.stats() == books
    finally:
        logger.removeHandler(handler)
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert not errors, errors
    assert parse_answer(data, head_only=False) == 200
    text = data.partition(b"\r\n\r\n")[2].decode()
    assert "\nnexus_kernel_up 1.0\n" in text
    # every client's connection and the last scrape's, each accepted once and closed
    assert endpoint.accepted == len(scripts) + 1
    refused = {
        int(s.labels["status"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "nexus_metrics_requests_refused_total"
    }
    assert refused == endpoint.refused
    check_answers(outcomes, endpoint.refused, endpoint.shed)
    cut_sooner = 0
    for outcome in outcomes:
        if outcome.answer == b"" and prediction(outcome.script) == NOTHING:
            # a head not all in: cut at the request timeout, 10 s after its accept; or,
            # with the endpoint at its limit, shed 2 s after its accept (each counted)
            if outcome.read_for < 10.0:
                cut_sooner += 1
                assert outcome.read_for >= SHED_AFTER and sheddable(outcome.script), outcome
            if endpoint.limited == 0:  # (accepted when it connected; none shed)
                assert abs(outcome.read_for - 10.0) < 1e-6, outcome
    assert cut_sooner <= endpoint.shed, (cut_sooner, endpoint)


def check_answers(outcomes: list[Outcome], refused: dict[int, int], shed: int = 0) -> None:
    """Each answer read is well-formed with the predicted status; the refusal counts are
    the refusals the clients were answered, give or take the connections whose answer
    nobody read (reset before it, or a head cut short). With ``shed`` connections shed
    at the limit, a client whose head was not all in 2 s after its accept may have had
    its connection closed without an answer (at most ``shed`` of them)."""
    known: collections.Counter[int] = collections.Counter()
    unknown: list[set[int]] = []
    maybe_shed = 0
    for outcome in outcomes:
        script, answer = outcome.script, outcome.answer
        expected = prediction(script)
        if shed and not answer and sheddable(script):
            # no answer read: it may have been shed before its head was all in (then
            # nothing was counted for it), or not (what follows)
            maybe_shed += 1
            unknown.append((set(REFUSALS) if expected is None else {expected}) | {NOTHING})
            continue
        if answer:
            if script.ending == "reset_mid_answer":
                got = int(answer.split(b" ", 2)[1])
            else:
                # (a head cut short asks no HEAD: its request line may be "HEA")
                head_only = None if expected is None else script.request.head
                got = parse_answer(answer, head_only)
            assert got != 500, (answer, script)
            assert expected is None or got == expected, (got, expected, script)
            known[got] += got in REFUSALS
        elif answer == b"":
            assert expected in (None, NOTHING), (expected, script)
            if decided(script.sent)[0] or script.ending == "eof":
                # a head all in (or ended by the client) gets an answer unless it has no
                # request line: only empty lines (docs/cli.md)
                head = script.sent.lstrip(b"\r\n")
                end = HEAD_END.search(head)
                assert (
                    not head[: None if end is None else end.start()].split(b"\n")[0].strip(b"\r")
                ), ("no answer to a request line", script)
        elif expected == NOTHING:
            pass  # reset, or read nothing before the request timeout: nothing counted
        elif script.ending == "close" and expected is not None:
            # the endpoint read it all, then its end: counted before any answer is sent
            known[expected] += expected in REFUSALS
        else:
            unknown.append((set(REFUSALS) if expected is None else {expected}) | {NOTHING})
    assert shed <= maybe_shed, (shed, maybe_shed)
    extra = {s: refused[s] - known[s] for s in REFUSALS}
    assert all(n >= 0 for n in extra.values()), (refused, known)
    assert sum(extra.values()) <= len(unknown), (refused, known, unknown)
    for s, n in extra.items():
        assert n <= sum(s in possible for possible in unknown), (refused, known, unknown)


@fault_settings(300)
@given(st.lists(scripts(), min_size=1, max_size=8), st.integers(1, 4))
def test_hostile_clients_never_stall_or_break_the_metrics_endpoint(
    clients: list[Script], max_connections: int
) -> None:
    run_on_mock_clock(functools.partial(_scenario, clients, max_connections), REAL_LIMIT)

"""The kill sweeps' rule (nexus_trio.bridges._guardian.Sweep) on a scripted /proc.

A process caught in the middle of its exec reads an empty environment (and ``env_end`` 0
in its stat) until the exec has set the new one up: the sweep reads it again instead of
passing it by. A child whose parent is ours is ours (same start time: a reused pid is
not). Nothing else is killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from typing import Any, ClassVar

import pytest

from nexus_trio.bridges import _guardian, _lineage

TOKEN = "4242-owner.child"
MARKED = f"PATH=/bin\0{_guardian.MARKER}={TOKEN}\0".encode()
MARKED_ELSEWHERE = f"{_guardian.MARKER}=9999-other.child\0".encode()
PLAIN = b"PATH=/bin\0HOME=/root\0"


def alive(
    parent: int = 1, started: int = 100, env_end: int = 0x7FFF0000, session: int = 1
) -> _guardian._Stat:
    return ("S", parent, 0, started, env_end, session)


def mid_exec(parent: int = 1, started: int = 100, session: int = 1) -> _guardian._Stat:
    return ("R", parent, 0, started, 0, session)


class FakeProc(_guardian.Proc):
    """A scripted /proc: each read of a pid gives the next of its answers (the last stays).

    ``None`` as an answer: the process is gone.
    """

    environs: dict[int, list[bytes | None]]
    stats: dict[int, list[_guardian._Stat | None]]
    reads: dict[int, int]
    kills: list[int]
    stat_reads: list[int]

    @classmethod
    def setup(
        cls,
        environs: dict[int, list[bytes | None]],
        stats: dict[int, list[_guardian._Stat | None]],
    ) -> None:
        cls.environs, cls.stats, cls.reads, cls.kills = environs, stats, {}, []
        cls.stat_reads = []

    @staticmethod
    def pids() -> list[int]:
        return sorted(FakeProc.environs)

    @staticmethod
    def environ(pid: int) -> bytes | None:
        answers = FakeProc.environs[pid]
        answer = answers[min(FakeProc.reads.get(pid, 0), len(answers) - 1)]
        FakeProc.reads[pid] = FakeProc.reads.get(pid, 0) + 1  # a read moves time on
        return answer

    @staticmethod
    def stat(pid: int) -> _guardian._Stat | None:
        FakeProc.stat_reads.append(pid)
        if pid not in FakeProc.stats:
            return None
        # the stat read after an environment read is of the same moment
        answers = FakeProc.stats[pid]
        return answers[min(max(FakeProc.reads.get(pid, 1) - 1, 0), len(answers) - 1)]

    @staticmethod
    def children(pid: int) -> list[int]:
        return [
            child
            for child, answers in FakeProc.stats.items()
            if answers[0] and answers[0][1] == pid
        ]

    @staticmethod
    def kill(pid: int, start: int) -> bool:
        FakeProc.kills.append(pid)
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def sweep(clock: Clock, for_seconds: float = 2.0) -> list[int]:
    return _guardian.Sweep("4242-owner.", FakeProc).run(for_seconds, clock.sleep, clock)


def test_a_process_read_in_the_middle_of_its_exec_is_read_again_and_killed(
    clock: Clock,
) -> None:
    """Regression: its environment read empty once, and the sweep ended without it."""
    FakeProc.setup(
        environs={10: [MARKED], 11: [b"", b"", MARKED]},
        stats={10: [alive()], 11: [mid_exec(), mid_exec(), alive()]},
    )
    assert sweep(clock) == [10, 11]
    assert FakeProc.kills == [10, 11]
    assert clock.sleeps == 2  # two pauses, then the exec was done


def test_a_process_mid_exec_that_turns_out_not_ours_is_left_alone(clock: Clock) -> None:
    FakeProc.setup(
        environs={10: [MARKED], 20: [b"", MARKED_ELSEWHERE], 21: [b"", PLAIN]},
        stats={10: [alive()], 20: [mid_exec(), alive()], 21: [mid_exec(), alive()]},
    )
    assert sweep(clock) == [10]
    assert clock.sleeps == 1


def test_an_empty_environment_after_the_exec_is_no_mark_and_costs_no_wait(clock: Clock) -> None:
    """A process started with no environment at all (``env -i``), a zombie and a kernel
    thread read empty too: not ours, and nothing to wait for."""
    FakeProc.setup(
        environs={10: [MARKED], 30: [b""], 31: [b""], 32: [b""]},
        stats={
            10: [alive()],
            30: [alive(env_end=0x7FFF1000)],
            31: [("Z", 1, 0, 100, 0, 1)],
            32: [("S", 2, _guardian._PF_KTHREAD, 100, 0, 1)],
        },
    )
    assert sweep(clock) == [10]
    assert clock.sleeps == 0


def test_an_empty_read_whose_exec_ended_before_its_stat_is_read_once_more(clock: Clock) -> None:
    """The environment read empty, but the stat read after it shows the exec done."""
    FakeProc.setup(environs={40: [b"", MARKED]}, stats={40: [alive()]})
    assert sweep(clock) == [40]
    assert clock.sleeps == 0


def test_a_process_that_stays_mid_exec_is_waited_for_until_the_deadline_only(
    clock: Clock,
) -> None:
    FakeProc.setup(environs={10: [MARKED], 50: [b""]}, stats={10: [alive()], 50: [mid_exec()]})
    assert sweep(clock, for_seconds=0.5) == [10]
    assert 0.5 <= clock.now < 0.5 + 2 * _guardian._EXEC_PAUSE


def test_a_child_of_a_process_of_ours_is_ours_even_without_the_mark(clock: Clock) -> None:
    """Descendants that dropped the mark (``env -i``) while their parent lives; a child
    read before its parent (a lower pid) too: a scan reads every process first."""
    FakeProc.setup(
        environs={5: [PLAIN], 10: [MARKED], 12: [PLAIN], 13: [b""], 14: [PLAIN]},
        stats={
            5: [alive(parent=10, started=300)],
            10: [alive(started=200)],
            12: [alive(parent=5, started=301)],
            13: [mid_exec(parent=10, started=302)],
            14: [alive(parent=1, started=303)],
        },
    )
    assert sorted(sweep(clock)) == [5, 10, 12, 13]
    assert clock.sleeps == 0  # 13 is ours by its parent: no need to wait for its exec


def test_a_reused_parent_pid_is_no_parent_of_ours(clock: Clock) -> None:
    """Pid 10 was ours and died; a new process got pid 10 (another start time) and forked
    pid 60 while a mid-exec process kept the sweep going: neither is taken."""
    FakeProc.setup(
        environs={10: [MARKED, PLAIN], 60: [None, PLAIN], 61: [None, b"", b"", PLAIN]},
        stats={
            10: [alive(started=200), alive(started=900)],
            60: [None, alive(parent=10, started=901)],
            61: [
                None,
                mid_exec(parent=10, started=902),
                mid_exec(parent=10, started=902),
                alive(parent=10, started=902),
            ],
        },
    )
    assert sweep(clock) == [10]


def test_a_process_killed_and_not_yet_gone_is_killed_once(clock: Clock) -> None:
    FakeProc.setup(
        environs={10: [MARKED], 11: [MARKED, MARKED, MARKED, None]},
        stats={10: [alive(), alive(), None], 11: [alive()]},
    )
    assert sweep(clock) == [10, 11]
    assert FakeProc.kills == [10, 11]


def test_the_sweeping_process_itself_is_never_killed(clock: Clock) -> None:
    import os

    FakeProc.setup(environs={os.getpid(): [MARKED]}, stats={os.getpid(): [alive()]})
    assert sweep(clock) == []


def test_a_sweep_that_finds_nothing_reads_no_stat_of_a_process_with_an_environment(
    clock: Clock,
) -> None:
    """The common case (a child that left nothing behind) costs what the marker reads
    cost: with no process of ours in sight, only an empty environment's stat is read."""
    FakeProc.setup(
        environs={70: [PLAIN], 71: [MARKED_ELSEWHERE], 72: [b""]},
        stats={70: [alive()], 71: [alive()], 72: [alive(env_end=0x7FFF1000)]},
    )
    assert sweep(clock) == []
    assert FakeProc.stat_reads == [72]


def test_the_child_s_session_takes_its_members_that_started_before_it_was_seen_gone(
    clock: Clock,
) -> None:
    """Item 2 of the forty-fourth pass: with the reaped child's session (its pid, 7, and
    when it was seen gone, tick 200), an unmarked process of that session with no parent
    that links it is ours (50, reparented to the sweeping process, the subreaper, and its
    child 51, mid-exec); one of a session of the same number whose members started later
    (52, a reused number: another program's) is not, nor one of another session (53)."""
    me = os.getpid()
    FakeProc.setup(
        environs={50: [PLAIN], 51: [b""], 52: [PLAIN], 53: [PLAIN]},
        stats={
            50: [alive(parent=me, session=7, started=150)],
            51: [mid_exec(parent=50, session=7, started=200)],
            52: [alive(parent=me, session=7, started=201)],
            53: [alive(parent=me, session=8, started=150)],
        },
    )
    killed = _guardian.Sweep("4242-owner.", FakeProc, session=(7, 200)).run(2.0, clock.sleep, clock)
    assert killed == [50, 51]
    assert clock.sleeps == 0  # (one of the session is not waited for mid-exec)
    # without the session: none of them (the escape the session closes)
    FakeProc.setup(
        environs={50: [PLAIN], 51: [PLAIN]},
        stats={
            50: [alive(parent=me, session=7, started=150)],
            51: [alive(parent=50, session=7, started=150)],
        },
    )
    assert sweep(clock) == []


def test_with_no_orphan_of_the_session_a_scan_reads_no_stat_of_the_others(clock: Clock) -> None:
    """The session costs a read of the sweeping process's children's stats, not of every
    process's, when none of them is of the child's session (the common case)."""
    me = os.getpid()
    FakeProc.setup(
        environs={60: [PLAIN], 61: [PLAIN], 62: [PLAIN]},
        stats={
            60: [alive(parent=me, session=60, started=150)],  # another agent's child
            61: [alive(parent=1, session=7, started=150)],  # (not reached: nothing links it)
            62: [alive(parent=1, session=9, started=150)],
        },
    )
    assert _guardian.Sweep("4242-owner.", FakeProc, session=(7, 200)).run(0.0) == []
    assert FakeProc.stat_reads == [60]


class NoChildLists(FakeProc):
    """A /proc without ``task/<tid>/children`` (a kernel built without
    ``CONFIG_PROC_CHILDREN``): the children of a process are unknown."""

    @staticmethod
    def children(pid: int) -> list[int] | None:
        return None


def test_with_no_children_lists_the_session_s_orphan_is_still_found(clock: Clock) -> None:
    """Forty-fourth pass (review): with the lists of the sweeping process's children
    unreadable, an orphan of the child's session (50, unmarked, reparented to the
    sweeping process) was not looked for (``children`` gave [] and no stat was read): it
    outlived the stop. Unknown children now mean every stat is read."""
    me = os.getpid()
    FakeProc.setup(
        environs={50: [PLAIN], 53: [PLAIN]},
        stats={
            50: [alive(parent=me, session=7, started=150)],
            53: [alive(parent=me, session=8, started=150)],
        },
    )
    killed = _guardian.Sweep("4242-owner.", NoChildLists, session=(7, 200))
    assert killed.run(2.0, clock.sleep, clock) == [50]


def test_the_guardian_takes_the_members_of_the_sessions_it_was_told_of(clock: Clock) -> None:
    """Item 2 of the forty-fifth pass: at the kernel's death the guardian sweeps the
    sessions the kernel told it of, each up to its bound, and it reads every stat (an
    orphan of the session hangs off no process of its own: 50's parent is init now)."""
    FakeProc.setup(
        environs={50: [PLAIN], 51: [PLAIN], 52: [PLAIN], 53: [PLAIN]},
        stats={
            50: [alive(parent=1, session=7, started=150)],
            51: [alive(parent=1, session=8, started=150)],  # a session seen gone at 100
            52: [alive(parent=1, session=9, started=150)],  # a session not told of
            53: [alive(parent=1, session=8, started=90)],
        },
    )
    sweep = _guardian.Sweep("4242-owner.", FakeProc, sessions={7: 200, 8: 100}, orphans_here=False)
    assert sweep.run(2.0, clock.sleep, clock) == [50, 53]
    # the kernel's own sweeps look for such an orphan among their children first: none here
    FakeProc.setup(environs={50: [PLAIN]}, stats={50: [alive(parent=1, session=7, started=150)]})
    assert _guardian.Sweep("4242-owner.", FakeProc, sessions={7: 200}).run(0.0) == []


def test_the_guardian_s_sessions_follow_the_kernel_s_notes() -> None:
    """``+SID`` a child started, ``=SID TICKS`` it was seen gone, ``-SID`` its sweep is
    done; a line cut short (the kernel died in the middle of it: it is not taken, ``+1``
    of ``+123`` would name another session) or not understood is passed by."""
    sessions = _guardian.Sessions()
    for line in [b"+7\n", b"+8\n", b"=8 150\n", b"+9\n", b"-9\n", b"=10 5\n"]:
        sessions.note(line)
    for bad in [b"+12", b"+x\n", b"=7\n", b"?3\n", b"\n", b"=7 z\n"]:
        sessions.note(bad)
    assert sessions.bounds(now=300) == {7: 300, 8: 150}


class Holders(FakeProc):
    """A scripted /proc where process 70 holds the hold ``pipe:[7]``."""

    fd_reads: ClassVar[list[int]] = []

    @staticmethod
    def holds(pid: int, links: Any) -> bool:
        Holders.fd_reads.append(pid)
        return pid == 70 and "pipe:[7]" in links


def test_the_holders_of_the_child_s_hold_are_ours_and_no_fd_is_read_when_none_is_left(
    clock: Clock,
) -> None:
    """Item 1 of the forty-fifth pass: a process that holds the child's hold is ours,
    mark, parent and session or not (70, its parent init, another session; 72, its
    child, by the parent link); one that does not is not (73). When the kernel's end
    says nobody holds it (the common case) no process's descriptors are read."""
    FakeProc.setup(
        environs={70: [PLAIN], 72: [PLAIN], 73: [PLAIN]},
        stats={
            70: [alive(parent=1, session=70, started=150)],
            72: [alive(parent=70, session=70, started=160)],
            73: [alive(parent=1, session=73, started=150)],
        },
    )
    Holders.fd_reads = []
    sweep = _guardian.Sweep("4242-owner.", Holders, holds=lambda: ("pipe:[7]",))
    assert sweep.run(2.0, clock.sleep, clock) == [70, 72]
    Holders.fd_reads = []
    assert _guardian.Sweep("4242-owner.", Holders, holds=lambda: ()).run(0.0) == []
    assert Holders.fd_reads == []


@pytest.mark.skipif(
    not os.path.isdir("/proc/self/fdinfo"), reason="file descriptors read in Linux /proc"
)
def test_a_holder_holds_the_read_end_a_copy_of_the_write_end_is_no_hold() -> None:
    """A process with the hold's read end holds it; one with only a copy of the write
    end (forked from the kernel process without an exec) does not, though both ends
    read the same ``pipe:[<inode>]`` link (on a reading of the link only: both held)."""
    read_end, write_end = os.pipe()
    link = f"pipe:[{os.fstat(write_end).st_ino}]"
    procs = []
    try:
        for fd in (read_end, write_end):
            procs.append(subprocess.Popen(["sleep", "30"], pass_fds=(fd,)))
        reader, writer = procs
        assert _guardian.Proc.holds(reader.pid, {link})
        assert not _guardian.Proc.holds(writer.pid, {link})
        assert not _guardian.Proc.holds(reader.pid, {"pipe:[1]"})
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        os.close(read_end)
        os.close(write_end)


def test_the_guardian_s_sessions_carry_the_children_s_holds() -> None:
    sessions = _guardian.Sessions()
    for line in [b"+7 1234\n", b"+8 99\n", b"+9\n", b"-8\n"]:
        sessions.note(line)
    assert sessions.holds == {7: "pipe:[1234]"}
    assert sessions.bounds(now=5) == {7: 5, 9: 5}


def test_the_children_of_a_process_are_none_when_no_list_can_be_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Proc.children`` says None (unknown), not [] (no child), when no thread's
    ``children`` file can be read: [] would have the sweep skip the session's orphans."""
    real_open = open

    def no_child_lists(path: str, *args: Any, **kwargs: Any) -> Any:
        if str(path).endswith("/children"):
            raise FileNotFoundError(2, "No such file or directory", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(_guardian, "open", no_child_lists, raising=False)
    assert _guardian.Proc.children(os.getpid()) is None


@pytest.mark.skipif(
    not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"),
    reason="needs the children lists of /proc (CONFIG_PROC_CHILDREN)",
)
def test_a_thread_that_ends_as_its_children_are_read_leaves_the_others_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A thread of the sweeping process (a worker thread retiring) that ends between the
    listing of its threads and the read of its ``children`` file cut the read of the
    threads after it: a child of one of those was not seen. Here the main thread's list,
    read first, is gone; a child started by another thread is still found."""
    me = os.getpid()
    started: list[subprocess.Popen[bytes]] = []
    ready, done = threading.Event(), threading.Event()

    def start_child() -> None:  # its parent is this thread, which stays until the end
        try:
            started.append(subprocess.Popen(["sleep", "300"]))
        finally:
            ready.set()
        done.wait()

    thread = threading.Thread(target=start_child)
    thread.start()
    try:
        ready.wait()
        child = started[0].pid
        real_open, real_listdir = open, os.listdir

        def main_thread_gone(path: str, *args: Any, **kwargs: Any) -> Any:
            if str(path) == f"/proc/{me}/task/{me}/children":
                raise FileNotFoundError(2, "No such file or directory", path)
            return real_open(path, *args, **kwargs)

        def main_thread_first(path: Any) -> list[str]:
            entries = real_listdir(path)
            if str(path) == f"/proc/{me}/task":
                entries = sorted(entries, key=lambda tid: tid != str(me))
            return entries

        monkeypatch.setattr(_guardian, "open", main_thread_gone, raising=False)
        monkeypatch.setattr(_guardian.os, "listdir", main_thread_first)
        found = _guardian.Proc.children(me)
        monkeypatch.undo()
        assert found is not None and child in found
    finally:
        for process in started:
            process.kill()
            process.wait()
        done.set()
        thread.join()


class Branded(FakeProc):
    """A scripted /proc whose processes carry the brands of ``brands``."""

    brands: ClassVar[dict[int, int]] = {}
    brand_reads: ClassVar[list[int]] = []

    @staticmethod
    def brand(pid: int) -> int | None:
        Branded.brand_reads.append(pid)
        return Branded.brands.get(pid)


OWNER = "4242-0123456789abcdef"
BRAND = _guardian.brand_prefix(OWNER) << _guardian.BRAND_BITS | 5


def test_the_sweeper_s_children_with_the_child_s_brand_are_ours_with_their_descendants(
    clock: Clock,
) -> None:
    """Item 1 of the forty-sixth pass: a child of the sweeping process (the subreaper)
    that carries the exited child's brand is ours, mark, session and hold or not (80),
    and so are its descendants (81, by the parent link). Not taken: one with another
    child's brand (85), one with another kernel's (82), one branded but not the
    sweeper's child (83: its brand is not even read; its topmost orphaned ancestor would
    be), a live agent's child (84, ``not_ours``: not read). The guardian (its orphans
    are no child of its) reads every process's brand and takes its kernel's."""
    me = os.getpid()
    FakeProc.setup(
        environs={pid: [PLAIN] for pid in (80, 81, 82, 83, 84, 85)},
        stats={
            80: [alive(parent=me, session=80)],
            81: [alive(parent=80, session=80)],
            82: [alive(parent=me, session=82)],
            83: [alive(parent=1, session=83)],
            84: [alive(parent=me, session=84)],
            85: [alive(parent=me, session=85)],
        },
    )
    other_kernel = _guardian.brand_prefix("9999-fedcba9876543210") << _guardian.BRAND_BITS
    Branded.brands = {80: BRAND, 82: other_kernel | 5, 83: BRAND, 84: BRAND, 85: BRAND + 1}
    Branded.brand_reads = []
    kernel = _guardian.Sweep("4242-owner.", Branded, brands=BRAND.__eq__, not_ours={84})
    assert kernel.run(2.0, clock.sleep, clock) == [80, 81]
    assert 83 not in Branded.brand_reads and 84 not in Branded.brand_reads
    prefix = _guardian.brand_prefix(OWNER)
    guardian = _guardian.Sweep(
        "4242-owner.",
        Branded,
        orphans_here=False,
        brands=lambda brand: brand >> _guardian.BRAND_BITS == prefix,
    )
    assert guardian.run(2.0, clock.sleep, clock) == [80, 83, 84, 85, 81]


def test_a_sweep_without_brands_reads_none() -> None:
    FakeProc.setup(environs={80: [PLAIN]}, stats={80: [alive(parent=os.getpid())]})
    Branded.brands, Branded.brand_reads = {80: BRAND}, []
    assert _guardian.Sweep("4242-owner.", Branded).run(0.0) == []
    assert Branded.brand_reads == []


def test_brands_fit_below_2_63_and_name_their_kernel() -> None:
    assert _guardian.brand_prefix(OWNER) != _guardian.brand_prefix("4242-fedcba9876543210")
    assert _guardian.brand_prefix("not-hex") == 1 << 42  # (no owner of ours)
    assert BRAND < 2**63 and (BRAND | 0xFFFFF) >> _guardian.BRAND_BITS == BRAND >> 20


@pytest.mark.skipif(not os.path.isfile("/proc/self/limits"), reason="limits read in Linux /proc")
def test_a_child_s_brand_is_read_from_its_limits_also_as_a_zombie() -> None:
    """The brand is the soft value of RLIMIT_LOCKS, set on the child by ``prlimit``: read
    while it runs and once it is a zombie (the one an escapee leaves to be reaped)."""
    import resource

    child = subprocess.Popen(["sleep", "30"])
    try:
        resource.prlimit(child.pid, _guardian.BRAND_LIMIT, (BRAND, resource.RLIM_INFINITY))
        assert _guardian.Proc.brand(child.pid) == BRAND
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # a zombie, not reaped
        assert _guardian.Proc.brand(child.pid) == BRAND
    finally:
        child.kill()
        child.wait()
    assert _guardian.Proc.brand(child.pid) is None


def test_a_live_agent_s_child_is_not_read_for_the_session_s_orphans(clock: Clock) -> None:
    """The sweeping process's children that are live agents' children (``not_ours``,
    each in a session of its own) have no stat read when a session's orphans are looked
    for; its other children do (90)."""
    me = os.getpid()
    FakeProc.setup(
        environs={90: [PLAIN], 91: [PLAIN]},
        stats={90: [alive(parent=me, session=90)], 91: [alive(parent=me, session=91)]},
    )
    sweep = _guardian.Sweep("4242-owner.", FakeProc, session=(50, 200), not_ours={91})
    assert sweep.run(0.0, clock.sleep, clock) == []
    assert FakeProc.stat_reads == [90]


@pytest.mark.skipif(not _lineage.SUPPORTED, reason="brands are Linux's")
def test_a_child_branded_while_orphans_are_reaped_is_left_to_its_own_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forty-sixth pass, review: ``reap_orphans`` took the live children's pids before it
    read the children, so a process agent's child started and branded in between (a
    restart, in the main thread, while an agent's sweep ran in its worker thread) that
    exited at once was taken for an escapee and reaped: its ``trio.Process`` (here its
    ``Popen``) then read exit status 0 (ECHILD), whatever it was. A zombie with a brand of
    this kernel is asked about after its brand is read. (Fails on 0b0bac6: 1 reaped, exit
    0 for 3; checked by running this test there.)"""
    child = subprocess.Popen(["sh", "-c", "read line; exit 3"], stdin=subprocess.PIPE)
    children = _lineage.Proc.children
    brands: list[int | None] = []

    class StartedMeanwhile(_lineage.Proc):
        @staticmethod
        def children(pid: int) -> list[int] | None:
            # (the main thread's spawn, between the sweep's start and its read)
            brands.append(_lineage.brand(child.pid))
            assert child.stdin is not None
            child.stdin.close()
            os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # a zombie, not reaped
            return children(pid)

    monkeypatch.setattr(_lineage, "Proc", StartedMeanwhile)
    try:
        assert _lineage.reap_orphans() == []
        assert brands[0] is not None  # (branded: its zombie carries the kernel's brand)
        assert child.wait() == 3
    finally:
        _lineage.unbrand(child.pid, brands[0] if brands else None)
        child.kill()
        child.wait()


class PinnedProc(FakeProc):
    """:class:`FakeProc` with the real kill's check (``Proc.kill``): the pin of a pid
    moves its time on (the reads after it are of the later moment), the signal is
    recorded."""

    @classmethod
    def kill(cls, pid: int, start: int) -> bool:
        return super(FakeProc, cls).kill(pid, start)

    @staticmethod
    def pin(pid: int) -> int | None:
        FakeProc.reads[pid] = FakeProc.reads.get(pid, 0) + 1
        return None

    @staticmethod
    def send_kill(pid: int, pidfd: int | None) -> None:
        FakeProc.kills.append(pid)


def test_a_pid_reused_between_the_read_and_the_kill_is_not_killed(clock: Clock) -> None:
    """Forty-sixth pass (review): the sweep read a process, then sent a plain
    ``kill(pid)``: a pid reused between the read and the kill (an unrelated process)
    was killed. The kill pins the pid (a pidfd), reads its start time again and signals
    only the process it read: pid 11, marked at the scan (started at 100), is another
    process by the kill (started at 700, no mark): not killed, counted in ``reused``;
    10, the same by its kill, is. (Fails with a mutant of ``Proc.kill`` that signals
    without the check: kills [10, 11].)"""
    FakeProc.setup(
        environs={10: [MARKED, MARKED, None], 11: [MARKED, PLAIN]},
        stats={10: [alive(), alive(), None], 11: [alive(started=100), alive(started=700)]},
    )
    sweeper = _guardian.Sweep("4242-owner.", PinnedProc)
    assert sweeper.run(2.0, clock.sleep, clock) == [10]
    assert (FakeProc.kills, sweeper.reused) == ([10], [11])


def test_the_kill_signals_the_process_read_and_no_other() -> None:
    """The real ``Proc.kill`` (a pidfd where supported): a process whose start time is
    not the one read is not signalled; with the one read, it is SIGKILLed."""
    child = subprocess.Popen(["sleep", "30"])
    try:
        stat = _guardian.Proc.stat(child.pid)
        assert stat is not None
        assert _guardian.Proc.kill(child.pid, stat[3] + 1) is False
        assert child.poll() is None
        assert _guardian.Proc.kill(child.pid, stat[3]) is True
        assert child.wait(timeout=10) == -9
    finally:
        child.kill()
        child.wait()


@pytest.mark.skipif(not _lineage.SUPPORTED, reason="brands are Linux's")
@pytest.mark.skipif(_lineage.limits_wrapper() is None, reason="needs util-linux's prlimit(1)")
def test_a_child_that_carries_its_brand_from_its_exec_is_left_to_its_own_wait() -> None:
    """Forty-eighth pass: a child started through ``prlimit(1)`` carries its brand from
    its exec, before the kernel knows its pid; one that exits at once is a zombie with a
    brand of this kernel that is no known child's. ``reap_orphans`` leaves it (its brand
    is a starting one) to its ``trio.Process`` (here its ``Popen``), whose exit status
    stays 3. (Fails with the check of starting brands taken out of ``reap_orphans``:
    reaped, exit status 0; checked by that mutant.)"""
    value = _lineage.new_brand()
    wrapping = _lineage.wrapped(["sh", "-c", "exit 3"], value)
    assert wrapping is not None and wrapping[1] == value
    child = subprocess.Popen(wrapping[0])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # a zombie, not reaped
        assert _lineage.Proc.brand(child.pid) == value
        assert _lineage.reap_orphans() == []
        assert child.wait() == 3
    finally:
        _lineage.brand_dropped(value)
        child.kill()


@pytest.mark.skipif(not _lineage.SUPPORTED, reason="the brands and the reaper are Linux's")
def test_a_fork_while_a_thread_holds_the_lineage_lock_can_start_children() -> None:
    """Review of the forty-eighth pass: the reaper thread of process agents takes
    ``_lineage``'s lock each second (``children_live``, ``reap_orphans``), and a process
    forked by another thread at that moment (``os.fork``, multiprocessing's ``fork``)
    inherited the lock held by a thread it does not have: its first process agent's
    start (``owner()``, ``new_brand()``, ``mark()``) hung for good. A forked child gets
    a lock of its own now. A thread holds the lock across the fork here; the child asks
    for its owner and a brand under a 10 s alarm. (Fails on ede5896c's _lineage.py:
    the child is killed by its SIGALRM, exit code -14.)"""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with _lineage._lock:
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        pid = os.fork()
        if pid == 0:  # (the child: never back into pytest)
            code = 3
            try:
                signal.alarm(10)
                _lineage.owner()
                _lineage.brand_dropped(_lineage.new_brand())
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
    finally:
        release.set()
        holder.join()
    assert os.waitstatus_to_exitcode(status) == 0

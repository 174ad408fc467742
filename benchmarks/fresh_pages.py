"""What a fresh page costs this machine: touched one at a time, or populated in bulk.

    python benchmarks/fresh_pages.py [--mib 256] [--rounds 3] [--json]
    python benchmarks/fresh_pages.py --lifecycle 100000 [--rounds 3] [--pad-mib 1024]
    python benchmarks/fresh_pages.py --curve 8192 [--step-mib 256]

An idle agent's first message makes about 7.1 KB that the run keeps (see
``activation_memory.py``): 1.77 fresh 4 KiB pages, each a minor page fault whose system
time is the machine's. The first form measures that price with no Python objects in the
way, in a fresh process per way and round (alternated): ``touch`` writes one byte a page
of a fresh anonymous mapping (what the allocator's arenas get as objects fill them),
``populate`` maps it with ``MAP_POPULATE`` and ``madvise`` asks ``MADV_POPULATE_WRITE``
of it (Linux 5.14+), both faulting every page in one system call. Reported: system CPU
per page, minor faults per page, wall time, and the machine's transparent huge pages
setting (``thp``). Every process measures 4 KiB pages whatever that setting: it turns
transparent huge pages off for itself (``prctl(PR_SET_THP_DISABLE)``, which covers
``MAP_POPULATE`` too) before it maps anything, so a machine set to ``always`` does not
fault a 2 MiB page where the measurement counts 512 small ones.

The second form runs ``nexus_trio.bench._scale``'s ``lifecycle`` measurement (spawn N,
one message each, shut down) three ways, alternated, in fresh processes: as it comes
(pymalloc), with glibc's allocator and a ``top_pad`` of ``--pad-mib`` (1 GiB) (``PYTHONMALLOC=malloc
GLIBC_TUNABLES=glibc.malloc.top_pad=...``: the heap grows a GiB at a time, untouched),
and the same with that heap populated by one ``MADV_POPULATE_WRITE`` as the delivery
phase starts (inside its CPU time). pymalloc's own arenas cannot be populated from
Python (they are ``mmap``ed one MiB at a time, at addresses Python does not expose), so
this is what pre-faulting would save, not something the kernel can do. (Its processes
too run without transparent huge pages.)

The third form prices fresh pages by how much memory the process already holds: one
process touches ``--curve`` MiB a ``--step-mib`` step at a time, keeping every step
mapped, and reports the system CPU per page of each step, with ``dear_from_mib``: where
the price first reaches three times that of the first steps (``None`` if it never does).
On the Firecracker VM of these benchmarks that is where the process runs out of the free
memory the host still backs (what the VM's processes freed in the minutes before): such a
page costs 1-2 us, a page beyond it 5-12 us (likely the host's own fault under the
guest's), and after a quiet hour there may be none (see docs/benchmarks-history.md,
thirty-seventh pass). Reported beside: the guest's free page reporting order (``None``
without free page reporting: freed blocks of that order are handed back to the host)
and the largest order its buddy allocator makes. A million agents touch about 7.5 GB in
their first messages: this tells beforehand what the 1M row's faults will cost.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MADV_POPULATE_WRITE = 23
PR_SET_THP_DISABLE = 41
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
BUDDYINFO = Path("/proc/buddyinfo")
MEMINFO = Path("/proc/meminfo")
#: a step is dear at this many times the price of the first steps
DEAR = 3.0
WAYS = ("touch", "populate", "madvise")
LIFECYCLE_WAYS = ("pymalloc", "malloc+pad", "malloc+pad+populate")
#: every way ``--ways`` takes: the default three, glibc's allocator as it comes, and two
#: ways to transparent huge pages on a machine set to ``madvise``: glibc's heap advised
#: (``glibc.malloc.hugetlb=1``) and pymalloc's arenas advised (``thp_arenas.c``)
ALL_LIFECYCLE_WAYS = (*LIFECYCLE_WAYS, "malloc", "malloc+thp", "pymalloc+thp")
THP_ARENAS = Path(__file__).resolve().parent / "thp_arenas.c"
VMSTAT = Path("/proc/vmstat")
REPO = Path(__file__).resolve().parent.parent


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def _libc() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    return libc


def thp_setting() -> str:
    """The machine's transparent huge pages setting (the bracketed word of sysfs's
    ``enabled``: ``always``, ``madvise`` or ``never``), or ``unknown``."""
    try:
        text = THP_SETTING.read_text(encoding="ascii")
    except OSError:
        return "unknown"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unknown"


def small_pages_only() -> None:
    """Turn transparent huge pages off for this process (and its children), so fresh
    anonymous memory faults 4 KiB at a time whatever the machine's setting (Linux 3.15+;
    it overrides ``MADV_HUGEPAGE`` and applies to ``MAP_POPULATE`` alike)."""
    if _libc().prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        raise SystemExit(
            f"fresh_pages: prctl(PR_SET_THP_DISABLE) failed (errno {ctypes.get_errno()}):"
            " cannot measure 4 KiB pages with transparent huge pages on"
        )


def fault_pages(way: str, size: int) -> dict[str, Any]:
    """Fault in ``size`` bytes of fresh anonymous memory one way (in this process, whose
    transparent huge pages it turns off)."""
    if way not in WAYS:
        raise ValueError(f"fresh_pages: unknown way {way!r}; expected one of {WAYS}")
    if not hasattr(mmap, "MAP_POPULATE"):
        raise SystemExit("fresh_pages: needs Linux (MAP_POPULATE, MADV_POPULATE_WRITE)")
    small_pages_only()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    u0, t0 = _usage(), time.perf_counter()
    if way == "populate":
        area = mmap.mmap(-1, size, flags=flags | mmap.MAP_POPULATE)
    else:
        area = mmap.mmap(-1, size, flags=flags)
        view = memoryview(area)
        if way == "touch":
            for offset in range(0, size, mmap.PAGESIZE):
                view[offset] = 1
        else:
            address = ctypes.addressof(ctypes.c_char.from_buffer(area))
            if _libc().madvise(address, size, MADV_POPULATE_WRITE) != 0:
                raise SystemExit(
                    f"fresh_pages: MADV_POPULATE_WRITE failed (errno {ctypes.get_errno()})"
                )
        view.release()
    wall = time.perf_counter() - t0
    u1 = _usage()
    pages = size // mmap.PAGESIZE
    return {
        "way": way,
        "pages": pages,
        "sys_us_per_page": 1e6 * (u1[1] - u0[1]) / pages,
        "faults_per_page": (u1[2] - u0[2]) / pages,
        "wall_s": wall,
        "thp": thp_setting(),
    }


def page_reporting_order() -> int | None:
    """The guest's free page reporting order (free blocks of ``2**order`` pages are
    handed back to the host), or None where the machine has none (no such module)."""
    try:
        order = int(REPORTING_ORDER.read_text(encoding="ascii"))
    except (OSError, ValueError):
        return None
    # (unset until a device registers: -1, shown as an unsigned int)
    return order if 0 <= order < 64 else None


def max_page_order() -> int | None:
    """The largest block order the buddy allocator makes (``/proc/buddyinfo`` has a
    column per order from 0), or None if unreadable."""
    try:
        line = BUDDYINFO.read_text(encoding="ascii").splitlines()[0]
    except (OSError, IndexError):
        return None
    return len(line.split()) - 4 - 1


def available_mib() -> int | None:
    """``MemAvailable`` in MiB, or None if unreadable."""
    try:
        for line in MEMINFO.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) >> 10
    except (OSError, ValueError):
        return None
    return None


def dear_from(prices: list[float], step_mib: int) -> int | None:
    """Where (MiB already held) a step first costs :data:`DEAR` times the median of the
    first steps (up to four, or half of them), or None."""
    first = sorted(prices[: max(1, min(4, len(prices) // 2))])
    cheap = first[len(first) // 2]
    for k, price in enumerate(prices):
        if cheap > 0 and price >= DEAR * cheap:
            return k * step_mib
    return None


def curve(total: int, step: int) -> dict[str, Any]:
    """Touch ``total`` bytes of fresh anonymous memory ``step`` bytes at a time, each
    step kept mapped (in this process, whose transparent huge pages it turns off); the
    system CPU per page of each step."""
    small_pages_only()
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    held = []
    prices = []
    faults = 0
    for _ in range(total // step):
        area = mmap.mmap(-1, step, flags=flags)
        held.append(area)
        view = memoryview(area)
        u0 = _usage()
        for offset in range(0, step, mmap.PAGESIZE):
            view[offset] = 1
        u1 = _usage()
        view.release()
        pages = step // mmap.PAGESIZE
        prices.append(round(1e6 * (u1[1] - u0[1]) / pages, 3))
        faults += u1[2] - u0[2]
    step_mib = step >> 20
    pages = len(held) * (step // mmap.PAGESIZE)
    for area in held:
        area.close()
    return {
        "mib": total >> 20,
        "step_mib": step_mib,
        "sys_us_per_page": prices,
        "faults_per_page": faults / pages,
        "dear_from_mib": dear_from(prices, step_mib),
        "page_reporting_order": page_reporting_order(),
        "max_page_order": max_page_order(),
        "thp": thp_setting(),
    }


def _populate_heap() -> int:
    """One MADV_POPULATE_WRITE over the glibc heap (with ``top_pad``: its untouched tail
    is faulted in); its size in bytes."""
    with open("/proc/self/maps", encoding="ascii") as maps:
        for line in maps:
            if line.rstrip().endswith("[heap]"):
                low, high = (int(x, 16) for x in line.split()[0].split("-"))
                if _libc().madvise(low, high - low, MADV_POPULATE_WRITE) != 0:
                    raise SystemExit(f"fresh_pages: populate failed ({ctypes.get_errno()})")
                return high - low
    raise SystemExit("fresh_pages: no [heap] mapping to populate")


def thp_faults() -> int:
    """The machine's huge pages faulted so far (``thp_fault_alloc`` of ``/proc/vmstat``,
    every process's), or 0 where it is unreadable."""
    try:
        for line in VMSTAT.read_text(encoding="ascii").splitlines():
            if line.startswith("thp_fault_alloc "):
                return int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return 0


def build_thp_arenas(directory: Path) -> Path:
    """Compile ``thp_arenas.c`` into ``directory`` with the system's ``cc``; the shared
    object's path."""
    target = directory / "thp_arenas.so"
    try:
        subprocess.run(
            ["cc", "-O2", "-shared", "-fPIC", "-o", str(target), str(THP_ARENAS)],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        raise SystemExit(
            f"fresh_pages: the way pymalloc+thp needs a C compiler (cc) to build {THP_ARENAS.name}:"
            f" {detail}"
        ) from None
    return target


def lifecycle(n: int, populate: bool) -> dict[str, Any]:
    """``_scale``'s lifecycle measurement; ``populate``: the heap populated as its
    delivery phase starts (after the phase's first ``getrusage``, so inside its CPU).
    Small pages only, unless ``FRESH_PAGES_HUGE=1`` (the ``+thp`` ways); with
    ``FRESH_PAGES_ARENAS`` (a built ``thp_arenas.so``), pymalloc's arenas from then on
    come from its advised region."""
    if os.environ.get("FRESH_PAGES_HUGE") != "1":
        small_pages_only()
    arenas = os.environ.get("FRESH_PAGES_ARENAS")
    if arenas:
        ctypes.CDLL(arenas).fresh_pages_install()
    from nexus_trio.bench import _scale

    usage_now = _scale.usage_now
    calls = [0]
    heap = [0]

    def marked() -> Any:
        usage = usage_now()
        if calls[0] == 1 and populate:
            heap[0] = _populate_heap()
        calls[0] += 1
        return usage

    _scale.usage_now = marked
    huge = thp_faults()
    result = _scale.measure("lifecycle", n)
    huge = thp_faults() - huge
    if result["handled"] != n or result["dead_lettered"]:
        raise SystemExit(f"fresh_pages: handled {result['handled']} of {n}")
    return {
        **result,
        "heap_populated_mib": heap[0] / (1 << 20),
        "thp": thp_setting(),
        "thp_faults": huge,
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def lifecycle_env(way: str, pad_mib: int, arenas: Path | None) -> dict[str, str]:
    """The environment of a lifecycle child run ``way`` (one of
    :data:`ALL_LIFECYCLE_WAYS`)."""
    if way == "pymalloc":
        return {}
    if way == "pymalloc+thp":
        if arenas is None:
            raise ValueError("fresh_pages: the way pymalloc+thp needs thp_arenas.so built")
        return {"FRESH_PAGES_HUGE": "1", "FRESH_PAGES_ARENAS": str(arenas)}
    if way == "malloc":
        return {"PYTHONMALLOC": "malloc"}
    if way == "malloc+thp":
        return {
            "PYTHONMALLOC": "malloc",
            "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
            "FRESH_PAGES_HUGE": "1",
        }
    if way in LIFECYCLE_WAYS:
        return {
            "PYTHONMALLOC": "malloc",
            "GLIBC_TUNABLES": f"glibc.malloc.top_pad={pad_mib << 20}",
            "FRESH_PAGES_POPULATE": "1" if way.endswith("populate") else "0",
        }
    raise ValueError(f"fresh_pages: unknown way {way!r}; expected one of {ALL_LIFECYCLE_WAYS}")


def _child(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )
    if proc.returncode != 0:
        raise SystemExit(f"fresh_pages: child {args} failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lifecycle", type=int, metavar="AGENTS")
    parser.add_argument("--pad-mib", type=int, default=1024)
    parser.add_argument(
        "--ways",
        help=f"with --lifecycle: which ways, comma-separated, of {','.join(ALL_LIFECYCLE_WAYS)}"
        f" (default {','.join(LIFECYCLE_WAYS)})",
    )
    parser.add_argument("--curve", type=int, metavar="MIB")
    parser.add_argument("--step-mib", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.mib, args.rounds, args.pad_mib, args.lifecycle or 1) < 1:
        parser.error("--mib, --rounds, --pad-mib and --lifecycle must be at least 1")
    ways = LIFECYCLE_WAYS if args.lifecycle else WAYS
    if args.ways is not None:
        if not args.lifecycle:
            parser.error("--ways goes with --lifecycle")
        ways = tuple(args.ways.split(","))
        unknown = [way for way in ways if way not in ALL_LIFECYCLE_WAYS]
        if unknown or len(set(ways)) != len(ways):
            parser.error(
                f"--ways {args.ways!r}: each of {','.join(ALL_LIFECYCLE_WAYS)} at most once"
                + (f" (unknown: {','.join(unknown)})" if unknown else "")
            )
    if args.curve is not None:
        if args.step_mib < 1 or args.curve < args.step_mib:
            parser.error("--step-mib must be at least 1 and --curve at least --step-mib")
        available = available_mib()
        if available is not None and args.curve > available - 512:
            parser.error(
                f"--curve {args.curve} MiB would leave this machine less than 512 MiB"
                f" (MemAvailable is {available} MiB)"
            )
    if args.child:
        kind, value = args.child[0], int(args.child[1])
        if kind == "lifecycle":
            result = lifecycle(value, os.environ.get("FRESH_PAGES_POPULATE") == "1")
        elif kind == "curve":
            result = curve(value, int(args.child[2]))
        else:
            result = fault_pages(kind, value)
        print(json.dumps(result))
        return
    if args.curve is not None:
        result = _child(["curve", str(args.curve << 20), str(args.step_mib << 20)])
        if args.json:
            print(json.dumps(result))
        else:
            for k, price in enumerate(result["sys_us_per_page"]):
                print(f"{k * args.step_mib:>7} MiB held: {price:.2f} us sys a page")
            print(
                f"dear from {result['dear_from_mib']} MiB; page_reporting_order"
                f" {result['page_reporting_order']}, max_page_order {result['max_page_order']},"
                f" thp {result['thp']}"
            )
        return
    with tempfile.TemporaryDirectory(prefix="fresh_pages-") as scratch:
        arenas = build_thp_arenas(Path(scratch)) if "pymalloc+thp" in ways else None
        rows = _rounds(args, ways, arenas)
    if args.json:
        print(json.dumps(rows))


def _rounds(args: argparse.Namespace, ways: tuple[str, ...], arenas: Path | None) -> list[Any]:
    rows = []
    for round_ in range(1, args.rounds + 1):
        for way in ways if round_ % 2 else ways[::-1]:
            if args.lifecycle:
                env = lifecycle_env(way, args.pad_mib, arenas)
                r = _child(["lifecycle", str(args.lifecycle)], env)
                d, s, x = r["deliver_usage"], r["spawn_usage"], r["shutdown_usage"]
                row = {
                    "round": round_,
                    "way": way,
                    "spawn_user_s": s["user_s"],
                    "spawn_sys_s": s["sys_s"],
                    "spawn_faults": s["minor_faults"],
                    "deliver_user_s": d["user_s"],
                    "deliver_sys_s": d["sys_s"],
                    "deliver_faults": d["minor_faults"],
                    "deliver_wall_s": r["deliver_s"],
                    "shutdown_user_s": x["user_s"],
                    "shutdown_sys_s": x["sys_s"],
                    "maxrss_mib": r["maxrss_mib"],
                    "thp_faults": r["thp_faults"],
                    "heap_populated_mib": r["heap_populated_mib"],
                    "thp": r["thp"],
                }
            else:
                row = {"round": round_, **_child([way, str(args.mib << 20)])}
            rows.append(row)
            if not args.json:
                print(
                    "  ".join(
                        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in row.items()
                    )
                )
    return rows


if __name__ == "__main__":
    main()

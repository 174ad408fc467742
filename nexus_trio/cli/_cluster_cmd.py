"""``nexus run --workers N``: N kernel processes on this host, joined through NATS.

Each worker is ``python -m nexus_trio.cli run ... --nats URL --node worker-<i> --json
--no-live``: the same run (app or demo workload) in its own process, so N workers use N
cores. Without a NATS URL a private ``nats-server`` (JetStream on, 127.0.0.1, a port it
picks) is started first and stopped last. SIGINT/SIGTERM are passed on to the workers
(a second one kills them). The workers' JSON summaries are added up into one.

The lead wires this into ``nexus run``: when ``--workers`` is above 1, call
:func:`run_workers` with the command line minus ``--workers`` (:func:`worker_argv`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any, Final

log = logging.getLogger("nexus_trio.cli")

#: options of ``nexus run`` that the parent sets for each worker itself
_PARENT_OPTIONS: Final = {"--workers": True, "--nats": True, "--node": True, "--json": False}
_PARENT_FLAGS: Final = {"--live", "--no-live"}
#: summary fields that add up across workers
_SUMMED: Final = (
    "agents",
    "sent",
    "handled",
    "replies_delivered",
    "forwarded",
    "dead_letters",
    "in_flight",
    "failed",
    "timed_out",
    "restarts",
    "msgs_per_s",
    "peak_rss_bytes",
)


def default_workers() -> int:
    """One worker per core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_argv(argv: Sequence[str]) -> list[str]:
    """``nexus run`` arguments for a worker: ``argv`` without the options the parent sets
    (``--workers``, ``--nats``, ``--node``, ``--json``, ``--live/--no-live``)."""
    out: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
            continue
        name, eq, _ = arg.partition("=")
        if name in _PARENT_OPTIONS:
            skip_value = _PARENT_OPTIONS[name] and not eq
            continue
        if arg in _PARENT_FLAGS:
            continue
        out.append(arg)
    return out


def aggregate_summaries(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One summary for all workers: counts and rates added up, times the longest,
    ``conserved`` only if every worker's accounting balanced, per-worker summaries kept."""
    total: dict[str, Any] = {"workers": len(summaries)}
    for key in _SUMMED:
        total[key] = sum(s.get(key) or 0 for s in summaries)
    reasons: dict[str, int] = {}
    rejected: dict[str, int] = {}
    for s in summaries:
        for reason, n in (s.get("dead_letters_by_reason") or {}).items():
            reasons[reason] = reasons.get(reason, 0) + n
        for reason, n in (s.get("rejected") or {}).items():
            rejected[reason] = rejected.get(reason, 0) + n
    total["dead_letters_by_reason"] = reasons
    total["rejected"] = rejected
    elapsed = [s.get("elapsed_s") or {} for s in summaries]
    total["elapsed_s"] = {
        key: max((e.get(key, 0.0) for e in elapsed), default=0.0)
        for key in ("total", "spawn", "run", "shutdown")
    }
    errors = [s["error"] for s in summaries if s.get("error")]
    total["error"] = "; ".join(errors) if errors else None
    total["conserved"] = bool(summaries) and all(s.get("conserved") for s in summaries)
    total["per_worker"] = list(summaries)
    return total


def run_workers(
    workers: int,
    run_args: Sequence[str],
    *,
    nats_url: str | None = None,
    python: str | None = None,
) -> tuple[dict[str, Any], int]:
    """Run ``workers`` worker processes to the end; return the added-up summary and the
    worst exit status. ``run_args`` are ``nexus run`` arguments (see :func:`worker_argv`)."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    server = None
    # Credentials reach the workers in their environment, never in argv (``ps``).
    env = dict(os.environ)
    if nats_url is None:
        import secrets

        from .._nats import NatsServer

        token = secrets.token_urlsafe(32)  # a private server still refuses other local users
        server = NatsServer(token=token).start()
        nats_url = server.url
        env["NEXUS_NATS__TOKEN"] = token
        log.info("started nats-server at %s (pid %d) for %d workers", nats_url, server.pid, workers)
    else:
        nats_url = _move_credentials_to_env(nats_url, env)
    procs: list[subprocess.Popen[bytes]] = []
    outputs: list[bytes] = [b""] * workers
    signals_seen = 0

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal signals_seen
        signals_seen += 1
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if signals_seen == 1 else signal.SIGKILL)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(workers):
            argv = [python or sys.executable, "-m", "nexus_trio.cli", "run", *run_args]
            argv += ["--nats", nats_url, "--node", f"worker-{i}", "--json", "--no-live"]
            procs.append(
                subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env)
            )

        def collect(i: int, proc: subprocess.Popen[bytes]) -> None:
            assert proc.stdout is not None
            outputs[i] = proc.stdout.read()

        readers = [
            threading.Thread(target=collect, args=(i, p), daemon=True) for i, p in enumerate(procs)
        ]
        for reader in readers:
            reader.start()
        statuses = [_status(proc.wait()) for proc in procs]
        for reader in readers:
            reader.join()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server is not None:
            server.stop()
    summaries = []
    for i, out in enumerate(outputs):
        try:
            summaries.append(json.loads(out))
        except ValueError:
            summaries.append({"error": f"worker-{i} printed no summary", "conserved": False})
    summary = aggregate_summaries(summaries)
    status = max(statuses, default=0)
    if status == 0 and not summary["conserved"]:
        status = 1
    return summary, status


def _move_credentials_to_env(nats_url: str, env: dict[str, str]) -> str:
    """``nats_url`` without user info; the credentials it had go to ``env``."""
    from .._nats._auth import NatsAuth, split_credentials

    urls, auth = split_credentials([u.strip() for u in nats_url.split(",")], NatsAuth())
    for key, value in (("USER", auth.user), ("PASSWORD", auth.password), ("TOKEN", auth.token)):
        if value is not None:
            env[f"NEXUS_NATS__{key}"] = value
    return ",".join(urls)


def _status(code: int) -> int:
    """An exit status as a shell reports it (killed by signal N -> 128 + N)."""
    return 128 - code if code < 0 else code

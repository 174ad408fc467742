#!/usr/bin/env bash
# The mypyc probe of the thirty-ninth pass (issue 11's fan-out row), rebuilt from a clean
# tree: a scratch copy of nexus_trio with the fan-out tell's hot path compiled by mypyc,
# the rest interpreted. Nothing of it is part of the package; the write-up, with the
# numbers, is docs/benchmarks-history.md ("The fan-out of issue 11, thirty-ninth pass:
# compiling the hot path with mypyc ...").
#
#     benchmarks/mypyc_probe.sh OUT_DIR [VENV]
#
# VENV (default /tmp/mypyc-probe-venv) is a venv of its own, made if missing, with
# mypy 2.4.1 (mypyc) and this repository's dependencies, so that the project's venv is
# untouched. OUT_DIR gets a copy of nexus_trio and benchmarks/ with
# benchmarks/mypyc_probe.patch applied (small changes mypyc needs, each commented
# "mypyc probe"; the patch is against 93882b0 and may need a refresh on a later tree) and
# the compiled modules beside their sources. Then, for instance:
#
#     VENV/bin/python benchmarks/mypyc_probe.py --tree compiled=OUT_DIR --tree interpreted=.
#     (cd OUT_DIR && VENV/bin/python benchmarks/fanout_instructions.py)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: benchmarks/mypyc_probe.sh OUT_DIR [VENV]}
venv=${2:-/tmp/mypyc-probe-venv}

if [ ! -x "$venv/bin/mypyc" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q mypy==2.4.1 setuptools wheel -e "$root[test,nats]"
fi

mkdir -p "$out"
rm -rf "$out/nexus_trio" "$out/benchmarks" "$out/build"
cp -r "$root/nexus_trio" "$root/benchmarks" "$out/"
find "$out" \( -name __pycache__ -o -name '*.so' \) -prune -exec rm -rf {} +
(cd "$out" && patch -s -p1 < "$root/benchmarks/mypyc_probe.patch")

# What mypyc takes of the tell's path: the router, the mailbox, the message, the kernel
# (its open_kernel moved out: an async generator) and the kernel's batch
# loop (moved out of _cell, which mypyc refuses as it is), and the ledger the loop counts in.
cd "$out"
"$venv/bin/mypyc" nexus_trio/_router.py nexus_trio/_mailbox.py \
    nexus_trio/_message.py nexus_trio/_kernel.py nexus_trio/_batches.py nexus_trio/_ledger.py
"$venv/bin/python" -c "import nexus_trio._router as r; assert r.__file__.endswith('.so'), r.__file__"
echo "compiled probe in $out"

#!/usr/bin/env bash
# Deploy nexus_trio as a systemd service on this machine (as root):
#   1. install.sh --system (virtualenv /usr/local/lib/nexus/venv, /usr/local/bin/nexus-runtime,
#      /etc/nexus/config.toml written if absent, /var/lib/nexus);
#   2. a system user `nexus`;
#   3. the workload in /etc/nexus/config.toml [app]: --app / --app-file / --spawn, or, if the
#      config names none, examples/pipeline.py's `service` (a planner, workers and an aggregator
#      under supervision, processing a job every few seconds);
#   4. scripts/nexus.service as /etc/systemd/system/nexus.service, enabled and (re)started.
#
#   sudo scripts/deploy.sh                                   # the example pipeline service
#   sudo scripts/deploy.sh --app-file ./myagents.py --app myagents:main
#   sudo scripts/deploy.sh --spawn "node /srv/agents/worker.js" --metrics-port 9464
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/deploy.sh [--app MODULE:ATTR] [--app-file FILE]... [--spawn CMD]...
                         [--metrics-port PORT] [--skip-tests] [--no-start] [--dry-run]

  --app MODULE:ATTR    what `nexus run` runs ([app] app in /etc/nexus/config.toml)
  --app-file FILE      a Python module to copy to /usr/local/lib/nexus/apps (importable by the service)
  --spawn CMD          an external agent process to run ([app] spawn; repeatable)
  --metrics-port PORT  serve /metrics and /healthz on 127.0.0.1:PORT ([metrics] port)
  --skip-tests         passed to install.sh
  --no-start           install and enable the unit, do not start it
  --dry-run            print what would be done, change nothing
Without --app and --spawn, a config that names no workload gets examples/pipeline.py's service.
EOF
}

die() {
  echo "deploy.sh: error: $*" >&2
  exit 2
}

APP=""
APP_FILES=()
SPAWN=()
METRICS_PORT=""
INSTALL_ARGS=()
START=1
DRY_RUN=0

while [[ $# -gt 0 ]]; do
  case "$1" in
    --app)
      [[ $# -ge 2 && "$2" == *:* ]] || die "--app needs MODULE:ATTR"
      APP=$2
      shift
      ;;
    --app-file)
      [[ $# -ge 2 && -f "$2" && "$2" == *.py ]] || die "--app-file needs an existing .py file"
      APP_FILES+=("$2")
      shift
      ;;
    --spawn)
      [[ $# -ge 2 && -n "$2" ]] || die "--spawn needs a command"
      SPAWN+=("$2")
      shift
      ;;
    --metrics-port)
      [[ $# -ge 2 && "$2" =~ ^[0-9]+$ && "$2" -le 65535 ]] || die "--metrics-port needs a port 0..65535"
      METRICS_PORT=$2
      shift
      ;;
    --skip-tests) INSTALL_ARGS+=(--skip-tests) ;;
    --no-start) START=0 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

SOURCE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=/usr/local/lib/nexus/venv
APPS=/usr/local/lib/nexus/apps
CONFIG=/etc/nexus/config.toml
UNIT=/etc/systemd/system/nexus.service

[[ $DRY_RUN -eq 1 || $(id -u) -eq 0 ]] || die "run as root (sudo $0)"
[[ $DRY_RUN -eq 1 ]] || command -v systemctl >/dev/null 2>&1 || die "systemctl not found: this script deploys a systemd service (see docs/deploy.md for Docker)"

say() { echo "==> $*"; }
run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "would run: $*"
  else
    "$@"
  fi
}

if [[ -z "$APP" && ${#SPAWN[@]} -eq 0 && ${#APP_FILES[@]} -eq 0 ]]; then
  DEFAULT_APP=1
else
  DEFAULT_APP=0
fi

say "installing nexus_trio system-wide"
if [[ $DRY_RUN -eq 1 ]]; then
  run bash "$SOURCE/install.sh" --system ${INSTALL_ARGS[@]+"${INSTALL_ARGS[@]}"}
else
  bash "$SOURCE/install.sh" --system ${INSTALL_ARGS[@]+"${INSTALL_ARGS[@]}"}
fi

if ! id -u nexus >/dev/null 2>&1; then
  say "creating system user nexus"
  run useradd --system --home-dir /var/lib/nexus --no-create-home --shell /usr/sbin/nologin nexus
fi
run install -d -o nexus -g nexus -m 0750 /var/lib/nexus

run install -d -m 0755 "$APPS"
for file in ${APP_FILES[@]+"${APP_FILES[@]}"}; do
  say "installing app module $file into $APPS"
  run install -m 0644 "$file" "$APPS/"
done

# Write the workload into the config with tomlkit (comments and other keys are kept).
say "configuring the workload in $CONFIG"
CONFIGURE=$(
  cat <<'PY'
import sys
import tomlkit

path, app, default_app, metrics_port, *spawn = sys.argv[1:]
with open(path, encoding="utf-8") as f:
    doc = tomlkit.parse(f.read())
section = doc.setdefault("app", tomlkit.table())
if app:
    section["app"] = app
if spawn:
    section["spawn"] = spawn
if default_app == "1" and not section.get("app") and not section.get("spawn"):
    section["app"] = "pipeline:service"
    print("no workload configured: using examples/pipeline.py's service (pipeline:service)")
if metrics_port:
    doc.setdefault("metrics", tomlkit.table())["port"] = int(metrics_port)
with open(path, "w", encoding="utf-8") as f:
    f.write(tomlkit.dumps(doc))
print("[app] app =", section.get("app"), "| spawn =", list(section.get("spawn", [])))
PY
)
if [[ $DEFAULT_APP -eq 1 ]]; then
  run install -m 0644 "$SOURCE/examples/pipeline.py" "$APPS/pipeline.py"
fi
run "$VENV/bin/python" -c "$CONFIGURE" "$CONFIG" "$APP" "$DEFAULT_APP" "$METRICS_PORT" ${SPAWN[@]+"${SPAWN[@]}"}
run chgrp nexus "$CONFIG"
run chmod 0640 "$CONFIG"
# Fail now, with the config's own error message, rather than in the journal later.
run env PYTHONPATH="$APPS" "$VENV/bin/nexus" config show --config "$CONFIG"

say "installing the systemd unit $UNIT"
run install -m 0644 "$SOURCE/scripts/nexus.service" "$UNIT"
if command -v systemd-analyze >/dev/null 2>&1; then
  run systemd-analyze verify "$UNIT"
fi
run systemctl daemon-reload
run systemctl enable nexus.service
if [[ $START -eq 1 ]]; then
  run systemctl restart nexus.service
  run systemctl --no-pager --lines=5 status nexus.service
  say "deployed: journalctl -u nexus -f to follow it; systemctl stop nexus stops it gracefully"
else
  say "installed and enabled; start it with: systemctl start nexus"
fi

#!/usr/bin/env bash
# Install nexus_trio from this clone into its own virtualenv and link its commands.
#
#   ./install.sh                 user-local: ~/.local/share/nexus/venv, ~/.local/bin/{nexus,nexus-runtime},
#                                config ~/.config/nexus/config.toml, data ~/.local/share/nexus
#   ./install.sh --system        system-wide (as root): /usr/local/lib/nexus/venv, /usr/local/bin,
#                                /etc/nexus/config.toml, /var/lib/nexus
#   ./install.sh --prefix DIR    everything under DIR: DIR/lib/nexus/venv, DIR/bin,
#                                DIR/etc/nexus/config.toml, DIR/var/lib/nexus
#   ./install.sh --uninstall     remove the virtualenv and the links (add --purge for config and data)
#
# The test suite runs before anything is linked unless --skip-tests is given (never as root for
# --system). An existing config file is never overwritten, and a command that this script did
# not install is not replaced without --force; what it installed is listed in a manifest next
# to the virtualenv. Run with --help for every option.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: install.sh [--system | --prefix DIR] [--skip-tests] [--force] [--python PYTHON] [--dry-run]
       install.sh [--system | --prefix DIR] --uninstall [--purge] [--dry-run]

Installs nexus_trio from the clone this script is in into its own virtualenv and links the
`nexus` and `nexus-runtime` commands.

  (default)        user-local: virtualenv ~/.local/share/nexus/venv, commands in ~/.local/bin,
                   config ~/.config/nexus/config.toml, data ~/.local/share/nexus
                   ($XDG_DATA_HOME and $XDG_CONFIG_HOME are honoured)
  --system         system-wide, as root: /usr/local/lib/nexus/venv, /usr/local/bin,
                   /etc/nexus/config.toml, /var/lib/nexus
  --prefix DIR     everything under DIR: DIR/lib/nexus/venv, DIR/bin, DIR/etc/nexus/config.toml,
                   DIR/var/lib/nexus
  --skip-tests     do not run the test suite before installing (--system never runs it:
                   the tests are not run as root; run them as yourself first)
  --force          replace `nexus` / `nexus-runtime` in the commands directory even if this
                   script did not install them (by default it refuses)
  --python PYTHON  interpreter for the virtualenv (default: python3; needs 3.11 or newer)
  --uninstall      remove the virtualenv and the command links; config and data are kept
  --purge          with --uninstall: also remove the config file and the data directory
  --dry-run        print what would be done, change nothing
  -h, --help       this help
EOF
}

die() {
  echo "install.sh: error: $*" >&2
  exit 2
}

MODE=user
PREFIX=""
SKIP_TESTS=0
UNINSTALL=0
PURGE=0
FORCE=0
DRY_RUN=0
PYTHON=${PYTHON:-python3}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --system) MODE=system ;;
    --prefix)
      [[ $# -ge 2 && -n "$2" ]] || die "--prefix needs a directory"
      MODE=prefix
      PREFIX=$2
      shift
      ;;
    --prefix=*)
      MODE=prefix
      PREFIX=${1#--prefix=}
      [[ -n "$PREFIX" ]] || die "--prefix needs a directory"
      ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --python)
      [[ $# -ge 2 && -n "$2" ]] || die "--python needs an interpreter"
      PYTHON=$2
      shift
      ;;
    --uninstall) UNINSTALL=1 ;;
    --purge) PURGE=1 ;;
    --force) FORCE=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done
[[ $PURGE -eq 0 || $UNINSTALL -eq 1 ]] || die "--purge only goes with --uninstall"

SOURCE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

case "$MODE" in
  user)
    [[ -n "${HOME:-}" ]] || die "HOME is not set; use --prefix DIR"
    DATA_HOME=${XDG_DATA_HOME:-$HOME/.local/share}
    CONFIG_HOME=${XDG_CONFIG_HOME:-$HOME/.config}
    DATA_DIR=$DATA_HOME/nexus
    VENV=$DATA_DIR/venv
    BIN_DIR=$HOME/.local/bin
    CONFIG_FILE=$CONFIG_HOME/nexus/config.toml
    ;;
  system)
    VENV=/usr/local/lib/nexus/venv
    BIN_DIR=/usr/local/bin
    CONFIG_FILE=/etc/nexus/config.toml
    DATA_DIR=/var/lib/nexus
    ;;
  prefix)
    if [[ $DRY_RUN -eq 0 && $UNINSTALL -eq 0 ]]; then
      mkdir -p -- "$PREFIX" || die "cannot create --prefix directory '$PREFIX'"
    fi
    [[ "$PREFIX" == /* ]] || PREFIX=$PWD/$PREFIX
    VENV=$PREFIX/lib/nexus/venv
    BIN_DIR=$PREFIX/bin
    CONFIG_FILE=$PREFIX/etc/nexus/config.toml
    DATA_DIR=$PREFIX/var/lib/nexus
    ;;
esac
COMMANDS=(nexus nexus-runtime)
# What this script installed (links, config), one "kind path" line each: uninstall removes
# what it lists, and a later install knows which commands are its own.
MANIFEST=$(dirname "$VENV")/install-manifest.txt

if [[ "$MODE" == system && $DRY_RUN -eq 0 && $(id -u) -ne 0 ]]; then
  die "--system needs root (try: sudo $0 --system), or use --prefix DIR"
fi

say() { echo "==> $*"; }
run() {
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "would run: $*"
  else
    "$@"
  fi
}

# True when $1 (a command in BIN_DIR) is the link this script makes: into our virtualenv.
is_our_link() {
  [[ -L "$1" && "$(readlink "$1")" == "$VENV/bin/$(basename "$1")" ]]
}

in_manifest() {
  [[ -f "$MANIFEST" ]] && grep -qxF -- "$1 $2" "$MANIFEST"
}

record() {
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "would record in $MANIFEST: $1 $2"
  elif ! in_manifest "$1" "$2"; then
    echo "$1 $2" >>"$MANIFEST"
  fi
}

# --- uninstall --------------------------------------------------------------------------------
if [[ $UNINSTALL -eq 1 ]]; then
  say "uninstalling nexus_trio ($MODE)"
  for cmd in "${COMMANDS[@]}"; do
    link=$BIN_DIR/$cmd
    if is_our_link "$link"; then
      run rm -f -- "$link"
      echo "removed link $link"
    elif [[ -e "$link" || -L "$link" ]]; then
      echo "kept $link: it does not point into $VENV" >&2
    fi
  done
  if [[ -f "$MANIFEST" ]]; then
    run rm -f -- "$MANIFEST"
  fi
  if [[ -d "$VENV" ]]; then
    run rm -rf -- "$VENV"
    echo "removed virtualenv $VENV"
  else
    echo "no virtualenv at $VENV"
  fi
  if [[ $PURGE -eq 1 ]]; then
    if [[ -e "$CONFIG_FILE" ]]; then
      run rm -f -- "$CONFIG_FILE"
      echo "removed config $CONFIG_FILE"
    fi
    if [[ -d "$DATA_DIR" ]]; then
      run rm -rf -- "$DATA_DIR"
      echo "removed data directory $DATA_DIR"
    fi
  else
    if [[ -e "$CONFIG_FILE" ]]; then echo "kept config $CONFIG_FILE (--purge removes it)"; fi
    if [[ -d "$DATA_DIR" ]]; then echo "kept data directory $DATA_DIR (--purge removes it)"; fi
  fi
  say "done"
  exit 0
fi

# --- install ----------------------------------------------------------------------------------
[[ -f "$SOURCE/pyproject.toml" && -d "$SOURCE/nexus_trio" ]] ||
  die "run install.sh from a clone of nexus_trio (no pyproject.toml next to $0)"
command -v "$PYTHON" >/dev/null 2>&1 || die "--python '$PYTHON' not found"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
  die "$PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'); nexus_trio needs 3.11 or newer"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null ||
  die "$PYTHON cannot create virtualenvs (on Debian/Ubuntu: apt-get install python3-venv)"

# Refuse, before changing anything, to replace a command this script did not install.
for cmd in "${COMMANDS[@]}"; do
  link=$BIN_DIR/$cmd
  if [[ -e "$link" || -L "$link" ]] && ! is_our_link "$link"; then
    what="a file"
    [[ -L "$link" ]] && what="a link to $(readlink "$link")"
    if [[ $FORCE -eq 1 ]]; then
      echo "note: replacing $link ($what, not installed by install.sh) as --force says" >&2
    else
      die "refusing to replace $link: it is $what that install.sh did not install (not a link into $VENV). Remove it, or pass --force to replace it"
    fi
  fi
done

# Node.js 18+ runs JavaScript agents (nexus-bridge.js); without it the rest works.
NODE_OK=0
node_note=""
if command -v node >/dev/null 2>&1; then
  node_version=$(node --version 2>/dev/null || echo unknown)
  node_major=${node_version#v}
  node_major=${node_major%%.*}
  if [[ "$node_major" =~ ^[0-9]+$ && $node_major -ge 18 ]]; then
    NODE_OK=1
  else
    node_note="Node.js on PATH is $node_version; JavaScript agents need Node.js 18 or newer"
  fi
else
  node_note="Node.js (18 or newer) is not on PATH; JavaScript agents need it"
fi
if [[ $NODE_OK -eq 0 ]]; then
  echo "note: $node_note. Python agents work without it; the JavaScript bridge tests are skipped." >&2
fi

say "installing nexus_trio from $SOURCE ($MODE)"
echo "    virtualenv  $VENV"
echo "    commands    $BIN_DIR/nexus, $BIN_DIR/nexus-runtime"
echo "    config      $CONFIG_FILE"
echo "    data        $DATA_DIR"

if [[ -x "$VENV/bin/python" ]]; then
  say "reusing virtualenv $VENV"
else
  say "creating virtualenv $VENV"
  run mkdir -p -- "$(dirname "$VENV")"
  run "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

# The tests run as the user who invoked the script (SUDO_USER under sudo), never as root for
# --system: a test suite is code from the clone, and root would leave files in it.
TEST_AS=()
if [[ $SKIP_TESTS -eq 0 && "$MODE" == system ]]; then
  echo "note: --system does not run the test suite (not as root); run it as yourself first:" \
    "cd $SOURCE && python3 -m pytest -q" >&2
  SKIP_TESTS=1
elif [[ $SKIP_TESTS -eq 0 && $(id -u) -eq 0 && -n "${SUDO_USER:-}" && "${SUDO_USER}" != root ]]; then
  if command -v runuser >/dev/null 2>&1; then
    TEST_AS=(runuser -u "$SUDO_USER" --)
  elif command -v sudo >/dev/null 2>&1; then
    TEST_AS=(sudo -u "$SUDO_USER" --)
  else
    echo "note: cannot run the tests as $SUDO_USER (no runuser or sudo); skipping them" >&2
    SKIP_TESTS=1
  fi
fi
TEST_ENV=(env PYTHONDONTWRITEBYTECODE=1)
[[ $NODE_OK -eq 1 ]] || TEST_ENV+=(NEXUS_ALLOW_MISSING_NODE=1)

if [[ $SKIP_TESTS -eq 0 ]]; then
  say "installing nexus_trio with its test extra and running the test suite (--skip-tests skips this)"
  command -v node >/dev/null 2>&1 ||
    say "Node 18+ not on PATH: the JavaScript bridge tests will be skipped (only JavaScript agents need Node)"
  run "${PIP[@]}" install "${SOURCE}[test]"
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "would run: (cd $SOURCE && ${TEST_AS[*]:+${TEST_AS[*]} }${TEST_ENV[*]} $VENV/bin/python -m pytest -q -p no:cacheprovider)"
  elif ! (cd "$SOURCE" && ${TEST_AS[@]+"${TEST_AS[@]}"} "${TEST_ENV[@]}" "$VENV/bin/python" -m pytest -q -p no:cacheprovider); then
    if [[ $NODE_OK -eq 0 ]]; then
      die "the test suite failed ($node_note); nothing was linked (the virtualenv is at $VENV)"
    fi
    die "the test suite failed; nothing was linked (the virtualenv is at $VENV)"
  fi
else
  say "installing nexus_trio (tests skipped)"
  run "${PIP[@]}" install "$SOURCE"
fi

say "linking commands into $BIN_DIR"
run mkdir -p -- "$BIN_DIR"
for cmd in "${COMMANDS[@]}"; do
  [[ $DRY_RUN -eq 1 || -x "$VENV/bin/$cmd" ]] || die "the install did not create $VENV/bin/$cmd"
  run ln -sfn -- "$VENV/bin/$cmd" "$BIN_DIR/$cmd"
  record link "$BIN_DIR/$cmd"
  echo "    $BIN_DIR/$cmd -> $VENV/bin/$cmd"
done

if [[ -e "$CONFIG_FILE" ]]; then
  say "keeping existing config $CONFIG_FILE"
else
  say "writing config $CONFIG_FILE"
  run mkdir -p -- "$(dirname "$CONFIG_FILE")"
  run "$VENV/bin/nexus" config init "$CONFIG_FILE"
  record config "$CONFIG_FILE"
fi

say "creating data directory $DATA_DIR"
run mkdir -p -- "$DATA_DIR"
if [[ "$MODE" == system ]] && id -u nexus >/dev/null 2>&1; then
  run chown nexus:nexus "$DATA_DIR"
fi

if [[ $DRY_RUN -eq 0 ]]; then
  version=$("$BIN_DIR/nexus-runtime" version)
  say "installed: $version"
fi
case ":${PATH:-}:" in
  *":$BIN_DIR:"*) ;;
  *) echo "note: $BIN_DIR is not on your PATH; add it, e.g. export PATH=\"$BIN_DIR:\$PATH\"" ;;
esac
echo "next: nexus run --config $CONFIG_FILE --duration 5    (a demo workload; see docs/quickstart.md)"
case "$MODE" in
  user) where="" ;;
  system) where=" --system" ;;
  prefix) where=" --prefix $PREFIX" ;;
esac
echo "      $SOURCE/install.sh --uninstall$where    (to remove it)"

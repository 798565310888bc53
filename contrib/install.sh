#!/usr/bin/env bash
# Install meshtrain as a system service: a virtualenv in /opt/meshtrain (a system-wide `pip install` is
# refused by PEP 668 on current Debian and Ubuntu), the `meshtrain` user and group (sysusers.d), the
# systemd units, `meshtrain` on the PATH, and a node home with its config. Run it again to upgrade: the
# venv is reinstalled from this source tree; an existing config and identity are kept. contrib/INSTALL.md
# explains each step.
#
#   sudo contrib/install.sh [--instance NAME [--gpu N]] [--prefix DIR] [--root DIR] [INIT OPTIONS...]
#
#   --instance NAME  a meshtrain@NAME node (home /var/lib/meshtrain/NAME, socket /run/meshtrain/NAME/...)
#   --gpu N          with --instance: CUDA_VISIBLE_DEVICES=N in /etc/meshtrain/NAME.env
#   --prefix DIR     where the venv goes (default /opt/meshtrain; the units' ExecStart follows it)
#   --root DIR       install into an alternate filesystem root and start nothing (tests, images)
#   INIT OPTIONS     passed to `meshtrain init` for a new home: --bootstrap ADDR, --run NAME, --task T, ...
#
# Environment: PYTHON (default python3, 3.11 or newer), PIP_ARGS (extra pip arguments, e.g. the index of
# a CUDA build of torch). A python3 that already imports torch (a CUDA build, say) is reused through
# --system-site-packages, never replaced.
set -euo pipefail
umask 022 # the venv must be readable by the service user

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=/opt/meshtrain
ROOT=
INSTANCE=
GPU=
INIT_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=$2; shift 2 ;;
        --root) ROOT=$(realpath -m "$2"); shift 2 ;;
        --instance) INSTANCE=$2; shift 2 ;;
        --gpu) GPU=$2; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --) shift; INIT_ARGS+=("$@"); break ;;
        *) INIT_ARGS+=("$1"); shift ;;
    esac
done
PYTHON=${PYTHON:-python3}
if [ -n "$INSTANCE" ] && ! [[ "$INSTANCE" =~ ^[A-Za-z0-9_.-]+$ ]]; then
    echo "install.sh: --instance must be letters, digits, '_', '.' or '-', got '$INSTANCE'" >&2; exit 2
fi
if [ -n "$GPU" ] && [ -z "$INSTANCE" ]; then
    echo "install.sh: --gpu needs --instance (one node per GPU: meshtrain@NAME)" >&2; exit 2
fi
if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run it as root (sudo), or with --root DIR" >&2; exit 2
fi
if ! "$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install.sh: needs Python 3.11+ with venv: sudo apt-get install python3 python3-venv" >&2; exit 2
fi

if [ -n "$INSTANCE" ]; then
    UNIT="meshtrain@$INSTANCE"
    HOME_DIR=/var/lib/meshtrain/$INSTANCE
    SOCKET=/run/meshtrain/$INSTANCE/control.sock
else
    UNIT=meshtrain
    HOME_DIR=/var/lib/meshtrain
    SOCKET=/run/meshtrain/control.sock
fi
VENV=$ROOT$PREFIX
MESHTRAIN=$VENV/bin/meshtrain
step() { printf '\n==> %s\n' "$*"; }

step "virtualenv $PREFIX"
SITE=()
if "$PYTHON" -c 'import torch' 2>/dev/null; then SITE=(--system-site-packages); fi
"$PYTHON" -m venv "${SITE[@]}" "$VENV"
# shellcheck disable=SC2086 # PIP_ARGS is a list of arguments
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check ${PIP_ARGS:-} "$SRC"
install -D -m 0644 "$SRC/contrib/INSTALL.md" "$VENV/share/doc/meshtrain/INSTALL.md"
install -d "$ROOT/usr/local/bin"
ln -sfn "$PREFIX/bin/meshtrain" "$ROOT/usr/local/bin/meshtrain"

step "user and group meshtrain"
install -D -m 0644 "$SRC/contrib/sysusers.d/meshtrain.conf" "$ROOT/etc/sysusers.d/meshtrain.conf"
systemd-sysusers ${ROOT:+--root="$ROOT"} "$ROOT/etc/sysusers.d/meshtrain.conf"

step "systemd units"
install -d "$ROOT/etc/systemd/system"
for unit in meshtrain.service meshtrain@.service; do
    sed "s|/opt/meshtrain/|$PREFIX/|g" "$SRC/contrib/systemd/$unit" >"$ROOT/etc/systemd/system/$unit"
    chmod 0644 "$ROOT/etc/systemd/system/$unit"
done
if [ -n "$GPU" ]; then
    install -d "$ROOT/etc/meshtrain"
    printf 'CUDA_VISIBLE_DEVICES=%s\n' "$GPU" >"$ROOT/etc/meshtrain/$INSTANCE.env"
fi

step "node home $HOME_DIR"
install -d -m 0755 "$ROOT/var/lib/meshtrain"
if [ -z "$ROOT" ]; then
    install -d -m 0700 -o meshtrain -g meshtrain "$HOME_DIR"
    as_service=(runuser -u meshtrain --)
else
    install -d -m 0700 "$ROOT$HOME_DIR"
    as_service=()
fi
if [ -e "$ROOT$HOME_DIR/config.toml" ]; then
    echo "keeping $HOME_DIR/config.toml (and the node's identity)"
else
    "${as_service[@]}" "$MESHTRAIN" init --home "$ROOT$HOME_DIR" "${INIT_ARGS[@]}"
    # The control socket lives in the unit's RuntimeDirectory, open to the meshtrain group.
    "${as_service[@]}" sed -i -e '/^socket_group = /d' \
        -e "s|^socket = \"control.sock\"\$|socket = \"$SOCKET\"\nsocket_group = \"meshtrain\"|" \
        "$ROOT$HOME_DIR/config.toml"
fi
# From / so that the installed package is what loads the config, not this checkout.
(cd / && "$VENV/bin/python" - "$ROOT$HOME_DIR" "$SOCKET") <<'EOF'
import sys
from pathlib import Path

from daemon.config import load_config

config = load_config(Path(sys.argv[1]))  # raises, naming the key, on anything wrong
if config.api.socket != sys.argv[2]:
    sys.exit(f"install.sh: {sys.argv[1]}/config.toml: [api] socket is {config.api.socket!r}, not {sys.argv[2]!r}")
print(f"config ok: run {config.node.run!r}, socket {config.api.socket}")
EOF

if [ -z "$ROOT" ]; then
    systemctl daemon-reload
    step "done: start it with"
    echo "  sudo systemctl enable --now $UNIT"
    echo "  sudo usermod -aG meshtrain \$USER   # then log in again, and:"
    echo "  meshtrain --socket $SOCKET status"
else
    step "installed under $ROOT"
fi

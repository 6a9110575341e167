#!/bin/sh
# Install (or remove) edge-agent as a systemd service. Read it before running it: every step
# is a plain command, and running it again changes nothing that is already in place.
#
#   sudo systemd/install.sh [--watch-dir DIR] [--extra cpu|gpu|none] [--no-start]
#   sudo systemd/install.sh --uninstall [--purge]
#
# Options
#   --watch-dir DIR  the modality's output folder (default /srv/dicom/incoming); the agent
#                    gets read-only access to it and nothing else outside its own folders
#   --extra X        ONNX Runtime build to install: cpu (x86/ARM CPUs, default), gpu
#                    (onnxruntime-gpu, x86 CUDA), none (a Jetson: install NVIDIA's
#                    onnxruntime-gpu wheel for your JetPack into the venv yourself)
#   --profile NAME   device profile (firmware_configs/NAME.toml) whose memory_max_mib becomes
#                    the unit's MemoryMax= (MemoryHigh= at 90%), in a drop-in
#   --no-start       install and enable, but do not start now
#   --uninstall      stop and disable the service and remove what install put in place;
#                    configuration (/etc/edge-agent) and state (/var/lib/edge-agent) stay
#   --purge          with --uninstall: also delete configuration, state and the venv
#   --root DIR       install into DIR as if it were / (for packaging and tests): no user
#                    is created, no venv is built, systemctl is not called
#   --dry-run        print the commands instead of running them
#
# What it puts in place
#   /opt/edge-triage/venv                           Python venv with edge-triage installed
#   /usr/lib/sysusers.d/edge-agent.conf             the edge-agent system user (sysusers.d)
#   /etc/systemd/system/edge-agent.service          the hardened unit
#   /etc/systemd/system/edge-agent.service.d/10-watch-dir.conf   ReadOnlyPaths= the watch dir
#   /etc/systemd/system/edge-agent.service.d/20-memory.conf      MemoryMax= (with --profile)
#   /etc/edge-agent/agent.toml                      configuration, only if none exists
#   /etc/edge-agent/mqtt_password                   empty placeholder (mode 0600), only if none
set -eu

WATCH_DIR=/srv/dicom/incoming
EXTRA=cpu
START=yes
PROFILE=
ACTION=install
PURGE=no
ROOT=
DRY=no

while [ $# -gt 0 ]; do
    case "$1" in
        --watch-dir) WATCH_DIR=${2:?--watch-dir needs a folder}; shift 2 ;;
        --extra) EXTRA=${2:?--extra needs cpu, gpu or none}; shift 2 ;;
        --profile) PROFILE=${2:?--profile needs a name}; shift 2 ;;
        --no-start) START=no; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) PURGE=yes; shift ;;
        --root) ROOT=${2:?--root needs a folder}; shift 2 ;;
        --dry-run) DRY=yes; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$EXTRA" in cpu|gpu|none) ;; *) echo "install.sh: --extra must be cpu, gpu or none" >&2; exit 2 ;; esac
case "$WATCH_DIR" in /*) ;; *) echo "install.sh: --watch-dir must be an absolute path" >&2; exit 2 ;; esac
case "$WATCH_DIR" in *[\"\\#\&]*) echo "install.sh: --watch-dir must not contain \" \\ # or &" >&2; exit 2 ;; esac
if [ "$PURGE" = yes ] && [ "$ACTION" != uninstall ]; then
    echo "install.sh: --purge goes with --uninstall" >&2; exit 2
fi

SRC=$(cd "$(dirname "$0")/.." && pwd)
MEMORY_MIB=
if [ -n "$PROFILE" ]; then
    PROFILE_FILE="$SRC/firmware_configs/$PROFILE.toml"
    [ -f "$PROFILE_FILE" ] || { echo "install.sh: no profile $PROFILE_FILE" >&2; exit 2; }
    MEMORY_MIB=$(sed -n 's/^memory_max_mib *= *\([0-9][0-9]*\).*/\1/p' "$PROFILE_FILE" | head -n 1)
fi
VENV=/opt/edge-triage/venv
UNIT=/etc/systemd/system/edge-agent.service
DROPIN=/etc/systemd/system/edge-agent.service.d/10-watch-dir.conf
MEMORY_DROPIN=/etc/systemd/system/edge-agent.service.d/20-memory.conf
SYSUSERS=/usr/lib/sysusers.d/edge-agent.conf
CONF_DIR=/etc/edge-agent
STATE=/var/lib/edge-agent

run() {  # a command, printed first; not run with --dry-run
    echo "+ $*"
    [ "$DRY" = yes ] || "$@"
}
on_host() {  # only when installing into the real root
    if [ -z "$ROOT" ]; then run "$@"; fi
}

if [ -z "$ROOT" ] && [ "$DRY" = no ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (sudo), or with --dry-run to see what it would do" >&2
    exit 1
fi

if [ "$ACTION" = uninstall ]; then
    if [ -z "$ROOT" ] && [ -e "$UNIT" ]; then run systemctl disable --now edge-agent.service; fi
    run rm -f "$ROOT$UNIT" "$ROOT$DROPIN" "$ROOT$MEMORY_DROPIN" "$ROOT$SYSUSERS"
    run rm -rf "$ROOT$(dirname "$DROPIN")"
    on_host systemctl daemon-reload
    if [ "$PURGE" = yes ]; then
        run rm -rf "$ROOT$CONF_DIR" "$ROOT$STATE" "$ROOT$(dirname "$VENV")"
        if [ -z "$ROOT" ] && id edge-agent >/dev/null 2>&1; then run userdel edge-agent; fi
    else
        echo "kept: $CONF_DIR (configuration), $STATE (state and outbox), $VENV; --purge removes them"
    fi
    exit 0
fi

# 1. The user, from sysusers.d (idempotent by design).
run install -D -m 0644 "$SRC/systemd/edge-agent.sysusers" "$ROOT$SYSUSERS"
on_host systemd-sysusers "$SYSUSERS"

# 2. The venv (pip leaves an installed, unchanged package alone).
if [ -z "$ROOT" ]; then
    [ -x "$VENV/bin/python" ] || run python3 -m venv "$VENV"
    case "$EXTRA" in
        none) run "$VENV/bin/pip" install --quiet "$SRC" ;;
        *) run "$VENV/bin/pip" install --quiet "$SRC[$EXTRA]" ;;
    esac
fi

# 3. Configuration: never overwrite what the site has edited.
run install -d -m 0750 "$ROOT$CONF_DIR"
if [ ! -e "$ROOT$CONF_DIR/agent.toml" ]; then
    run install -m 0640 "$SRC/systemd/agent.toml.example" "$ROOT$CONF_DIR/agent.toml"
    if [ "$DRY" = no ]; then
        sed -i "s#^watch_dir = .*#watch_dir = \"$WATCH_DIR\"#" "$ROOT$CONF_DIR/agent.toml"
    fi
fi
[ -e "$ROOT$CONF_DIR/mqtt_password" ] || run install -m 0600 /dev/null "$ROOT$CONF_DIR/mqtt_password"
on_host chgrp edge-agent "$CONF_DIR" "$CONF_DIR/agent.toml"

# 4. The unit and the drop-in that grants read-only access to the watch folder.
run install -D -m 0644 "$SRC/systemd/edge-agent.service" "$ROOT$UNIT"
run install -d -m 0755 "$ROOT$(dirname "$DROPIN")"
if [ "$DRY" = no ]; then
    printf '# Written by systemd/install.sh: the modality folder, read-only.\n[Service]\nReadOnlyPaths=\nReadOnlyPaths="-%s"\n' \
        "$WATCH_DIR" > "$ROOT$DROPIN"
else
    echo "+ write $ROOT$DROPIN (ReadOnlyPaths=-$WATCH_DIR)"
fi
if [ -n "$MEMORY_MIB" ]; then
    if [ "$DRY" = no ]; then
        printf '# Written by systemd/install.sh from profile %s (memory_max_mib).\n[Service]\nMemoryHigh=%sM\nMemoryMax=%sM\n' \
            "$PROFILE" "$((MEMORY_MIB * 9 / 10))" "$MEMORY_MIB" > "$ROOT$MEMORY_DROPIN"
    else
        echo "+ write $ROOT$MEMORY_DROPIN (MemoryMax=${MEMORY_MIB}M)"
    fi
fi
on_host systemctl daemon-reload
on_host systemctl enable edge-agent.service
if [ "$START" = yes ]; then
    on_host systemctl restart edge-agent.service
fi
echo "installed. Check it with: $VENV/bin/edge-agent check --config $CONF_DIR/agent.toml"

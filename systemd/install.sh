#!/bin/sh
# Install (or remove) edge-agent as a systemd service. Read it before running it: every step
# is a plain command, and running it again changes nothing that is already in place.
#
#   sudo systemd/install.sh [--watch-dir DIR] [--extra cpu|gpu|none] [--no-start]
#   sudo systemd/install.sh --profile jetson-orin-nano --ort-wheel onnxruntime_gpu-….whl
#   sudo systemd/install.sh --uninstall [--purge]
#
# Options
#   --watch-dir DIR  the modality's output folder (default /srv/dicom/incoming); the agent
#                    gets read-only access to it and nothing else outside its own folders
#   --extra X        ONNX Runtime build to install: cpu (x86/ARM CPUs, the default off a
#                    Jetson), gpu (onnxruntime-gpu, x86 CUDA), none (no ONNX Runtime; the
#                    default, and the only choice, on a Jetson)
#   --ort-wheel FILE a Jetson: NVIDIA's onnxruntime-gpu wheel for this JetPack release,
#                    installed into the venv (PyPI's builds are CPU-only or x86 CUDA)
#   --python PY      the interpreter the venv is made from (default python3); on a Jetson it
#                    must be the one JetPack's TensorRT module is built for (3.10 on JetPack 6)
#   --profile NAME   device profile (firmware_configs/NAME.toml) whose memory_max_mib becomes
#                    the unit's MemoryMax= (MemoryHigh= at 90%), in a drop-in
#   --no-start       install and enable, but do not start now
#   --no-package     build the venv (and its link to JetPack's TensorRT) but do not install
#                    edge-triage into it (install it yourself, e.g. from a wheelhouse)
#   --uninstall      stop and disable the service and remove what install put in place;
#                    configuration (/etc/edge-agent) and state (/var/lib/edge-agent) stay
#   --purge          with --uninstall: also delete configuration, state and the venv
#   --root DIR       install into DIR as if it were / (for packaging and tests), and look
#                    there for a Jetson's files: no user is created, systemctl is not called,
#                    no venv is built unless --with-venv
#   --with-venv      with --root: build the venv under DIR too
#   --dry-run        print the commands instead of running them
#
# On a Jetson (a device-tree model naming Jetson or NVIDIA, and /etc/nv_tegra_release) the
# venv sees JetPack's own TensorRT Python module (a .pth file naming the system dist-packages
# folder that holds it) and NVIDIA's onnxruntime-gpu (--ort-wheel); the package goes in
# without an ONNX Runtime extra, and a CPU-only onnxruntime found in the venv is refused: it
# installs the same module and would shadow NVIDIA's build. The unit's start timeout is
# raised (the first start builds the TensorRT engine into the cache).
#
# What it puts in place
#   /opt/edge-triage/venv                           Python venv with edge-triage installed
#   /usr/lib/sysusers.d/edge-agent.conf             the edge-agent system user (sysusers.d)
#   /etc/systemd/system/edge-agent.service          the hardened unit
#   /etc/systemd/system/edge-agent.service.d/10-watch-dir.conf   ReadOnlyPaths= the watch dir
#   /etc/systemd/system/edge-agent.service.d/20-memory.conf      MemoryMax= (with --profile)
#   /etc/systemd/system/edge-agent.service.d/30-jetson.conf      TimeoutStartSec= (a Jetson)
#   /etc/edge-agent/agent.toml                      configuration, only if none exists
#   /etc/edge-agent/mqtt_password                   empty placeholder (mode 0600), only if none
set -eu

WATCH_DIR=/srv/dicom/incoming
EXTRA=
ORT_WHEEL=
PYTHON=python3
WITH_VENV=no
PACKAGE=yes
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
        --ort-wheel) ORT_WHEEL=${2:?--ort-wheel needs a wheel file}; shift 2 ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
        --with-venv) WITH_VENV=yes; shift ;;
        --no-package) PACKAGE=no; shift ;;
        --profile) PROFILE=${2:?--profile needs a name}; shift 2 ;;
        --no-start) START=no; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) PURGE=yes; shift ;;
        --root) ROOT=${2:?--root needs a folder}; shift 2 ;;
        --dry-run) DRY=yes; shift ;;
        -h|--help) sed -n '2,50p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$EXTRA" in ''|cpu|gpu|none) ;; *) echo "install.sh: --extra must be cpu, gpu or none" >&2; exit 2 ;; esac
if [ -n "$ORT_WHEEL" ]; then
    case "$ORT_WHEEL" in *.whl) ;; *) echo "install.sh: --ort-wheel takes a .whl file" >&2; exit 2 ;; esac
    [ -f "$ORT_WHEEL" ] || { echo "install.sh: no wheel file $ORT_WHEEL" >&2; exit 2; }
fi
if [ "$WITH_VENV" = yes ] && [ -z "$ROOT" ]; then
    echo "install.sh: --with-venv goes with --root (without it the venv is always built)" >&2; exit 2
fi
case "$WATCH_DIR" in /*) ;; *) echo "install.sh: --watch-dir must be an absolute path" >&2; exit 2 ;; esac
case "$WATCH_DIR" in *[\"\\#\&]*) echo "install.sh: --watch-dir must not contain \" \\ # or &" >&2; exit 2 ;; esac
if [ "$PURGE" = yes ] && [ "$ACTION" != uninstall ]; then
    echo "install.sh: --purge goes with --uninstall" >&2; exit 2
fi

SRC=$(cd "$(dirname "$0")/.." && pwd)

# A Jetson: the device tree names the board (NUL-terminated) and JetPack wrote its release.
JETSON=no
for model in "$ROOT/proc/device-tree/model" "$ROOT/sys/firmware/devicetree/base/model"; do
    if [ -r "$model" ]; then
        if tr -d '\000' < "$model" | grep -qiE 'jetson|nvidia' && [ -f "$ROOT/etc/nv_tegra_release" ]; then
            JETSON=yes
        fi
        break
    fi
done
if [ "$JETSON" = yes ]; then
    echo "Jetson: $(tr -d '\000' < "$model"); $(head -n 1 "$ROOT/etc/nv_tegra_release")"
    case "$EXTRA" in
        cpu|gpu)
            echo "install.sh: on a Jetson, --extra $EXTRA would install PyPI's onnxruntime build" \
                "(CPU-only or x86 CUDA), which shadows NVIDIA's onnxruntime-gpu for JetPack." \
                "Leave --extra out and give NVIDIA's wheel with --ort-wheel FILE." >&2
            exit 2 ;;
    esac
    EXTRA=none
elif [ -n "$ORT_WHEEL" ]; then
    echo "install.sh: --ort-wheel is for a Jetson (NVIDIA's onnxruntime-gpu for JetPack); this is not one" >&2
    exit 2
fi
[ -n "$EXTRA" ] || EXTRA=cpu
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
JETSON_DROPIN=/etc/systemd/system/edge-agent.service.d/30-jetson.conf
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

jetpack_link() {  # $1 venv: a .pth naming the dist-packages folder with JetPack's tensorrt
    trt_dir=
    for dir in "$ROOT"/usr/lib/python3*/dist-packages "$ROOT"/usr/lib/python3/dist-packages; do
        if [ -d "$dir/tensorrt" ]; then trt_dir=$dir; fi
    done
    if [ -z "$trt_dir" ]; then
        echo "warning: JetPack's TensorRT Python module was not found under $ROOT/usr/lib/python3*/dist-packages" \
            "(sudo apt install nvidia-jetpack, or python3-libnvinfer); ONNX Runtime's TensorRT provider" \
            "does not need it, the native runner and edge-export tensorrt do" >&2
        return 0
    fi
    if [ "$DRY" = yes ]; then
        echo "+ write $1/lib/python3.X/site-packages/jetpack-tensorrt.pth ($trt_dir)"
        return 0
    fi
    want=$(basename "$(dirname "$trt_dir")")
    have=$("$1/bin/python" -c 'import sys; print("python%d.%d" % sys.version_info[:2])')
    if [ "$want" != python3 ] && [ "$want" != "$have" ]; then
        echo "install.sh: JetPack's TensorRT module in $trt_dir is built for $want, the venv is $have:" \
            "rebuild it with --python /usr/bin/$want (remove $1 first)" >&2
        exit 2
    fi
    site=$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    printf '%s\n' "$trt_dir" > "$site/jetpack-tensorrt.pth"
    echo "+ write $site/jetpack-tensorrt.pth ($trt_dir)"
}

jetson_verify() {  # $1 venv: NVIDIA's ONNX Runtime, not PyPI's CPU build; TensorRT visible
    "$1/bin/python" - <<'PY'
import importlib.metadata as md
import sys

def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

cpu, gpu = version("onnxruntime"), version("onnxruntime-gpu")
if cpu is not None:
    print(
        f"install.sh: the venv has the CPU-only onnxruntime {cpu}; it installs the same module "
        "as NVIDIA's onnxruntime-gpu and shadows it. Remove it (pip uninstall onnxruntime) and "
        "install NVIDIA's wheel (--ort-wheel FILE).",
        file=sys.stderr,
    )
    sys.exit(3)
if gpu is None:
    print(
        "warning: no onnxruntime-gpu in the venv: install the onnxruntime-gpu wheel for your "
        "JetPack release from NVIDIA (--ort-wheel FILE); the agent cannot start without it",
        file=sys.stderr,
    )
else:
    print(f"ONNX Runtime: onnxruntime-gpu {gpu}")
    try:
        import onnxruntime
        providers = list(onnxruntime.get_available_providers())
    except Exception as exc:  # a wheel for another JetPack fails to load its CUDA libraries
        print(f"warning: onnxruntime-gpu does not load: {exc}", file=sys.stderr)
    else:
        print(f"ONNX Runtime providers: {', '.join(providers)}")
        if "TensorrtExecutionProvider" not in providers:
            print(
                "warning: this onnxruntime-gpu has no TensorRT provider: is it the wheel "
                "for this JetPack release?",
                file=sys.stderr,
            )
try:
    import tensorrt
except Exception as exc:
    print(f"warning: the venv does not import JetPack's tensorrt: {exc}", file=sys.stderr)
else:
    print(f"TensorRT: {getattr(tensorrt, '__version__', '?')} from {tensorrt.__file__}")
PY
}

if [ -z "$ROOT" ] && [ "$DRY" = no ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (sudo), or with --dry-run to see what it would do" >&2
    exit 1
fi

if [ "$ACTION" = uninstall ]; then
    if [ -z "$ROOT" ] && [ -e "$UNIT" ]; then run systemctl disable --now edge-agent.service; fi
    run rm -f "$ROOT$UNIT" "$ROOT$DROPIN" "$ROOT$MEMORY_DROPIN" "$ROOT$JETSON_DROPIN" "$ROOT$SYSUSERS"
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
if [ -z "$ROOT" ] || [ "$WITH_VENV" = yes ]; then
    V=$ROOT$VENV
    [ -x "$V/bin/python" ] || run "$PYTHON" -m venv "$V"
    if [ "$JETSON" = yes ]; then
        jetpack_link "$V"
    fi
    if [ -n "$ORT_WHEEL" ]; then
        run "$V/bin/pip" install --quiet "$ORT_WHEEL"
    fi
    if [ "$PACKAGE" = yes ]; then
        case "$EXTRA" in
            none) run "$V/bin/pip" install --quiet "$SRC" ;;
            *) run "$V/bin/pip" install --quiet "$SRC[$EXTRA]" ;;
        esac
    fi
    if [ "$JETSON" = yes ] && [ "$DRY" = no ]; then
        jetson_verify "$V"
    fi
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
if [ "$JETSON" = yes ]; then
    # ONNX Runtime's TensorRT provider builds the engine during the first start (warm-up
    # before READY=1): minutes for MedSigLIP on an Orin Nano, more than the unit's 600 s.
    if [ "$DRY" = no ]; then
        printf '# Written by systemd/install.sh on a Jetson: the first start builds the TensorRT engine.\n[Service]\nTimeoutStartSec=1800\n' \
            > "$ROOT$JETSON_DROPIN"
    else
        echo "+ write $ROOT$JETSON_DROPIN (TimeoutStartSec=1800)"
    fi
fi
on_host systemctl daemon-reload
on_host systemctl enable edge-agent.service
if [ "$START" = yes ]; then
    on_host systemctl restart edge-agent.service
fi
echo "installed. Check it with: $VENV/bin/edge-agent check --config $CONF_DIR/agent.toml"

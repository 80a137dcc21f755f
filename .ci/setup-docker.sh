#!/usr/bin/env bash
# Provision Docker for the docker backend's tests on a fresh Debian (bookworm) machine, as root.
#
#   1. install docker.io + debootstrap + runsc (gVisor) from apt (only if missing), and
#      register runsc as the daemon's runtime "runsc" in /etc/docker/daemon.json,
#   2. start dockerd in the background (only if `docker info` fails) and wait for it,
#   3. build the kernel image limited-provisioner-kernel:latest OFFLINE from a debootstrap
#      rootfs (only if it does not exist yet, or has another version label) -- no image
#      registry is involved: Debian's python3 from the apt mirror, then the pinned packages
#      of limited_provisioner/docker/image/requirements.txt (ipykernel, comm, ipywidgets,
#      numpy, pandas, matplotlib...) pip-installed from PyPI into the rootfs's /usr/local.
#
# Idempotent: a second run finds everything in place and takes a few seconds.
# Environment overrides:
#   LIMITED_PROVISIONER_TEST_IMAGE (alias LP_KERNEL_IMAGE)  image tag to build, and the one
#                     the tests use (default limited-provisioner-kernel:latest)
#   LP_DEBIAN_MIRROR  Debian mirror for debootstrap (default: parsed from the apt sources)
#   LP_DOCKERD_FLAGS  dockerd flags; skips the built-in list of flag sets to try
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST, PIP_DEFAULT_TIMEOUT: passed on to
#                     the pip run in the rootfs (default: PyPI)
set -euo pipefail

IMAGE=${LIMITED_PROVISIONER_TEST_IMAGE:-${LP_KERNEL_IMAGE:-limited-provisioner-kernel:latest}}
# What goes into the image: Debian packages it keeps, Debian packages only the build needs
# (purged before the import), and the pinned Python packages (shared with the Dockerfile of
# `limited-provisioner build-image`). Bump IMAGE_VERSION when this script's recipe changes;
# the image's version label is IMAGE_VERSION plus a hash of REQUIREMENTS, and an image with
# another label is rebuilt.
KERNEL_PACKAGES="python3 ca-certificates"
BUILD_PACKAGES="python3-pip"
REQUIREMENTS=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/limited_provisioner/docker/image/requirements.txt
IMAGE_VERSION=3
SUITE=bookworm
FALLBACK_MIRROR=http://deb.debian.org/debian
DOCKERD_LOG=/var/log/dockerd.log
DAEMON_JSON=/etc/docker/daemon.json
DOCKERD_PIDFILE=/run/limited-provisioner-dockerd.pid
DOCKERD_WAIT=60
WORK_PREFIX=/var/tmp/limited-provisioner-rootfs.
# dockerd flag sets, tried in order until the daemon comes up (a set is abandoned only when
# dockerd exits by itself). vfs is the storage driver that works everywhere but copies whole
# layers; the kernel image is a single layer, so that costs little.
DOCKERD_FLAG_SETS=(
    ""
    "--iptables=false"
    "--storage-driver=vfs --iptables=false"
)

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"
export LC_ALL=C

T_START=$EPOCHREALTIME
T_STEP=$T_START
log() { echo "[setup-docker] $*"; }
die() { echo "[setup-docker] ERROR: $*" >&2; exit 1; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
step_done() {  # step_done NAME DETAIL
    log "step $1: $(elapsed "$T_STEP")s (total $(elapsed "$T_START")s) -- $2"
    T_STEP=$EPOCHREALTIME
}

[ "$(id -u)" -eq 0 ] || die "must run as root"
[ -r "$REQUIREMENTS" ] || die "missing $REQUIREMENTS"
IMAGE_LABEL="$IMAGE_VERSION+req.$(sha256sum "$REQUIREMENTS" | cut -c1-12)"

# One run at a time (CI and a developer may share the machine).
exec 9>/run/limited-provisioner-setup-docker.lock
flock -w 1800 9 || die "another setup-docker.sh run held /run/limited-provisioner-setup-docker.lock for 30 min"

# ---------------------------------------------------------------- step 1: packages
missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v runsc >/dev/null 2>&1 || missing+=(runsc)
if [ ${#missing[@]} -gt 0 ]; then
    # Keep the package scripts from starting services (docker.io would start its own
    # dockerd with other flags): a policy-rc.d that denies everything, if there is none.
    own_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
    command -v dockerd >/dev/null 2>&1 || die "dockerd still missing after installing docker.io"
    command -v debootstrap >/dev/null 2>&1 || die "debootstrap still missing after installing it"
    command -v runsc >/dev/null 2>&1 || die "runsc still missing after installing it"
    step_done "1/3 packages" "installed ${missing[*]}"
else
    step_done "1/3 packages" "dockerd and debootstrap already present"
fi
command -v docker >/dev/null 2>&1 || die "no docker client on PATH"

# gVisor as the daemon's runtime "runsc" (the runtime trait), in daemon.json before the
# daemon starts (an already running one reloads it below). --host-uds=create: the server
# reaches the kernel's ipc sockets in its bind-mounted dir; --network=none: this runsc
# build (2022) takes every network namespace for the host's on Linux >= 6 and refuses to
# start with a network; --platform=ptrace: its KVM platform hangs in this VM.
RUNSC_CHANGED=$(python3 - "$DAEMON_JSON" "$(command -v runsc)" <<'PY'
import json, os, sys
path, runsc = sys.argv[1], sys.argv[2]
try:
    with open(path) as f:
        config = json.load(f)
except FileNotFoundError:
    config = {}
want = {"path": runsc, "runtimeArgs": ["--platform=ptrace", "--host-uds=create", "--network=none"]}
if config.setdefault("runtimes", {}).get("runsc") != want:
    config["runtimes"]["runsc"] = want
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(path + ".tmp", path)
    print("changed")
PY
)

# ---------------------------------------------------------------- step 2: daemon
docker_ok() { timeout 20 docker info >/dev/null 2>&1; }
pid_alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
is_dockerd() { pid_alive "${1:-}" && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = dockerd ]; }

# wait_docker PID DEADLINE: 0 when `docker info` works, 1 when PID exited, 2 at the deadline.
wait_docker() {
    while :; do
        docker_ok && return 0
        pid_alive "$1" || { docker_ok && return 0; return 1; }
        [ "$SECONDS" -lt "$2" ] || return 2
        sleep 0.5
    done
}

if docker_ok; then
    step_done "2/3 daemon" "dockerd already running"
else
    deadline=$((SECONDS + DOCKERD_WAIT))
    pid=
    # A daemon already starting (ours from an earlier run, or anyone's) is waited for, never
    # doubled.
    for f in "$DOCKERD_PIDFILE" /var/run/docker.pid; do
        if [ -s "$f" ] && is_dockerd "$(cat "$f")"; then pid=$(cat "$f"); break; fi
    done
    if [ -n "$pid" ]; then
        log "dockerd (pid $pid) is running but not answering yet: waiting for it"
        rc=0; wait_docker "$pid" "$deadline" || rc=$?
        [ "$rc" -eq 0 ] || die "dockerd (pid $pid) did not answer \`docker info\` within ${DOCKERD_WAIT}s; see $DOCKERD_LOG"
        step_done "2/3 daemon" "dockerd (pid $pid) became ready"
    else
        if [ -n "${LP_DOCKERD_FLAGS+x}" ]; then flag_sets=("$LP_DOCKERD_FLAGS"); else flag_sets=("${DOCKERD_FLAG_SETS[@]}"); fi
        started=
        for flags in "${flag_sets[@]}"; do
            [ "$SECONDS" -lt "$deadline" ] || break
            log "starting dockerd ${flags:-(default flags)}; log: $DOCKERD_LOG"
            echo "=== $(date -u +%FT%TZ) setup-docker.sh: dockerd $flags" >>"$DOCKERD_LOG"
            # Own session, no tie to this script's stdin/stdout: it outlives the script and the
            # CI step. Not a process group leader here, so setsid execs in place: $! is dockerd.
            # shellcheck disable=SC2086
            # 9>&-: the daemon must not inherit (and so hold forever) the lock of this script.
            setsid nohup dockerd $flags </dev/null >>"$DOCKERD_LOG" 2>&1 9>&- &
            pid=$!
            echo "$pid" >"$DOCKERD_PIDFILE"
            rc=0; wait_docker "$pid" "$deadline" || rc=$?
            if [ "$rc" -eq 0 ]; then started=1; break; fi
            if [ "$rc" -eq 2 ]; then
                die "dockerd (pid $pid, flags '${flags}') did not answer \`docker info\` within ${DOCKERD_WAIT}s; left running; see $DOCKERD_LOG"
            fi
            log "dockerd with flags '${flags}' exited; last lines of $DOCKERD_LOG:"
            tail -n 5 "$DOCKERD_LOG" | sed 's/^/    /'
            rm -f "$DOCKERD_PIDFILE"
        done
        [ -n "$started" ] || die "could not start dockerd within ${DOCKERD_WAIT}s (tried: $(printf "'%s' " "${flag_sets[@]}")); see $DOCKERD_LOG"
        step_done "2/3 daemon" "started dockerd pid $pid with flags '${flags}'"
    fi
fi
runsc_listed() { docker info --format '{{json .Runtimes.runsc}}' 2>/dev/null | grep -q -- '--host-uds=create'; }
if [ -n "$RUNSC_CHANGED" ]; then
    # daemon.json changed under a running daemon: reload its configuration (SIGHUP
    # re-reads runtimes; running containers are not touched).
    pid=$(cat "$DOCKERD_PIDFILE" 2>/dev/null || pidof dockerd || true)
    is_dockerd "$pid" || die "runsc registered in $DAEMON_JSON, but no dockerd pid to reload it"
    kill -HUP "$pid"
    for _ in $(seq 50); do runsc_listed && break; sleep 0.2; done
fi
runsc_listed || die "dockerd does not list runsc with --host-uds=create after reading $DAEMON_JSON; see $DOCKERD_LOG"
log "runtimes: $(docker info --format '{{json .Runtimes}}')"
log "docker: server $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'), storage driver $(docker info --format '{{.Driver}}' 2>/dev/null || echo '?')"

# ---------------------------------------------------------------- step 3: kernel image

# Mirror for debootstrap: the first http(s) URI of an enabled "deb" source for $SUITE with
# component main, from one-line (.list) and deb822 (.sources) files, in apt's reading order.
sources_uris() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            { sub(/#.*/, "") }
            $1 == "deb" {
                i = 2
                if ($2 ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) != suite) next
                for (j = i + 2; j <= NF; j++) if ($j == "main") { print $i; next }
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            function has(list, word,   n, k, a) {
                n = split(list, a, /[ \t]+/)
                for (k = 1; k <= n; k++) if (a[k] == word) return 1
                return 0
            }
            function flush(   n, k, a) {
                if (has(f["types"], "deb") && has(f["suites"], suite) && has(f["components"], "main") \
                    && tolower(f["enabled"]) !~ /^[ \t]*no/) {
                    n = split(f["uris"], a, /[ \t]+/)
                    for (k = 1; k <= n; k++) if (a[k] != "") print a[k]
                }
                delete f; key = ""
            }
            /^#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ { if (key != "") f[key] = f[key] " " $0; next }
            {
                c = index($0, ":"); if (c == 0) next
                key = tolower(substr($0, 1, c - 1)); f[key] = substr($0, c + 1)
            }
            END { flush() }' "$f"
    done
}

pick_mirror() {
    local uris http https
    uris=$(sources_uris 2>/dev/null || true)
    http=$(grep -m1 -E '^http://' <<<"$uris" || true)
    https=$(grep -m1 -E '^https://' <<<"$uris" || true)
    if [ -n "$http" ]; then echo "${http%/}"
    elif [ -n "$https" ]; then echo "${https%/}"
    else echo "$FALLBACK_MIRROR"
    fi
}

# Unmount everything mounted at or below $1 (deepest first).
unmount_under() {
    local m
    awk -v r="$1" '$5 == r || index($5, r "/") == 1 { print $5 }' /proc/self/mountinfo \
        | sort -r | while read -r m; do
            umount "$m" 2>/dev/null || umount -l "$m"
        done
}

remove_workdir() {
    [ -n "${1:-}" ] && [ -d "$1" ] || return 0
    unmount_under "$1"
    rm -rf --one-file-system "$1"
}

WORK=
cleanup() {
    local rc=$?
    [ -z "$WORK" ] || remove_workdir "$WORK" || true
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

have_version=$(docker image inspect --format '{{index .Config.Labels "limited-provisioner.image-version"}}' "$IMAGE" 2>/dev/null || true)
if [ "$have_version" = "$IMAGE_LABEL" ]; then
    step_done "3/3 image" "$IMAGE exists ($(docker image inspect --format '{{.Id}}' "$IMAGE" | cut -c1-19)), reused"
else
    # Leftovers of a run that was killed (we hold the lock, so none is in use).
    for d in "$WORK_PREFIX"*; do
        [ -d "$d" ] || continue
        log "removing leftover $d"
        remove_workdir "$d"
    done

    MIRROR=${LP_DEBIAN_MIRROR:-$(pick_mirror)}
    WORK=$(mktemp -d "${WORK_PREFIX}XXXXXX")
    ROOTFS=$WORK/rootfs
    log "building $IMAGE offline: debootstrap --variant=minbase $SUITE from $MIRROR in $ROOTFS"

    extra=()
    case $MIRROR in https://*) extra+=(--include=ca-certificates) ;; esac
    debootstrap --variant=minbase "${extra[@]}" "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
        tail -n 30 "$WORK/debootstrap.log" >&2
        tail -n 30 "$ROOTFS/debootstrap/debootstrap.log" >&2 2>/dev/null || true
        die "debootstrap failed"
    }
    log "  debootstrap done ($(elapsed "$T_STEP")s)"

    # apt inside the chroot: same mirror; -updates too, and -security from the host's sources.
    security=$(SUITE=$SUITE-security sources_uris 2>/dev/null | grep -m1 -E '^https?://' || true)
    {
        echo "deb $MIRROR $SUITE main"
        echo "deb $MIRROR $SUITE-updates main"
        [ -z "$security" ] || echo "deb ${security%/} $SUITE-security main"
    } >"$ROOTFS/etc/apt/sources.list"
    rm -f "$ROOTFS/etc/resolv.conf"
    cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
    chmod 755 "$ROOTFS/usr/sbin/policy-rc.d"
    mountpoint -q "$ROOTFS/proc" || mount -t proc proc "$ROOTFS/proc"

    in_root() {
        chroot "$ROOTFS" /usr/bin/env -i DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 HOME=/root \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
    }
    # shellcheck disable=SC2086
    in_root apt-get update -q -o Acquire::Retries=3 >"$WORK/apt.log" 2>&1 \
        && in_root apt-get install -y -q --no-install-recommends -o Acquire::Retries=3 \
            $KERNEL_PACKAGES $BUILD_PACKAGES >>"$WORK/apt.log" 2>&1 || {
        tail -n 40 "$WORK/apt.log" >&2
        die "apt-get install $KERNEL_PACKAGES $BUILD_PACKAGES in the rootfs failed"
    }
    log "  $KERNEL_PACKAGES $BUILD_PACKAGES installed ($(elapsed "$T_STEP")s)"

    # The Python packages: wheels only (no compiler in the image), into /usr/local (Debian's
    # python3 reads it; /usr/bin/python3 and python3 on PATH are the same interpreter).
    pip_env=()
    for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST PIP_DEFAULT_TIMEOUT; do
        [ -z "${!var:-}" ] || pip_env+=("$var=${!var}")
    done
    # The host's CA bundle for this one run (a machine whose HTTPS goes through a proxy
    # with its own CA has it there, not in the rootfs's ca-certificates); not kept.
    host_ca=
    for f in "${PIP_CERT:-}" "${REQUESTS_CA_BUNDLE:-}" "${SSL_CERT_FILE:-}" \
        /etc/ssl/certs/ca-certificates.crt; do
        if [ -n "$f" ] && [ -f "$f" ]; then host_ca=$f; break; fi
    done
    if [ -n "$host_ca" ]; then
        cp -L "$host_ca" "$ROOTFS/tmp/host-ca.crt"
        pip_env+=(PIP_CERT=/tmp/host-ca.crt)
    fi
    cp "$REQUIREMENTS" "$ROOTFS/tmp/requirements.txt"
    in_root "${pip_env[@]}" python3 -m pip install --break-system-packages --no-cache-dir \
        --only-binary=:all: --disable-pip-version-check --root-user-action=ignore \
        --no-warn-script-location --retries 5 -r /tmp/requirements.txt \
        >"$WORK/pip.log" 2>&1 || {
        tail -n 40 "$WORK/pip.log" >&2
        die "pip install -r $REQUIREMENTS in the rootfs failed"
    }
    rm -f "$ROOTFS/tmp/requirements.txt" "$ROOTFS/tmp/host-ca.crt"
    # The test suites of pandas, numpy and matplotlib (~65 MB; a kernel never runs them).
    # The Dockerfile removes the same.
    for site in "$ROOTFS"/usr/local/lib/python3*/dist-packages; do
        (cd "$site" && find pandas numpy matplotlib mpl_toolkits -depth -type d -name tests \
            -exec rm -rf {} +)
    done
    # pip and what only it needed (setuptools, wheel...): the kernel never installs.
    in_root apt-get purge -y -q --autoremove $BUILD_PACKAGES >>"$WORK/apt.log" 2>&1 || {
        tail -n 40 "$WORK/apt.log" >&2
        die "apt-get purge $BUILD_PACKAGES in the rootfs failed"
    }
    # What a notebook imports, imported once here: a broken set fails the build, not a kernel.
    in_root MPLCONFIGDIR=/tmp/lp-check python3 -c \
        'import ipykernel.kernelapp, comm, ipywidgets, numpy, pandas, matplotlib.pyplot' \
        >"$WORK/check.log" 2>&1 || {
        tail -n 40 "$WORK/check.log" >&2
        die "the rootfs's python3 cannot import what it should"
    }
    rm -rf "$ROOTFS/tmp/lp-check"
    log "  $(grep -c '^[A-Za-z]' "$REQUIREMENTS") Python packages installed from $(basename "$REQUIREMENTS"), $BUILD_PACKAGES purged ($(elapsed "$T_STEP")s)"

    in_root groupadd --gid 1000 kernel
    in_root useradd --uid 1000 --gid 1000 --home-dir /home/kernel --create-home \
        --shell /bin/bash kernel

    # Shrink, and leave no host state behind (docker supplies its own resolv.conf).
    in_root apt-get clean
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
        "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/cache/apt/archives/partial/* \
        "$ROOTFS"/var/log/apt/* "$ROOTFS"/var/log/dpkg.log "$ROOTFS"/var/log/alternatives.log \
        "$ROOTFS"/root/.cache "$ROOTFS/usr/sbin/policy-rc.d"
    : >"$ROOTFS/etc/resolv.conf"
    unmount_under "$ROOTFS"
    if awk -v r="$ROOTFS" '$5 == r || index($5, r "/") == 1 { f = 1 } END { exit !f }' /proc/self/mountinfo; then
        die "something is still mounted under $ROOTFS"
    fi

    # PYDEVD_DISABLE_FILE_VALIDATION: debugpy (ipykernel imports it) would print a warning
    # about frozen modules at every kernel start, into the container log whose tail explains
    # a kernel's death; the kernelspecs turn the debugger off anyway.
    log "  importing ($(du -sh --one-file-system "$ROOTFS" | cut -f1) rootfs)"
    tar --numeric-owner -C "$ROOTFS" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PYDEVD_DISABLE_FILE_VALIDATION=1' \
        --change 'USER 1000:1000' \
        --change 'WORKDIR /home/kernel' \
        --change 'CMD ["python3"]' \
        --change "LABEL limited-provisioner.image-version=$IMAGE_LABEL" \
        --message "limited-provisioner kernel: debootstrap $SUITE minbase + python3 + $(basename "$REQUIREMENTS")" \
        - "$IMAGE" >/dev/null
    docker image inspect "$IMAGE" >/dev/null 2>&1 || die "docker import did not produce $IMAGE"

    remove_workdir "$WORK"
    WORK=
    step_done "3/3 image" "built $IMAGE ($(docker image inspect --format '{{.Size}}' "$IMAGE" \
        | awk '{ printf "%.0f MB", $1 / 1e6 }'))"
fi

log "ready in $(elapsed "$T_START")s"

#!/usr/bin/env bash
# Build the cgroup-v2 test VM's disk image (tests/vm/README.md), as root, on Debian.
#
#   tests/vm/build.sh [SOURCE_TREE]      (default: the repository this script is in)
#
#   1. host tools: qemu-system-x86 (qemu-system-x86_64), debootstrap, e2fsprogs (apt, only
#      the missing ones, no service started);
#   2. base rootfs: debootstrap bookworm minbase + python3-venv, iproute2, util-linux and the
#      guest's own kernel (linux-image-amd64, installed INTO the rootfs: its modules match, and
#      the host's /boot and bootloader are never touched), a small initramfs (virtio + ext4)
#      and the user vmuser (uid 1000);
#   3. venv /opt/lp-vm/venv: wheels fetched by the HOST's pip (its index/proxy/CA apply), then
#      `pip install -e '/io/src[test]'` of SOURCE_TREE offline in the chroot (the same extras
#      as the README's test command). Editable: at run time the project is whatever run.sh
#      puts on the io disk mounted at /io, so changed sources never need a rebuild;
#   4. rootfs.img: the PID 1 stub /sbin/lp-vm-init (mounts the io disk, execs its
#      guest-init.sh), then the rootfs packed with `mkfs.ext4 -d` (no loop device, no mount).
#
# Each step is keyed by a hash of what goes into it (step 3: SOURCE_TREE/pyproject.toml) and
# skipped when its key is unchanged: a second run takes about a second. Output in $LP_VM_DIR:
# vmlinuz, initrd.img, rootfs.img (+ .key stamps, pip-freeze.txt); work dirs under it too.
# Environment overrides:
#   LP_VM_DIR         cache/output directory   (default /var/lib/limited-provisioner-vm)
#   LP_DEBIAN_MIRROR  mirror for debootstrap   (default: the host's apt sources, else deb.debian.org)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SOURCE=$(cd "${1:-$HERE/../..}" && pwd)
VM_DIR=${LP_VM_DIR:-/var/lib/limited-provisioner-vm}
SUITE=bookworm
FALLBACK_MIRROR=http://deb.debian.org/debian
# What goes into the base rootfs; bump BASE_VERSION when the recipe below changes.
BASE_VERSION=1
GUEST_PACKAGES="python3 python3-venv iproute2 procps util-linux"
GUEST_KERNEL=linux-image-amd64
# Bump VENV_VERSION when the venv recipe changes (the pyproject.toml is hashed anyway).
VENV_VERSION=1
VENV=/opt/lp-vm/venv
IMAGE_HEADROOM_MB=1536   # free space in the guest's root fs (tests write /var/lib, /home)

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"
export LC_ALL=C

T_START=$EPOCHREALTIME
T_STEP=$T_START
log() { echo "[vm-build] $*"; }
die() { echo "[vm-build] ERROR: $*" >&2; exit 1; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
step_done() {  # step_done NAME DETAIL
    log "step $1: $(elapsed "$T_STEP")s (total $(elapsed "$T_START")s) -- $2"
    T_STEP=$EPOCHREALTIME
}

[ "$(id -u)" -eq 0 ] || die "must run as root"
[ -f "$SOURCE/pyproject.toml" ] || die "$SOURCE has no pyproject.toml (give the repository root)"
mkdir -p "$VM_DIR"

# One build at a time; run.sh's VMs keep their (replaced, never rewritten) image open.
exec 8>"$VM_DIR/build.lock"
flock -w 3600 8 || die "another build held $VM_DIR/build.lock for an hour"

# ---------------------------------------------------------------- helpers
stamp_of() { cat "$1" 2>/dev/null || true; }

# Unmount everything mounted at or below $1 (deepest first).
unmount_under() {
    local m
    awk -v r="$1" '$5 == r || index($5, r "/") == 1 { print $5 }' /proc/self/mountinfo \
        | sort -r | while read -r m; do
            umount "$m" 2>/dev/null || umount -l "$m"
        done
}

remove_tree() {
    [ -n "${1:-}" ] && [ -e "$1" ] || return 0
    unmount_under "$1"
    rm -rf --one-file-system "$1"
}

# Mounted by us, unmounted whatever happens (never a leftover mount in $VM_DIR).
CHROOTS=()
cleanup() {
    local rc=$? r
    for r in "${CHROOTS[@]}"; do unmount_under "$r" || true; done
    [ -z "${NEW_ROOT:-}" ] || remove_tree "$NEW_ROOT" || true
    rm -f "$VM_DIR/rootfs.img.new"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_root() {  # in_root ROOTFS CMD...: a clean environment in the chroot
    local root=$1; shift
    chroot "$root" /usr/bin/env -i DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 HOME=/root \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
}

chroot_mounts() {  # /proc for apt and pip, the host's DNS
    CHROOTS+=("$1")
    mountpoint -q "$1/proc" || mount -t proc proc "$1/proc"
    rm -f "$1/etc/resolv.conf"
    cp -L /etc/resolv.conf "$1/etc/resolv.conf"
}

chroot_unmount() {
    unmount_under "$1"
    if awk -v r="$1" '$5 == r || index($5, r "/") == 1 { f = 1 } END { exit !f }' /proc/self/mountinfo; then
        die "something is still mounted under $1"
    fi
    : >"$1/etc/resolv.conf"
}

# Mirror: LP_DEBIAN_MIRROR, else the host's configured bookworm main (apt resolves .list and
# deb822 .sources alike), else deb.debian.org.
pick_mirror() {
    local uri
    uri=$(apt-get indextargets --format '$(REPO_URI) $(CODENAME) $(COMPONENT)' 2>/dev/null \
        | awk -v s="$SUITE" '$2 == s && $3 == "main" && $1 ~ /^https?:\/\// { print $1; exit }')
    echo "${uri:-$FALLBACK_MIRROR}" | sed 's:/*$::'
}

# ---------------------------------------------------------------- step 1: host tools
missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
{ command -v mkfs.ext4 && command -v debugfs; } >/dev/null 2>&1 || missing+=(e2fsprogs)
if [ ${#missing[@]} -gt 0 ]; then
    # Package scripts must start no service: a policy-rc.d that denies everything, if none.
    own_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    log "installing ${missing[*]}"
    apt-get update -q -o DPkg::Lock::Timeout=600 >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=600 "${missing[@]}" >/dev/null
    [ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d
    command -v qemu-system-x86_64 >/dev/null 2>&1 || die "qemu-system-x86_64 missing after installing qemu-system-x86"
    step_done "1/4 host tools" "installed ${missing[*]}"
else
    step_done "1/4 host tools" "qemu, debootstrap, e2fsprogs present"
fi
e2fs_version=$(mkfs.ext4 -V 2>&1 || true)
grep -qE ' 1\.(4[3-9]|[5-9][0-9])' <<<"$e2fs_version" || die "mkfs.ext4 too old for -d (needs e2fsprogs >= 1.43)"

# ---------------------------------------------------------------- step 2: base rootfs
ROOT=$VM_DIR/rootfs
INIT_STUB=$(cat <<'EOF'
#!/bin/sh
# PID 1 of the test VM (tests/vm/build.sh): mount the io disk, exec its guest-init.sh.
# Without one the VM powers off at once (run.sh then reports "did not finish").
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /io
if mount -t ext4 /dev/vdb /io && [ -f /io/guest-init.sh ]; then
    exec /bin/bash /io/guest-init.sh
fi
echo "[lp-vm] ERROR: no io disk (/dev/vdb with guest-init.sh)"
sync
echo o >/proc/sysrq-trigger
sleep 60
EOF
)
base_key=$(echo "$BASE_VERSION $SUITE $GUEST_PACKAGES $GUEST_KERNEL" | sha256sum | cut -c1-16)
if [ "$(stamp_of "$VM_DIR/base.key")" = "$base_key" ] && [ -d "$ROOT/etc" ] \
        && [ -f "$VM_DIR/vmlinuz" ] && [ -f "$VM_DIR/initrd.img" ]; then
    step_done "2/4 base rootfs" "up to date ($base_key)"
else
    rm -f "$VM_DIR/base.key" "$VM_DIR/venv.key" "$VM_DIR/image.key"
    MIRROR=${LP_DEBIAN_MIRROR:-$(pick_mirror)}
    NEW_ROOT=$VM_DIR/rootfs.new
    remove_tree "$NEW_ROOT"
    log "debootstrap --variant=minbase $SUITE from $MIRROR"
    extra=()
    case $MIRROR in https://*) extra+=(--include=ca-certificates) ;; esac
    debootstrap --variant=minbase "${extra[@]}" "$SUITE" "$NEW_ROOT" "$MIRROR" \
            >"$VM_DIR/debootstrap.log" 2>&1 || {
        tail -n 30 "$VM_DIR/debootstrap.log" >&2
        die "debootstrap failed (log: $VM_DIR/debootstrap.log)"
    }
    log "  debootstrap done ($(elapsed "$T_STEP")s)"

    security=$(apt-get indextargets --format '$(REPO_URI) $(CODENAME) $(COMPONENT)' 2>/dev/null \
        | awk -v s="$SUITE-security" '$2 == s && $3 == "main" && $1 ~ /^https?:\/\// { print $1; exit }')
    {
        echo "deb $MIRROR $SUITE main"
        echo "deb $MIRROR $SUITE-updates main"
        [ -z "$security" ] || echo "deb ${security%/} $SUITE-security main"
    } >"$NEW_ROOT/etc/apt/sources.list"
    printf '#!/bin/sh\nexit 101\n' >"$NEW_ROOT/usr/sbin/policy-rc.d"
    chmod 755 "$NEW_ROOT/usr/sbin/policy-rc.d"
    # A small initramfs: only what finds and mounts the root disk (a 35 MB "most" one
    # costs seconds of emulated decompression at every boot).
    mkdir -p "$NEW_ROOT/etc/initramfs-tools/conf.d"
    printf 'MODULES=list\nCOMPRESS=gzip\n' >"$NEW_ROOT/etc/initramfs-tools/conf.d/lp-vm.conf"
    printf 'virtio_pci\nvirtio_blk\next4\n' >>"$NEW_ROOT/etc/initramfs-tools/modules"
    chroot_mounts "$NEW_ROOT"
    # shellcheck disable=SC2086
    in_root "$NEW_ROOT" apt-get update -q -o Acquire::Retries=3 >"$VM_DIR/apt.log" 2>&1 \
        && in_root "$NEW_ROOT" apt-get install -y -q --no-install-recommends -o Acquire::Retries=3 \
            $GUEST_PACKAGES "$GUEST_KERNEL" >>"$VM_DIR/apt.log" 2>&1 || {
        tail -n 40 "$VM_DIR/apt.log" >&2
        die "apt-get install in the rootfs failed (log: $VM_DIR/apt.log)"
    }
    log "  $GUEST_PACKAGES $GUEST_KERNEL installed ($(elapsed "$T_STEP")s)"

    in_root "$NEW_ROOT" useradd --uid 1000 --user-group --create-home --shell /bin/bash vmuser
    echo lp-vm >"$NEW_ROOT/etc/hostname"
    printf '127.0.0.1\tlocalhost lp-vm\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$NEW_ROOT/etc/hosts"
    : >"$NEW_ROOT/etc/fstab"
    mkdir -p "$NEW_ROOT/io" "$NEW_ROOT/opt/lp-vm"

    in_root "$NEW_ROOT" apt-get clean
    rm -rf "$NEW_ROOT"/var/lib/apt/lists/* "$NEW_ROOT"/var/cache/apt/*.bin \
        "$NEW_ROOT"/var/log/apt/* "$NEW_ROOT"/root/.cache "$NEW_ROOT/usr/sbin/policy-rc.d"
    chroot_unmount "$NEW_ROOT"

    kernel=$(find "$NEW_ROOT/boot" -maxdepth 1 -name 'vmlinuz-*' | sort -V | tail -n1)
    initrd=$(find "$NEW_ROOT/boot" -maxdepth 1 -name 'initrd.img-*' | sort -V | tail -n1)
    [ -n "$kernel" ] && [ -n "$initrd" ] || die "no vmlinuz/initrd.img in the rootfs's /boot"
    cp "$kernel" "$VM_DIR/vmlinuz.new" && mv "$VM_DIR/vmlinuz.new" "$VM_DIR/vmlinuz"
    cp "$initrd" "$VM_DIR/initrd.img.new" && mv "$VM_DIR/initrd.img.new" "$VM_DIR/initrd.img"

    remove_tree "$ROOT"
    mv "$NEW_ROOT" "$ROOT"
    NEW_ROOT=
    echo "$base_key" >"$VM_DIR/base.key"
    step_done "2/4 base rootfs" "built ($base_key): $(basename "$kernel"), initrd $(du -h "$VM_DIR/initrd.img" | cut -f1), rootfs $(du -sh --one-file-system "$ROOT" | cut -f1)"
fi

# ---------------------------------------------------------------- step 3: venv
venv_key=$( { echo "$VENV_VERSION $base_key"; cat "$SOURCE/pyproject.toml"; } | sha256sum | cut -c1-16)
if [ "$(stamp_of "$VM_DIR/venv.key")" = "$venv_key" ] && [ -x "$ROOT$VENV/bin/python" ]; then
    step_done "3/4 venv" "up to date ($venv_key)"
else
    rm -f "$VM_DIR/venv.key" "$VM_DIR/image.key"
    rm -rf --one-file-system "$ROOT$VENV" "$ROOT/io/src" "$ROOT/io/wheels"
    # Wheels are fetched (and built, for sdists) by the HOST's pip: whatever index, proxy,
    # CA bundle or constraints this machine's pip is configured with apply. The guest's
    # interpreter must then be the same minor version (bookworm: 3.11 on both).
    guest_py=$(cd "$ROOT/usr/bin" && ls python3.[0-9]* 2>/dev/null | grep -E '^python3\.[0-9]+$' | sort -V | tail -n1)
    host_py=$(python3 -c 'import sys; print("python%d.%d" % sys.version_info[:2])' 2>/dev/null) \
        || die "no python3 on the host (its pip fetches the guest's wheels)"
    [ "$guest_py" = "$host_py" ] \
        || die "host $host_py but guest $guest_py: the host's pip cannot fetch the guest's wheels"
    python3 -m pip --version >/dev/null 2>&1 \
        || die "no pip for the host's python3 (apt-get install python3-pip)"
    WHEELS=$VM_DIR/wheels
    rm -rf "$WHEELS"
    python3 -m pip wheel -q --disable-pip-version-check -w "$WHEELS" \
            'hatchling>=1.21' editables "$SOURCE[test]" >"$VM_DIR/pip.log" 2>&1 || {
        tail -n 40 "$VM_DIR/pip.log" >&2
        die "host pip could not fetch the wheels of '$SOURCE[test]' (log: $VM_DIR/pip.log)"
    }
    rm -f "$WHEELS"/limited_provisioner-*.whl
    log "  $(ls "$WHEELS" | wc -l) wheels fetched ($(du -sh "$WHEELS" | cut -f1), $(elapsed "$T_STEP")s)"

    # The project goes where run.sh's io disk will put it: the editable install points there.
    mkdir -p "$ROOT/io/src" "$ROOT/io/wheels"
    (cd "$SOURCE" && tar --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
        --exclude=build --exclude=test-artifacts -c .) | tar -x -C "$ROOT/io/src"
    chroot_mounts "$ROOT"
    mount --bind "$WHEELS" "$ROOT/io/wheels"
    pip_offline=(env PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INDEX=1
                 PIP_FIND_LINKS=/io/wheels PIP_NO_CACHE_DIR=1 "$VENV/bin/pip" install -q)
    {
        in_root "$ROOT" python3 -m venv "$VENV" \
            && in_root "$ROOT" "${pip_offline[@]}" 'hatchling>=1.21' editables \
            && in_root "$ROOT" "${pip_offline[@]}" --no-build-isolation -e '/io/src[test]'
    } >>"$VM_DIR/pip.log" 2>&1 || {
        tail -n 40 "$VM_DIR/pip.log" >&2
        die "pip install -e '.[test]' in the rootfs failed (log: $VM_DIR/pip.log)"
    }
    in_root "$ROOT" "$VENV/bin/pip" freeze >"$VM_DIR/pip-freeze.txt" 2>/dev/null || true
    chroot_unmount "$ROOT"
    rm -rf --one-file-system "$ROOT/io/src" "$ROOT/io/wheels" "$ROOT/root/.cache"
    echo "$venv_key" >"$VM_DIR/venv.key"
    step_done "3/4 venv" "built ($venv_key): $(wc -l <"$VM_DIR/pip-freeze.txt") packages, $(du -sh "$ROOT$VENV" | cut -f1)"
fi

# ---------------------------------------------------------------- step 4: image
image_key="$base_key-$venv_key-$(echo "$INIT_STUB" | sha256sum | cut -c1-8)"
if [ "$(stamp_of "$VM_DIR/image.key")" = "$image_key" ] && [ -f "$VM_DIR/rootfs.img" ]; then
    step_done "4/4 image" "up to date ($image_key)"
else
    rm -f "$VM_DIR/image.key"
    printf '%s\n' "$INIT_STUB" >"$ROOT/sbin/lp-vm-init"
    chmod 755 "$ROOT/sbin/lp-vm-init"
    used_mb=$(du -sm --one-file-system "$ROOT" | cut -f1)
    size_mb=$(( used_mb * 11 / 10 + IMAGE_HEADROOM_MB ))
    rm -f "$VM_DIR/rootfs.img.new"
    truncate -s "${size_mb}M" "$VM_DIR/rootfs.img.new"
    mkfs.ext4 -q -F -L lp-vm-root -d "$ROOT" "$VM_DIR/rootfs.img.new" \
        || die "mkfs.ext4 -d $ROOT failed"
    # A rename: a VM still running on the old image keeps its (now unlinked) file.
    mv "$VM_DIR/rootfs.img.new" "$VM_DIR/rootfs.img"
    echo "$image_key" >"$VM_DIR/image.key"
    step_done "4/4 image" "packed $VM_DIR/rootfs.img (${size_mb} MB, $used_mb MB used)"
fi

log "ready in $(elapsed "$T_START")s: $VM_DIR/{vmlinuz,initrd.img,rootfs.img}"

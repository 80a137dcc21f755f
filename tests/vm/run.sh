#!/usr/bin/env bash
# Run pytest inside a QEMU VM whose host is cgroup v2 only (tests/vm/README.md), as root.
#
#   tests/vm/run.sh [PYTEST_ARGS...]          default: tests/unit
#   LP_VM_SOURCE=/work/wt-cg tests/vm/run.sh tests/test_cgroups_v2.py -x
#
# The VM (TCG, no KVM) boots Debian's kernel with cgroup_no_v1=all and runs the selection
# twice (LP_VM_RUNS): as root in a system service's cgroup, then as vmuser (uid 1000) in a
# systemd-style delegated user@1000.service subtree. `-m "not docker"` comes first, so a
# -m of yours replaces it. pytest's output streams live from the serial console.
#
# Environment:
#   LP_VM_SOURCE        project tree to test        (default: the repository of this script)
#   LP_VM_RUNS          runs, in order              (default "root user")
#   LP_VM_TIMEOUT       seconds for the whole VM    (default 720)
#   LP_VM_OUT           results dir                 (default $LP_VM_SOURCE/test-artifacts/vm)
#   LP_VM_CPUS, LP_VM_MEM   guest CPUs / RAM        (default 2 / 3G)
#   LP_VM_ROOT_CGROUP   the root run's cgroup       (default system.slice/lp-vm-tests.service;
#                                                    "" = the root cgroup)
#   LP_VM_USER_CONTROLLERS  controllers the user run enables below user@1000.service, as
#                       systemd --user does         (default "memory pids"; cpu is delegated
#                                                    and available but not enabled there)
#   LP_VM_ENV           "NAME=VALUE ..." set for pytest in both runs (values without blanks)
#   LP_VM_PROBE=1       time python + ipykernel imports in the guest before the tests
#   LP_VM_DIR           build cache (build.sh)      (default /var/lib/limited-provisioner-vm)
#   LP_VM_NO_BUILD=1    skip build.sh (an image must exist)
#
# Results in $LP_VM_OUT: <run>.log, <run>.xml (junit), <run>.rc, serial.log.
# Exit status: 0 when every run's pytest exited 0; 124 when the VM did not finish within
# LP_VM_TIMEOUT; otherwise the first failing run's pytest status (1 for a run with no result).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
SOURCE=$(cd "${LP_VM_SOURCE:-$HERE/../..}" && pwd)
VM_DIR=${LP_VM_DIR:-/var/lib/limited-provisioner-vm}
RUNS=${LP_VM_RUNS-root user}
TIMEOUT=${LP_VM_TIMEOUT:-720}
OUT=${LP_VM_OUT:-$SOURCE/test-artifacts/vm}
CPUS=${LP_VM_CPUS:-2}
MEM=${LP_VM_MEM:-3G}
ROOT_CGROUP=${LP_VM_ROOT_CGROUP-system.slice/lp-vm-tests.service}
USER_CONTROLLERS=${LP_VM_USER_CONTROLLERS-memory pids}
IO_HEADROOM_MB=512   # room for results (and __pycache__) on the io disk
CMDLINE="root=/dev/vda rw console=ttyS0 quiet panic=-1 systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all init=/sbin/lp-vm-init"

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"
export LC_ALL=C

T_START=$EPOCHREALTIME
log() { echo "[vm-run] $*"; }
die() { echo "[vm-run] ERROR: $*" >&2; exit 1; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

[ "$(id -u)" -eq 0 ] || die "must run as root"
[ "$#" -gt 0 ] || set -- tests/unit
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "LP_VM_TIMEOUT=$TIMEOUT is not a number of seconds"

if [ -z "${LP_VM_NO_BUILD:-}" ]; then
    bash "$HERE/build.sh" "$SOURCE"
fi
for f in vmlinuz initrd.img rootfs.img; do
    [ -f "$VM_DIR/$f" ] || die "no $VM_DIR/$f: run tests/vm/build.sh"
done

QPID=
TAILPID=
RUN=
cleanup() {
    local rc=$? i
    if [ -n "$QPID" ] && kill -0 "$QPID" 2>/dev/null; then
        kill "$QPID" 2>/dev/null || true
        for i in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$QPID" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$QPID" 2>/dev/null || true
        wait "$QPID" 2>/dev/null || true
    fi
    if [ -n "$TAILPID" ]; then
        kill "$TAILPID" 2>/dev/null || true
        wait "$TAILPID" 2>/dev/null || true
    fi
    [ -z "$RUN" ] || [ -n "${LP_VM_KEEP:-}" ] || rm -rf --one-file-system "$RUN"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$VM_DIR/runs"
RUN=$(mktemp -d "$VM_DIR/runs/run.XXXXXX")
STAGE=$RUN/io
mkdir -p "$STAGE/src" "$STAGE/out"

# ---------------------------------------------------------------- io disk
# The project: git's tracked and untracked-but-not-ignored files (what a commit would
# hold, uncommitted edits included), else the tree without VCS/build debris.
if git -C "$SOURCE" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$SOURCE" && git ls-files -z -co --exclude-standard \
        | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
        | tar --null -T - -c) | tar -x -C "$STAGE/src"
else
    (cd "$SOURCE" && tar --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
        --exclude=build --exclude=test-artifacts -c .) | tar -x -C "$STAGE/src"
fi
# Bytecode compiled here (seconds) instead of in the emulated guest, where the user run
# could not even write it: same interpreter minor version (build.sh checked).
python3 -m compileall -q -j 0 "$STAGE/src" >/dev/null 2>&1 || true
cp "$HERE/guest-init.sh" "$STAGE/guest-init.sh"
{
    printf 'LP_VM_RUNS=%q\n' "$RUNS"
    printf 'LP_VM_ROOT_CGROUP=%q\n' "$ROOT_CGROUP"
    printf 'LP_VM_USER_CONTROLLERS=%q\n' "$USER_CONTROLLERS"
    printf 'LP_VM_PROBE=%q\n' "${LP_VM_PROBE:-}"
} >"$STAGE/config"
printf '%s\0' -m "not docker" "$@" >"$STAGE/pytest-args"
: >"$STAGE/env"
for kv in ${LP_VM_ENV:-}; do
    [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "LP_VM_ENV: '$kv' is not NAME=VALUE"
    printf '%s\0' "$kv" >>"$STAGE/env"
done
src_mb=$(du -sm "$STAGE" | cut -f1)
truncate -s "$(( src_mb * 2 + IO_HEADROOM_MB ))M" "$RUN/io.img"
mkfs.ext4 -q -F -L lp-vm-io -d "$STAGE" "$RUN/io.img" || die "mkfs.ext4 -d $STAGE failed"
log "io disk: $(du -sh "$STAGE/src" | cut -f1) of $SOURCE ($(elapsed "$T_START")s)"

# ---------------------------------------------------------------- the VM
SERIAL=$RUN/serial.log
: >"$SERIAL"
log "booting: $CPUS CPUs, $MEM, TCG; timeout ${TIMEOUT}s; runs: $RUNS; pytest -m 'not docker' $*"
T_BOOT=$EPOCHREALTIME
# snapshot=on: the guest's writes to its root go to a temp file (in $RUN), never the image.
TMPDIR=$RUN qemu-system-x86_64 \
    -machine q35 -accel tcg,thread=multi -cpu max -smp "$CPUS" -m "$MEM" \
    -nodefaults -no-user-config -display none -no-reboot \
    -serial "file:$SERIAL" \
    -kernel "$VM_DIR/vmlinuz" -initrd "$VM_DIR/initrd.img" -append "$CMDLINE" \
    -drive "file=$VM_DIR/rootfs.img,format=raw,if=virtio,snapshot=on" \
    -drive "file=$RUN/io.img,format=raw,if=virtio" \
    -device virtio-rng-pci \
    </dev/null >"$RUN/qemu.log" 2>&1 &
QPID=$!
tail -n +1 -F --pid="$QPID" "$SERIAL" 2>/dev/null | sed -u 's/\r$//; s/^/  | /' &
TAILPID=$!

timed_out=
deadline=$(( SECONDS + TIMEOUT ))
while kill -0 "$QPID" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then timed_out=1; break; fi
    sleep 1
done
if [ -n "$timed_out" ]; then
    kill "$QPID" 2>/dev/null || true
fi
qrc=0; wait "$QPID" || qrc=$?
QPID=
wait "$TAILPID" 2>/dev/null || true
TAILPID=
vm_secs=$(elapsed "$T_BOOT")

# ---------------------------------------------------------------- results
mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/*.xml "$OUT"/*.rc
sed 's/\r$//' "$SERIAL" >"$OUT/serial.log"
[ ! -s "$RUN/qemu.log" ] || cp "$RUN/qemu.log" "$OUT/qemu.log"
# Read back without mounting: debugfs copies /out out of the (closed) ext4 image.
debugfs -R "rdump /out $RUN" "$RUN/io.img" >/dev/null 2>&1 || true
[ ! -d "$RUN/out" ] || cp -r "$RUN/out/." "$OUT/"

echo
log "VM ran ${vm_secs}s (qemu exit $qrc); serial log: $OUT/serial.log"
# Boot to the first pytest start, in guest uptime (all of it emulated time on this host).
first=$(grep -a -m1 -E '^\[lp-vm [0-9.]+s\] run [a-z]+: uid' "$OUT/serial.log" || true)
[ -z "$first" ] || log "guest booted to the first pytest in $(sed -E 's/^\[lp-vm ([0-9.]+)s\].*/\1/' <<<"$first")s"
status=0
for run in $RUNS; do
    if [ -f "$OUT/$run.rc" ]; then
        rc=$(cat "$OUT/$run.rc")
        summary=$(grep -a -E '(passed|failed|errors?|skipped|deselected|no tests ran).* in [0-9.]+s' \
            "$OUT/$run.log" 2>/dev/null | tail -n1 | sed -E 's/^=+ //; s/ =+$//' || true)
        log "run $run: pytest exit $rc ${summary:+-- $summary}"
        [ "$rc" = 0 ] || [ "$status" != 0 ] || status=$rc
    else
        log "run $run: NO RESULT (the VM did not get to finish it)"
        [ "$status" != 0 ] || status=1
    fi
done
if [ -n "$timed_out" ]; then
    log "FAILED: the VM did not finish within LP_VM_TIMEOUT=${TIMEOUT}s (killed)"
    status=124
elif ! grep -q -a 'LP-VM-DONE' "$OUT/serial.log"; then
    log "FAILED: the VM stopped before the end (see $OUT/serial.log, $OUT/qemu.log)"
    [ "$status" != 0 ] || status=1
fi
log "$([ "$status" = 0 ] && echo PASSED || echo "FAILED (exit $status)") in $(elapsed "$T_START")s; results in $OUT"
exit "$status"

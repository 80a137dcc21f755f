#!/bin/bash
# PID 1 of the test VM. run.sh puts this file on the io disk (/io, /dev/vdb); the rootfs's
# /sbin/lp-vm-init stub mounts that disk and execs it. No systemd: it mounts what a
# systemd host mounts (cgroup2 with nsdelegate,memory_recursiveprot), lays out the cgroups
# as systemd would, and runs pytest once per entry of LP_VM_RUNS:
#
#   root  as root in /sys/fs/cgroup/$LP_VM_ROOT_CGROUP (a system service's cgroup, no
#         delegation; "" = the root cgroup);
#   user  as vmuser (uid 1000) in user.slice/user-1000.slice/user@1000.service/app.slice/
#         test.scope: user@1000.service delegated as user@.service's Delegate=pids memory cpu
#         does it, the rest created by the user as `systemd --user` would (see user_session).
#
# Inputs on /io: src/ (the project), config (shell variables), pytest-args and env (NAME=VALUE
# for pytest), both NUL-separated.
# Outputs in /io/out: <run>.log, <run>.xml (junit), <run>.rc, plus "LP-VM-RESULT <run> rc=N"
# lines and a final "LP-VM-DONE" on the serial console. Then a sysrq power-off.
set -u
export PATH=/opt/lp-vm/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LANG=C.UTF-8 LC_ALL=C.UTF-8
CG=/sys/fs/cgroup
SELF=/io/guest-init.sh
USER_NAME=vmuser
USER_UID=1000
DELEGATED=$CG/user.slice/user-$USER_UID.slice/user@$USER_UID.service

log() { echo "[lp-vm $(cut -d' ' -f1 /proc/uptime)s] $*"; }

# Runs as vmuser (setpriv'd by run_user below), already in $DELEGATED: what systemd --user
# does at its start, then what `systemd-run --user --scope` does, then pytest.
user_session() {
    set -e
    # The manager leaves the delegated cgroup's root for init.scope (no-internal-processes:
    # a cgroup with processes cannot enable controllers for children).
    mkdir "$DELEGATED/init.scope"
    echo $$ >"$DELEGATED/init.scope/cgroup.procs"
    enable_controllers "$DELEGATED" "$LP_VM_USER_CONTROLLERS"
    mkdir "$DELEGATED/app.slice"
    enable_controllers "$DELEGATED/app.slice" "$LP_VM_USER_CONTROLLERS"
    mkdir "$DELEGATED/app.slice/test.scope"
    echo $$ >"$DELEGATED/app.slice/test.scope/cgroup.procs"
    set +e
    local d
    for d in "$CG/user.slice" "${DELEGATED%/*}" "$DELEGATED" "$DELEGATED/app.slice" "$DELEGATED/app.slice/test.scope"; do
        log "  ${d#"$CG"/} owner $(stat -c %U "$d"), subtree_control '$(cat "$d/cgroup.subtree_control")'"
    done
    run_pytest user
}

enable_controllers() {  # enable_controllers CGROUP "memory pids ..."
    local c
    for c in $2; do echo "+$c" >"$1/cgroup.subtree_control"; done
}

run_pytest() {  # run_pytest NAME: pytest in this process's cgroup, as this process's user
    local name=$1 rc
    log "run $name: uid $(id -u), cgroup $(cut -d: -f3 /proc/self/cgroup), controllers: $(cat "$CG$(cut -d: -f3 /proc/self/cgroup)/cgroup.controllers")"
    echo "LP-VM-START $name"
    cd /io/src || return 1
    local test_env=()
    [ ! -s /io/env ] || mapfile -d '' test_env </io/env
    env ${test_env[@]+"${test_env[@]}"} python -m pytest -p no:cacheprovider --junitxml="/io/out/$name.xml" \
        -o junit_suite_name="vm-$name" "${PYTEST_ARGS[@]}" 2>&1 | tee "/io/out/$name.log"
    rc=${PIPESTATUS[0]}
    log "run $name: pytest exited $rc"
    return "$rc"
}

if [ "${1:-}" = user-session ]; then
    mapfile -d '' PYTEST_ARGS </io/pytest-args
    user_session
    exit $?
fi

# ------------------------------------------------------------------------- PID 1 from here
power_off() {
    sync
    umount /io 2>/dev/null || mount -o remount,ro /io 2>/dev/null
    echo o >/proc/sysrq-trigger
    sleep 60
}
trap power_off EXIT
log "guest-init: kernel $(uname -r)"

# shellcheck source=/dev/null
. /io/config
: "${LP_VM_RUNS=root user}" "${LP_VM_ROOT_CGROUP=system.slice/lp-vm-tests.service}"
: "${LP_VM_USER_CONTROLLERS=memory pids}"
mapfile -d '' PYTEST_ARGS </io/pytest-args

# What systemd mounts before anything runs (cgroup2 with its options; /run, /tmp fresh).
mount -t cgroup2 -o nsdelegate,memory_recursiveprot cgroup2 $CG
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mkdir -p /dev/shm /dev/pts /dev/mqueue
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t mqueue mqueue /dev/mqueue
ln -sfn /proc/self/fd /dev/fd
ln -sfn /proc/self/fd/0 /dev/stdin
ln -sfn /proc/self/fd/1 /dev/stdout
ln -sfn /proc/self/fd/2 /dev/stderr
hostname lp-vm
ip link set lo up
modprobe virtio_rng 2>/dev/null || true
mkdir -p /io/out
# Every controller we test, available to the first level (systemd enables them in the root
# for its slices).
enable_controllers $CG "memory cpu pids"
log "cgroup2 on $CG: controllers '$(cat $CG/cgroup.controllers)', root subtree_control '$(cat $CG/cgroup.subtree_control)'"

if [ -n "${LP_VM_PROBE:-}" ]; then
    log "probe: $(python -c 'import time; t = time.perf_counter(); import ipykernel.kernelapp, jupyter_client, numpy; print(f"ipykernel + jupyter_client + numpy import {time.perf_counter() - t:.1f}s")')"
    log "probe: $(cd /io/src && python -c 'import time; t = time.perf_counter(); import limited_provisioner.process, tests.harness; print(f"limited_provisioner.process + tests.harness import {time.perf_counter() - t:.1f}s")' 2>&1 | tail -n1)"
fi

run_root() {
    local parent rc
    if [ -n "$LP_VM_ROOT_CGROUP" ]; then
        # A system service: systemd enables the controllers down to the unit's parent.
        parent=$CG
        local part
        IFS=/ read -ra parts <<<"$LP_VM_ROOT_CGROUP"
        for part in "${parts[@]:0:${#parts[@]}-1}"; do
            parent=$parent/$part
            mkdir -p "$parent"
            enable_controllers "$parent" "memory cpu pids"
        done
        mkdir -p "$CG/$LP_VM_ROOT_CGROUP"
    fi
    (
        [ -z "$LP_VM_ROOT_CGROUP" ] || echo "$BASHPID" >"$CG/$LP_VM_ROOT_CGROUP/cgroup.procs"
        HOME=/root run_pytest root
    )
    rc=$?
    return "$rc"
}

run_user() {
    local f rc
    # systemd-logind: the user's runtime dir.
    install -d -m 700 -o $USER_UID -g $USER_UID /run/user/$USER_UID
    # user-1000.slice and user@1000.service, the delegation as systemd does it: the
    # controllers of Delegate= enabled in every ancestor, the unit's cgroup and its
    # delegatable files (cgroup.procs, cgroup.subtree_control, cgroup.threads and the
    # kernel's list in /sys/kernel/cgroup/delegate) chowned to the user.
    mkdir -p "$DELEGATED"
    enable_controllers $CG/user.slice "memory cpu pids"
    enable_controllers $CG/user.slice/user-$USER_UID.slice "memory cpu pids"
    chown $USER_UID:$USER_UID "$DELEGATED"
    for f in cgroup.procs cgroup.subtree_control cgroup.threads $(cat /sys/kernel/cgroup/delegate 2>/dev/null); do
        [ ! -e "$DELEGATED/$f" ] || chown $USER_UID:$USER_UID "$DELEGATED/$f"
    done
    : >/io/out/user.log; : >/io/out/user.xml
    chown $USER_UID:$USER_UID /io/out/user.log /io/out/user.xml
    (
        echo "$BASHPID" >"$DELEGATED/cgroup.procs"
        cd /home/$USER_NAME || exit 1
        exec setpriv --reuid=$USER_UID --regid=$USER_UID --init-groups --inh-caps=-all \
            env -i HOME=/home/$USER_NAME USER=$USER_NAME LOGNAME=$USER_NAME SHELL=/bin/bash \
            PATH="$PATH" LANG=C.UTF-8 LC_ALL=C.UTF-8 XDG_RUNTIME_DIR=/run/user/$USER_UID \
            LP_VM_USER_CONTROLLERS="$LP_VM_USER_CONTROLLERS" \
            /bin/bash "$SELF" user-session
    )
    rc=$?
    return "$rc"
}

for run in $LP_VM_RUNS; do
    case $run in
        root) run_root; rc=$? ;;
        user) run_user; rc=$? ;;
        *) log "unknown run '$run' in LP_VM_RUNS"; rc=2 ;;
    esac
    echo "$rc" >"/io/out/$run.rc"
    echo "LP-VM-RESULT $run rc=$rc"
done
log "done"
echo "LP-VM-DONE"

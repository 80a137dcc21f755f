#!/usr/bin/env bash
# A Docker Swarm for the swarm backend's tests, on one machine, as root (after
# .ci/setup-docker.sh: dockerd runs and has the kernel image).
#
#   1. the host's dockerd becomes the swarm's manager (`docker swarm init`, advertised on
#      docker0's address so containers on the default bridge reach it), if it is not one;
#   2. with --workers N (default 0): N worker nodes, each a privileged container running
#      its own dockerd from limited-provisioner-swarm-node:latest -- built OFFLINE from the
#      kernel image's rootfs plus Debian's docker.io (no registry) -- joined with
#      `docker swarm join`, labelled limited-provisioner.role=kernels, and given the kernel
#      image (`docker save | docker exec -i <worker> docker load`; no daemon listens on TCP);
#   3. --down: the workers leave and are removed (the manager stays).
#
# Idempotent: workers that run and are Ready are kept. Prints one line per worker:
#   worker <name> <ip> <node id>
set -euo pipefail

IMAGE=${LIMITED_PROVISIONER_TEST_IMAGE:-${LP_KERNEL_IMAGE:-limited-provisioner-kernel:latest}}
NODE_IMAGE=limited-provisioner-swarm-node:latest
NODE_IMAGE_VERSION=1
NODE_PACKAGES="docker.io iptables procps"
WORKER_PREFIX=lp-swarm-worker-
WORKER_LABEL=limited-provisioner.swarm-worker
WORK_PREFIX=/var/tmp/limited-provisioner-node-rootfs.
WORKERS=0
DOWN=0

export PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin${PATH:+:$PATH}"
export LC_ALL=C
T_START=$EPOCHREALTIME
log() { echo "[setup-swarm] $*"; }
die() { echo "[setup-swarm] ERROR: $*" >&2; exit 1; }
elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

while [ $# -gt 0 ]; do
    case $1 in
        --workers) WORKERS=$2; shift 2 ;;
        --down) DOWN=1; shift ;;
        *) die "unknown argument $1 (use --workers N or --down)" ;;
    esac
done
[ "$(id -u)" -eq 0 ] || die "must run as root"
docker info >/dev/null 2>&1 || die "no Docker daemon: run .ci/setup-docker.sh first"

exec 9>/run/limited-provisioner-setup-swarm.lock
flock -w 1800 9 || die "another setup-swarm.sh run held the lock for 30 min"

# Capabilities (names as docker takes them) missing from this process's bounding set.
missing_caps() {
    python3 - <<'PY'
names = ("CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
         "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
         "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
         "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
         "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ").split()
status = open("/proc/self/status").read()
bounding = int(status.split("CapBnd:")[1].split()[0], 16)
print(" ".join(n for i, n in enumerate(names) if not bounding >> i & 1))
PY
}

worker_names() { docker ps -a --filter "label=$WORKER_LABEL" --format '{{.Names}}' | sort; }
worker_ip() { docker inspect -f '{{.NetworkSettings.IPAddress}}' "$1"; }

if [ "$DOWN" = 1 ]; then
    for name in $(worker_names); do
        node=$(docker exec "$name" docker info --format '{{.Swarm.NodeID}}' 2>/dev/null || true)
        docker exec "$name" docker swarm leave --force >/dev/null 2>&1 || true
        docker rm -f -v "$name" >/dev/null
        # Its node entry in the manager's list (forced: it may not look down yet).
        [ -z "$node" ] || docker node rm --force "$node" >/dev/null 2>&1 || true
        log "removed worker $name"
    done
    for node in $(docker node ls --filter role=worker -q 2>/dev/null); do
        state=$(docker node inspect -f '{{.Status.State}}' "$node")
        [ "$state" = down ] && docker node rm --force "$node" >/dev/null 2>&1 || true
    done
    exit 0
fi

# ---------------------------------------------------------------- 1: manager
state=$(docker info --format '{{.Swarm.LocalNodeState}}')
if [ "$state" != active ]; then
    addr=$(docker network inspect bridge -f '{{range .IPAM.Config}}{{.Gateway}} {{end}}' \
        | awk '{ print $1 }')
    if [ -z "$addr" ]; then
        # A daemon restored from an earlier state may list the subnet without its
        # gateway: the bridge device has it.
        addr=$(ip -4 -o addr show dev docker0 2>/dev/null \
            | awk '{ split($4, a, "/"); print a[1]; exit }')
    fi
    [ -n "$addr" ] || die "the default bridge has no gateway address to advertise the manager on"
    docker swarm init --advertise-addr "$addr" >/dev/null
    log "swarm initialized, manager advertised on $addr:2377"
fi
[ "$(docker info --format '{{.Swarm.ControlAvailable}}')" = true ] \
    || die "this daemon is in a swarm but not a manager"
MANAGER_ADDR=$(docker info --format '{{(index .Swarm.RemoteManagers 0).Addr}}')
log "manager: $(docker info --format '{{.Swarm.NodeID}}') at $MANAGER_ADDR ($(elapsed "$T_START")s)"
[ "$WORKERS" -gt 0 ] || exit 0

# ---------------------------------------------------------------- 2: worker image
have=$(docker image inspect -f '{{index .Config.Labels "limited-provisioner.node-version"}}' \
    "$NODE_IMAGE" 2>/dev/null || true)
if [ "$have" != "$NODE_IMAGE_VERSION" ]; then
    docker image inspect "$IMAGE" >/dev/null 2>&1 || die "no $IMAGE: run .ci/setup-docker.sh"
    WORK=$(mktemp -d "${WORK_PREFIX}XXXXXX")
    trap 'umount "$WORK/rootfs/proc" 2>/dev/null || true; rm -rf --one-file-system "$WORK"' EXIT
    ROOTFS=$WORK/rootfs
    mkdir "$ROOTFS"
    cid=$(docker create "$IMAGE")
    docker export "$cid" | tar -x -C "$ROOTFS"
    docker rm "$cid" >/dev/null
    cp -L /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
    printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
    chmod 755 "$ROOTFS/usr/sbin/policy-rc.d"
    mount -t proc proc "$ROOTFS/proc"
    in_root() {
        chroot "$ROOTFS" /usr/bin/env -i DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 HOME=/root \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$@"
    }
    # shellcheck disable=SC2086
    in_root apt-get update -q -o Acquire::Retries=3 >"$WORK/apt.log" 2>&1 \
        && in_root apt-get install -y -q --no-install-recommends -o Acquire::Retries=3 \
            $NODE_PACKAGES >>"$WORK/apt.log" 2>&1 || {
        tail -n 40 "$WORK/apt.log" >&2
        die "apt-get install $NODE_PACKAGES in the node rootfs failed"
    }
    in_root apt-get clean
    rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS/usr/sbin/policy-rc.d"
    : >"$ROOTFS/etc/resolv.conf"
    umount "$ROOTFS/proc"
    tar --numeric-owner -C "$ROOTFS" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'USER 0:0' \
        --change 'WORKDIR /' \
        --change 'CMD ["dockerd", "--host=unix:///var/run/docker.sock"]' \
        --change "LABEL limited-provisioner.node-version=$NODE_IMAGE_VERSION" \
        --message "limited-provisioner swarm node: the kernel image's rootfs + $NODE_PACKAGES" \
        - "$NODE_IMAGE" >/dev/null
    rm -rf --one-file-system "$WORK"
    trap - EXIT
    log "built $NODE_IMAGE ($(elapsed "$T_START")s)"
fi

# ---------------------------------------------------------------- 3: workers
TOKEN=$(docker swarm join-token -q worker)
for i in $(seq 1 "$WORKERS"); do
    name=$WORKER_PREFIX$i
    if docker inspect "$name" >/dev/null 2>&1; then
        # A stopped worker (a test stopped it) comes back with its swarm state.
        [ "$(docker inspect -f '{{.State.Running}}' "$name")" = true ] || docker start "$name" >/dev/null
        node=
        for _ in $(seq 120); do
            node=$(docker exec "$name" docker info --format '{{.Swarm.NodeID}}' 2>/dev/null || true)
            [ -n "$node" ] && [ "$(docker node inspect -f '{{.Status.State}}' "$node" 2>/dev/null)" = ready ] && break
            sleep 0.5
        done
        if [ -n "$node" ] && [ "$(docker node inspect -f '{{.Status.State}}' "$node" 2>/dev/null)" = ready ]; then
            echo "worker $name $(worker_ip "$name") $node"
            continue
        fi
        log "worker $name did not come back ready: replacing it"
        docker rm -f -v "$name" >/dev/null
        [ -z "$node" ] || docker node rm --force "$node" >/dev/null 2>&1 || true
    fi
    # Its own /var/lib/docker (a volume: overlay2 cannot stack on the host's overlay2);
    # every capability this host has (--privileged asks for all, and a host that is
    # itself a container may lack some: CAP_SYS_RESOURCE here), no seccomp or AppArmor
    # profile, every device, and the host's cgroup hierarchies writable: what a dockerd
    # that makes cgroups, namespaces and overlay networks needs.
    caps=()
    for cap in $(missing_caps); do caps+=(--cap-drop "$cap"); done
    docker run -d --name "$name" --hostname "$name" --label "$WORKER_LABEL=1" \
        --cap-add ALL "${caps[@]}" --security-opt seccomp=unconfined \
        --security-opt apparmor=unconfined --security-opt systempaths=unconfined \
        --device-cgroup-rule 'a *:* rwm' -v /sys/fs/cgroup:/sys/fs/cgroup:rw \
        -v /var/lib/docker -v /lib/modules:/lib/modules:ro "$NODE_IMAGE" >/dev/null
    ip=$(worker_ip "$name")
    # Driven through `docker exec` only: a worker's dockerd listens on no TCP port (a
    # kernel with network=True must find no unauthenticated daemon on the host's bridge).
    for _ in $(seq 120); do
        docker exec "$name" docker info >/dev/null 2>&1 && break
        sleep 0.5
    done
    docker exec "$name" docker info >/dev/null 2>&1 || {
        docker logs --tail 30 "$name" >&2
        die "the dockerd of $name did not come up"
    }
    docker save "$IMAGE" | docker exec -i "$name" docker load >/dev/null
    docker exec "$name" docker swarm join --token "$TOKEN" --advertise-addr "$ip" "$MANAGER_ADDR" >/dev/null
    node=$(docker exec "$name" docker info --format '{{.Swarm.NodeID}}')
    for _ in $(seq 60); do
        [ "$(docker node inspect -f '{{.Status.State}}' "$node" 2>/dev/null)" = ready ] && break
        sleep 0.5
    done
    docker node update --label-add limited-provisioner.role=kernels "$node" >/dev/null
    echo "worker $name $ip $node"
done
log "swarm ready: $(docker node ls -q | wc -l) nodes ($(elapsed "$T_START")s)"

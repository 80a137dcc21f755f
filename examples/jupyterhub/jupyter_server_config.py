# Single-user server config for JupyterHub: every kernel of every user is limited.
#
# Loaded by each user's jupyter_server (jupyterhub-singleuser) from the directory that
# jupyterhub_config.py puts on JUPYTER_CONFIG_PATH (/etc/jupyterhub/singleuser here).
# The kernelspecs themselves carry no limits (see README.md: `limited-provisioner install`
# without limit flags), so this file is the one place an operator sets them; a limit set
# in a kernelspec's metadata.kernel_provisioner.config would win over the value here.
#
# Tested: tests/test_examples_jupyterhub.py loads this file and checks that every
# c.<Class>.<trait> below exists and that the provisioners parse these limits.
import os
import socket

c = get_config()  # noqa: F821

# JupyterHub sets these in every single-user server's environment.
user = os.environ.get("JUPYTERHUB_USER", "")
server_name = os.environ.get("JUPYTERHUB_SERVER_NAME", "") or "default"

# -- Limits of each kernel, both backends -----------------------------------------------
# Size them so that all of one user's kernels fit in what the spawner gives the whole
# server (jupyterhub_config.py: c.Spawner.mem_limit = "4G"):
#   max_kernels_per_user * (mem_limit + 128M) + ~300M for the server  <=  4G
# (128M: the RLIMIT_DATA headroom each kernel process gets above mem_limit).
c.LimitedProvisioner.mem_limit = "1G"
c.LimitedProvisioner.cpu_limit = 1
c.LimitedProvisioner.nofile_limit = 1024
c.LimitedProvisioner.disk_limit = "5G"
c.LimitedProvisioner.files_limit = 100000
c.LimitedProvisioner.output_limit = "10M"

# Per-kernel policy: the provisioner enforces it for the browser, nbclient and API
# clients alike (jupyter_server's own culler stays off).
c.LimitedProvisioner.idle_timeout = "1h"  # shut down a kernel idle this long
c.LimitedProvisioner.exec_timeout = "2h"  # interrupt one cell running this long
c.LimitedProvisioner.max_lifetime = "24h"

# -- Who the user is, and how many kernels they get -------------------------------------
# The owner a kernel counts against is read from $JUPYTERHUB_USER (the default
# owner_env, spelled out here); max_kernels_per_user counts the kernels in the
# registry under state_dir, i.e. across all of this user's servers that share it.
c.LimitedProvisioner.owner_env = "JUPYTERHUB_USER"
c.LimitedProvisioner.max_kernels_per_user = 3
c.LimitedProvisioner.max_starts_per_minute = 20

# Host-wide settings (LimitedHost: the registry, this server's identity, the reaper) are
# read by the server, its reaper and every kernel alike.
# One registry per user, in the home directory (persistent under DockerSpawner too),
# shared by the user's named servers. Short on purpose: the Docker backend's ipc socket
# paths (state_dir + /kernels/<36-char id>/k-N) must stay under 100 bytes.
c.LimitedHost.state_dir = os.path.join(os.path.expanduser("~"), ".limited-provisioner")

# Stable across restarts of this server and distinct for each named server, so a
# restarted server re-adopts exactly its own kernels (and its own session database).
c.LimitedHost.server_id = f"{socket.gethostname()}-{user}-{server_name}"

# -- Process backend (kernelspec "limited-python") --------------------------------------
# Single-user servers run as the hub user, not root: memory is bounded per process by
# RLIMIT_DATA plus a watchdog on the kernel tree's RSS, CPU falls back to nice, network
# is not cut off (see README.md). The kernel runs as the user and works in the
# notebook's folder (the default, workspace = "notebook"), reading and writing the
# user's files as the user would:
c.LimitedProcessProvisioner.workspace = "notebook"
# Cutting the network needs root (a network namespace); say so rather than pretend.
c.LimitedProcessProvisioner.network = True
# Without root, pids_limit is RLIMIT_NPROC, which counts every process and thread of the
# kernel's uid on the whole host. Under DockerSpawner every user is uid 1000 (jovyan), so
# that count would be shared by all users' containers: leave it off there and bound
# processes per container instead (DockerSpawner's extra_host_config pids_limit).
c.LimitedProcessProvisioner.pids_limit = None if os.path.exists("/.dockerenv") else 1024

# -- Docker backend (kernelspec "limited-python-docker") --------------------------------
# Each kernel in its own container. Needs a Docker daemon this server may use: read
# "Docker backend" in README.md before enabling it (daemon access is root on its host).
c.LimitedDockerProvisioner.image = "limited-provisioner-kernel:latest"
c.LimitedDockerProvisioner.pids_limit = 256  # a per-container cgroup: hard, per kernel
c.LimitedDockerProvisioner.network = False  # --network=none: enforced
# A rootless Docker daemon of the user's own, instead of the system one:
# c.LimitedDockerProvisioner.docker_host = f"unix:///run/user/{os.getuid()}/docker.sock"
# Container kernels see only their own work dir; mount what they should see (host paths):
# c.LimitedDockerProvisioner.extra_mounts = [f"{os.path.expanduser('~')}/data:/data:ro"]

# -- Server side -------------------------------------------------------------------------
# New notebooks get the limited kernel; the stock python3 kernelspec is hidden.
c.MappingKernelManager.default_kernel_name = "limited-python"
c.KernelSpecManager.ensure_native_kernel = False
c.KernelSpecManager.allowed_kernelspecs = {"limited-python", "limited-python-docker"}
# On "Stop My Server", shut kernels down (the default). If the server process dies
# instead (crash, OOM kill), its kernels keep running and the next start re-adopts them.
c.LimitedMappingKernelManager.keep_kernels_on_exit = False
c.LimitedMappingKernelManager.adopt_on_start = True
# A dead server's kernels wait this long (from when a reaper first sees them orphaned)
# for the restart to adopt them, then they are reaped instead of holding their memory.
c.LimitedHost.orphan_grace = 300

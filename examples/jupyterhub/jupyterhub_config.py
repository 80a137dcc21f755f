# JupyterHub config: single-user servers on the hub's host (SystemdSpawner or
# LocalProcessSpawner) whose kernels are limited by limited-provisioner.
# For DockerSpawner see jupyterhub_config_docker.py.
#
# The hub knows nothing about kernels. It has to (1) start single-user servers from an
# environment where limited-provisioner and the limited kernelspecs are installed,
# (2) point them at the single-user config (jupyter_server_config.py, next to this file),
# (3) bound each server as a whole. JupyterHub itself sets $JUPYTERHUB_USER in every
# server's environment; the provisioner counts kernels per user from it.
import sys

c = get_config()  # noqa: F821

# Where the operator installs this example's jupyter_server_config.py (root-owned).
SINGLEUSER_CONFIG_DIR = "/etc/jupyterhub/singleuser"
# The environment with jupyterhub, jupyterlab and limited-provisioner (see README.md).
SINGLEUSER_ENV = "/opt/jupyterhub"

c.JupyterHub.spawner_class = "systemdspawner.SystemdSpawner"
# c.JupyterHub.spawner_class = "jupyterhub.spawner.LocalProcessSpawner"  # the default

c.Spawner.cmd = [f"{SINGLEUSER_ENV}/bin/jupyterhub-singleuser"]
c.Spawner.default_url = "/lab"
c.Spawner.environment = {
    # Its jupyter_server_config.py overrides {sys.prefix}/etc/jupyter's and /etc/jupyter's;
    # a user's ~/.jupyter overrides it (limits here are not a boundary against the user).
    "JUPYTER_CONFIG_PATH": SINGLEUSER_CONFIG_DIR,
}

# The whole server: its kernels' per-kernel limits must fit inside (see the sizing rule
# in jupyter_server_config.py). SystemdSpawner applies these to the user's unit (systemd
# memory limit and CPUQuota); LocalProcessSpawner ignores them.
c.Spawner.mem_limit = "4G"
c.Spawner.cpu_limit = 2.0

# SystemdSpawner: one transient unit per user server; its cgroup holds the server *and*
# its kernels, so the unit's limits are the outer bound.
c.SystemdSpawner.unit_name_template = "jupyter-{USERNAME}-singleuser"
c.SystemdSpawner.isolate_tmp = True
c.SystemdSpawner.isolate_devices = True

# Servers (not kernels) idle for an hour are stopped by jupyterhub-idle-culler; kernels
# are culled by the provisioner first (idle_timeout), which lets the server go idle.
c.JupyterHub.services = [
    {
        "name": "idle-culler",
        "command": [sys.executable, "-m", "jupyterhub_idle_culler", "--timeout=3600"],
    }
]
c.JupyterHub.load_roles = [
    {
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    }
]

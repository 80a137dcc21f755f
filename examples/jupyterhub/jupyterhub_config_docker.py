# JupyterHub config with DockerSpawner: one container per user server (the outer bound),
# limited-provisioner inside it bounding each kernel (see README.md for what each adds).
#
# The single-user image must contain limited-provisioner and the limited kernelspecs
# (README.md, "Single-user image"); this example's jupyter_server_config.py is mounted
# read-only and put on JUPYTER_CONFIG_PATH.
c = get_config()  # noqa: F821

SINGLEUSER_CONFIG_DIR = "/etc/jupyterhub/singleuser"

c.JupyterHub.spawner_class = "dockerspawner.DockerSpawner"
c.DockerSpawner.image = "example/singleuser-limited:latest"
c.DockerSpawner.network_name = "jupyterhub"
c.JupyterHub.hub_ip = "0.0.0.0"
c.JupyterHub.hub_connect_ip = "jupyterhub"  # the hub container's name on that network
c.DockerSpawner.default_url = "/lab"

c.DockerSpawner.volumes = {
    # Home (and with it the per-user kernel registry, ~/.limited-provisioner) persists.
    "jupyterhub-user-{username}": "/home/jovyan",
    SINGLEUSER_CONFIG_DIR: {"bind": SINGLEUSER_CONFIG_DIR, "mode": "ro"},
}
c.DockerSpawner.environment = {"JUPYTER_CONFIG_PATH": SINGLEUSER_CONFIG_DIR}

# The whole user server: one runaway kernel must hit its own limit long before these.
c.DockerSpawner.mem_limit = "4G"
c.DockerSpawner.cpu_limit = 2.0
# Processes per container: inside it kernels run as jovyan (uid 1000, like every other
# user's container), where a per-kernel RLIMIT_NPROC would count all of them host-wide;
# the single-user config therefore leaves pids_limit to this cgroup limit.
c.DockerSpawner.extra_host_config = {"pids_limit": 1024}

# Example server-wide configuration for limited-provisioner.
#
# Copy into your Jupyter config dir (see `jupyter --paths`) or pass with
# `jupyter server --config=jupyter_config/jupyter_server_config.py`.
# Values set here apply to every limited kernel; a kernelspec's
# metadata.kernel_provisioner.config overrides them per kernelspec.
c = get_config()  # noqa: F821

# Limits for every kernel, both backends (LimitedProvisioner is their shared base).
c.LimitedProvisioner.mem_limit = "2G"
c.LimitedProvisioner.cpu_limit = 1
c.LimitedProvisioner.pids_limit = 256
c.LimitedProvisioner.nofile_limit = 1024
c.LimitedProvisioner.disk_limit = "10G"
c.LimitedProvisioner.network = False

# Host-wide caps, counted across every server sharing the state dir.
c.LimitedProvisioner.max_kernels = 50
c.LimitedProvisioner.max_kernels_per_user = 5

# Process backend only: uids kernels run as when the server is root.
c.LimitedProcessProvisioner.kernel_uid_range = (64000, 64999)

# Make the limited kernel the default for new notebooks
# (create it first: `limited-provisioner install --sys-prefix`).
c.MappingKernelManager.default_kernel_name = "limited-python"

"""agent_backend: an HTTP code-interpreter service on limited-provisioner kernels.

One resource-limited Jupyter kernel per (user, session); caps, idle culling and
execution timeouts enforced by the provisioner; sessions re-adopted after a restart.
See README.md.
"""

"""mcp_server: the agent_backend's limited Python sessions as Model Context Protocol tools.

``execute_code``, ``upload_file``, ``download_file``, ``list_files``, ``reset_session``
over one resource-limited kernel per session; see README.md.
"""

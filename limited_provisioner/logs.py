"""Where the package logs: under the logger ``limited_provisioner`` and its children
(``limited_provisioner.provisioner``, ``limited_provisioner.reaper``, ...), whoever
started it, so one name selects, silences or redirects all of it.

A Jupyter application's logger (``ServerApp``, ``LabApp``...) does not propagate to the
root logger; its handlers write the server's log. :func:`follow_application_log` makes
our logger a child of it, as jupyter_server does with tornado's loggers, so our records
land in that log, with our name in each line ("[I ... limited_provisioner.provisioner]").
Outside an application (plain jupyter_client code), our records propagate to the root
logger like everyone else's.
"""

from __future__ import annotations

import logging
from typing import Any

NAME = "limited_provisioner"


def get_logger(name: str | None = None) -> logging.Logger:
    """``limited_provisioner`` itself, or a logger beneath it: a module name of ours
    (``__name__``) as it is, any other name (a subclass in another package) as
    ``limited_provisioner.<name>``."""
    if not name or name == NAME:
        return logging.getLogger(NAME)
    if not name.startswith(NAME + "."):
        name = f"{NAME}.{name}"
    return logging.getLogger(name)


def follow_application_log(app_log: Any) -> None:
    """Send our records to ``app_log``'s handlers when they would not reach them
    otherwise: ``app_log`` does not propagate (a traitlets Application's logger), and
    nobody has configured our logger (no handlers of its own, propagating to the root).
    The first application wins; its level filters as its handlers do."""
    if isinstance(app_log, logging.LoggerAdapter):
        app_log = app_log.logger
    if not isinstance(app_log, logging.Logger) or app_log.propagate:
        return  # its records reach the root logger, and ours do too
    ours = logging.getLogger(NAME)
    if ours.handlers or not ours.propagate or ours.parent is not logging.root:
        return  # configured by the user, or following an application already
    ours.parent = app_log


def follow_parent_log(configurable: Any) -> None:
    """:func:`follow_application_log` with the log ``configurable`` would have used by
    default: its parent's (a kernel manager's: the server's), else the running
    application's, else traitlets' own."""
    from traitlets import log
    from traitlets.config import LoggingConfigurable

    parent = getattr(configurable, "parent", None)
    follow_application_log(
        parent.log if isinstance(parent, LoggingConfigurable) else log.get_logger()
    )

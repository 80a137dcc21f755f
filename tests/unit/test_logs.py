"""Everything the package logs is under the logger ``limited_provisioner``, and reaches a
Jupyter application's log (whose logger does not propagate) all the same."""

from __future__ import annotations

import logging

import pytest
from jupyter_client.manager import KernelManager
from traitlets.config import LoggingConfigurable

from limited_provisioner.docker import LimitedDockerProvisioner
from limited_provisioner.host import LimitedHost
from limited_provisioner.logs import NAME, follow_application_log, get_logger
from limited_provisioner.process import LimitedProcessProvisioner


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def ours():
    """Our top logger, put back as it was (parent, handlers) afterwards."""
    top = logging.getLogger(NAME)
    saved = top.parent, list(top.handlers), top.propagate
    top.parent = logging.root
    yield top
    top.parent, top.handlers[:], top.propagate = saved


@pytest.fixture
def app():
    """What a traitlets Application's log is: its own handlers, no propagation."""
    app = LoggingConfigurable(log=logging.getLogger("FakeServerApp"))
    handler = Records()
    app.log.addHandler(handler)
    app.log.propagate = False
    app.log.setLevel(logging.DEBUG)
    yield app, handler
    app.log.removeHandler(handler)


@pytest.mark.parametrize("cls", [LimitedProcessProvisioner, LimitedDockerProvisioner])
def test_a_provisioner_of_a_server_logs_under_our_name_into_the_servers_log(ours, app, cls):
    app, handler = app
    km = KernelManager(parent=app)
    assert km.log is app.log  # jupyter's own classes: the application's logger
    prov = cls(kernel_id="k", kernel_spec=None, parent=km)
    assert prov.log.name == cls.__module__ and prov.log.name.startswith(NAME + ".")
    prov.log.info("Kernel k started")
    get_logger("limited_provisioner.reaper").warning("from a module logger")
    assert [(r.name, r.getMessage()) for r in handler.records] == [
        (cls.__module__, "Kernel k started"),
        ("limited_provisioner.reaper", "from a module logger"),
    ]


def test_without_an_application_records_propagate_to_the_root_logger(ours, caplog):
    prov = LimitedProcessProvisioner(kernel_id="k", kernel_spec=None, parent=KernelManager())
    assert ours.parent is logging.root
    with caplog.at_level(logging.INFO, logger=NAME):
        prov.log.info("Kernel k started")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("limited_provisioner.process.provisioner", "Kernel k started")]


def test_a_logger_the_user_configured_is_left_alone(ours, app):
    app, _ = app
    own = Records()
    ours.addHandler(own)
    follow_application_log(app.log)
    assert ours.parent is logging.root
    ours.removeHandler(own)
    ours.propagate = False
    follow_application_log(app.log)
    assert ours.parent is logging.root


def test_the_host_logs_under_our_name():
    assert LimitedHost.instance().log.name == "limited_provisioner.host"


def test_other_names_go_beneath_ours():
    assert get_logger().name == NAME
    assert get_logger("limited_provisioner.proxy").name == "limited_provisioner.proxy"
    assert get_logger("mypkg.provisioner").name == "limited_provisioner.mypkg.provisioner"

"""pytest wiring (the pytest11 entry point): the options, the leak_budget
marker (registered always), and with --ebpf-leaks one role object (roles.py)
for this process. The engine and the tracer are imported only then."""

from __future__ import annotations

import pytest

from . import options, roles
from .marks import MARKER_HELP

PLUGIN_NAME = "memleak_ebpf_checker"


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    if not options.enabled(config):
        return
    settings = options.read_settings(config)
    if roles.is_xdist_controller(config):
        role = roles.DistController.start(config, settings)
    elif roles.is_xdist_worker(config):
        role = roles.DistWorker.start(config, settings)
    else:
        role = roles.Standalone.start(config, settings)
    config.pluginmanager.register(role, PLUGIN_NAME)

"""The ``aad`` command line. Each module in this package adds one group of commands."""

from __future__ import annotations

import importlib

from aad_core.cli.app import app, main

# One module per command group; each defines ``register(app)``.
_COMMAND_MODULES = (
    "aad_core.cli.core_cmds",
    "aad_core.cli.traces_cmds",
    "aad_core.cli.cluster_cmds",
    "aad_core.cli.specialist_cmds",
    "aad_core.cli.eval_cmds",
    "aad_core.cli.distill_cmds",
    "aad_core.cli.route_cmds",
    "aad_core.cli.monitor_cmds",
    "aad_core.cli.export_cmds",
    "aad_core.cli.augment_cmds",
)

for _name in _COMMAND_MODULES:
    importlib.import_module(_name).register(app)

__all__ = ["app", "main"]

"""The embedded demo: a support/operations agent's recorded teacher calls, assembled at run time
from public data (banking77, bfcl-eval, defog sql-eval + defog-data, AgentDojo) and seeded
generated tickets. See docs/demo.md."""

from aad_core.demo.workload import ATTRIBUTION, COMPLEX_NODES, DEFAULT_SIZES, ROUTINE_NODES, build_records, build_traces
from aad_core.demo.workspace import DEMO_CONFIG, create_demo_workspace, demo_config_toml

__all__ = [
    "ATTRIBUTION", "COMPLEX_NODES", "DEFAULT_SIZES", "DEMO_CONFIG", "ROUTINE_NODES",
    "build_records", "build_traces", "create_demo_workspace", "demo_config_toml",
]

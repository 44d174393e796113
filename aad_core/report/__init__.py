"""The HTML report: ``write_report(ws)`` writes one self-contained ``.aad/report.html``;
``draw_cluster_map(ws)`` draws ``.aad/state/cluster_map.png``."""

from __future__ import annotations

from aad_core.report.cluster_map import draw_cluster_map
from aad_core.report.html import render_report, write_report

__all__ = ["draw_cluster_map", "render_report", "write_report"]

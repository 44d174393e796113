"""The HTML report: ``write_report(ws)`` writes one self-contained ``.aad/report.html``."""

from __future__ import annotations

from aad_core.report.html import render_report, write_report

__all__ = ["render_report", "write_report"]

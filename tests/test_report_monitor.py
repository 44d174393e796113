"""The report's "Live monitoring" section: a table per task from ``monitor_summary`` and plots per day,
built from synthetic serving / shadow logs; without logs it says what produces them."""

from __future__ import annotations

import json
import re
from datetime import date, timedelta

from aad_core.serving.monitor import monitor_daily
from aad_core.serving.shadow import SERVING_LOG, SHADOW_LOG
from aad_core.workspace import Workspace
from tests.test_report import _check_self_contained, populate


def _write_logs(ws: Workspace) -> list[str]:
    """Three days of traffic on two tasks; task 0's pairs disagree more and more, and a demotion."""
    today = date.today()
    days = [(today - timedelta(days=k)).isoformat() for k in (2, 1, 0)]
    serving, shadow = [], []
    for i, day in enumerate(days):
        serving.append({"day": day, "cluster_id": 0, "requests": 100, "specialist": 80 - 20 * i, "teacher": 20 + 20 * i,
                        "below_threshold": 5, "escalations": {"low confidence": 3 + i, "validator json": i},
                        "served_tokens": 5000, "specialist_ms": 100.0, "similarity_sum": 80.0, "similarity_n": 100})
        serving.append({"day": day, "cluster_id": 1, "requests": 50, "specialist": 40, "teacher": 10,
                        "below_threshold": 2, "escalations": {}, "served_tokens": 2000, "specialist_ms": 50.0})
        for j in range(10):
            shadow.append({"event": "pair", "time": f"{day}T10:00:{j:02d}+00:00", "day": day, "trace_id": f"t{i}-{j}",
                           "cluster_id": 0, "specialist": "cards", "version": 1, "agree": j >= 3 * i,
                           "teacher_model": "gpt-x", "cost_usd": 0.0001})
            shadow.append({"event": "pair", "time": f"{day}T11:00:{j:02d}+00:00", "day": day, "trace_id": f"u{i}-{j}",
                           "cluster_id": 1, "specialist": "sql", "version": 2, "agree": True,
                           "teacher_model": "gpt-x", "cost_usd": 0.0001})
    shadow.append({"event": "demoted", "time": f"{days[-1]}T12:00:00+00:00", "day": days[-1], "specialist": "cards",
                   "version": 1, "reason": "demoted by shadow evaluation", "k": 21, "n": 30})
    ws.state_path(SERVING_LOG).write_text("".join(json.dumps(r) + "\n" for r in serving), encoding="utf-8")
    ws.state_path(SHADOW_LOG).write_text("".join(json.dumps(r) + "\n" for r in shadow), encoding="utf-8")
    return days


def test_daily_series_from_the_logs(workspace: Workspace) -> None:
    populate(workspace)
    days = _write_logs(workspace)
    daily = monitor_daily(workspace)
    assert daily["days"] == days
    cards = daily["tasks"]["intent"]  # cluster 0's task in clusters.json
    assert cards["requests"] == [100, 100, 100] and cards["served"] == [80, 60, 40]
    assert cards["pairs"] == [10, 10, 10] and cards["agreeing"] == [10, 7, 4]
    assert daily["escalations"] == {"low confidence": [3, 4, 5], "validator json": [0, 1, 2]}


def test_the_report_shows_live_monitoring_from_the_logs(workspace: Workspace) -> None:
    from aad_core.report import render_report

    populate(workspace)
    without = render_report(workspace)
    section = without.split("<h2>Live monitoring</h2>", 1)[1]
    assert "Nothing routed yet" in section and "RoutedChatModel" in section and "aad serve" in section
    assert "served share and live agreement per day" not in without

    _write_logs(workspace)
    text = render_report(workspace)
    _check_self_contained(text)
    section = text.split("<h2>Live monitoring</h2>", 1)[1].split("<h2>", 1)[0]
    assert "Nothing routed yet" not in section
    for header in ("served share", "live agreement", "lower bound", "escalations by reason", "drift", "saved USD"):
        assert header in section, header
    assert "intent" in section and "sql" in section  # one row per task (clusters.json names them)
    assert "low confidence 12" in section and "validator json 3" in section  # escalations over the 3 days
    assert "60%" in section  # task 0 served 180 of 300
    assert "(21/30)" in section  # its live agreement over the logged pairs
    assert "Demotions by shadow evaluation" in section and "cards v1: demoted by shadow evaluation" in section
    assert "<td>-</td>" not in section  # the demotion line (no cluster id) is no task
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', section)
    alts = [alt for alt, _ in images]
    assert alts == ["served share and live agreement per day", "escalations by reason per day"]
    assert all(len(b64) > 1000 for _, b64 in images)


def test_logs_without_escalations_draw_no_empty_plot(workspace: Workspace) -> None:
    from aad_core.report import render_report

    day = date.today().isoformat()
    workspace.state_path(SERVING_LOG).write_text(json.dumps(
        {"day": day, "cluster_id": 3, "requests": 10, "specialist": 10, "teacher": 0, "escalations": {}}) + "\n",
        encoding="utf-8")
    section = render_report(workspace).split("<h2>Live monitoring</h2>", 1)[1].split("<h2>", 1)[0]
    assert "cluster 3" in section and "100%" in section
    assert 'alt="served share and live agreement per day"' in section
    assert "escalations by reason per day" not in section and "No escalation logged" in section

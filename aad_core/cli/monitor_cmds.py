"""``aad monitor``: how the served specialists do in production (see :mod:`aad_core.serving.monitor`)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from aad_core.cli.app import JsonOption, WorkspaceOption, console, open_workspace, print_json


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


def _new_labels(stat: dict[str, Any] | None) -> str:
    """``new / answers (share)`` of the new-labels statistic ("-" for tasks that are not label tasks)."""
    if not stat or not stat.get("n"):
        return "-"
    return f"{stat['new']}/{stat['n']} ({_pct(stat['share'])})"


def _shift(stat: dict[str, Any] | None) -> str:
    """Recent mean routing similarity against the training calls' mean."""
    if not stat:
        return "-"
    return f"{stat['recent']:.3f} (train {stat['training']:.3f})"


def monitor_cmd(
    days: Annotated[int, typer.Option("--days", min=0, help="The last N UTC days (0 = everything logged).")] = 7,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Per task: served share, live agreement with the teacher (shadow pairs, with the Clopper-Pearson
    lower bound), escalations by reason, drift (below-threshold share, new labels in the teacher's
    answers, shift of the mean routing similarity, a changed teacher), and the cost saved against
    teacher-only."""
    from aad_core.serving.monitor import monitor_summary

    ws = open_workspace(workspace)
    summary = monitor_summary(ws, days=days or None)
    if as_json:
        print_json(summary)
        return
    if not summary["tasks"]:
        console.print("Nothing routed yet: the counters fill while 'aad serve' or a routed model serves requests "
                      f"({ws.state_dir}/serving.jsonl, shadow.jsonl).")
        return
    span = "everything logged" if summary["since"] is None else f"since {summary['since']}"
    table = Table(title=f"Monitor ({span}; target agreement {100 * summary['target_agreement']:.0f} %)")
    for col in ("task", "specialist", "requests", "served", "live agreement", "lower bound", "pairs",
                "escalations", "below threshold", "new labels", "similarity", "saved USD", "flags"):
        table.add_column(col)
    for t in summary["tasks"]:
        spec = "-" if t["specialist"] is None else f"{t['specialist']} v{t['version']}" + (
            f" ({t['state']})" if t["state"] == "demoted" else "")
        agreement = "-" if not t["window_pairs"] else f"{_pct(t['live_agreement'])} ({t['agreeing_pairs']}/{t['window_pairs']})"
        esc = ", ".join(f"{k} {v}" for k, v in t["escalations"].items()) or "-"
        below = _pct(t["below_threshold_share"]) + (
            f" (calib. {_pct(t['calibration_below_share'])})" if t["calibration_below_share"] is not None else "")
        flags = []
        drift = [f for f in t.get("drift_flags", []) if f != "teacher changed"]
        if drift:
            flags.append("drift: " + ", ".join(drift))
        if t["teacher_model_changed"]:
            flags.append("teacher changed: " + " -> ".join(t["teacher_models"]))
        if t["demotions"]:
            flags.append(f"demoted x{len(t['demotions'])}")
        table.add_row(str(t["task"]), spec, str(t["requests"]), _pct(t["served_share"]), agreement,
                      _pct(t["lower_bound"]), str(t["shadow_pairs"]), esc, below, _new_labels(t.get("new_labels")),
                      _shift(t.get("embedding_shift")), f"{t['saved_usd']:.4f}", ", ".join(flags) or "-")
    console.print(table)
    total = summary["total"]
    console.print(f"Total: {total['requests']} requests, {_pct(total['served_share'])} served by specialists, "
                  f"{total['shadow_pairs']} shadow pairs, {total['saved_usd']:.4f} USD saved against teacher-only "
                  f"(at {summary['teacher_price_per_mtok']:g} USD / 1M teacher tokens).")
    _print_cascade(summary.get("cascade"))
    for t in summary["tasks"]:
        labels = (t.get("new_labels") or {}).get("labels") or {}
        if labels:
            console.print(escape(f"{t['task']}: teacher answers not among the training labels: "
                                 + ", ".join(f"{k!r} x{v}" for k, v in labels.items())), highlight=False)
        for d in t["demotions"]:
            console.print(f"[yellow]{t['specialist']} v{d['version']}[/] {d['reason']} ({d['time']}). "
                          f"Undo: [bold]aad specialists promote {t['specialist']} --version {d['version']}[/]")


def _print_cascade(cascade: dict[str, Any] | None) -> None:
    """Traffic and live agreement per cascade tier ([route] tiers), when a middle tier was ever tried."""
    if not cascade:
        return
    table = Table(title="Cascade tiers (who answered; live agreement with the teacher from shadow pairs)")
    for col in ("tier", "answered", "share", "tried", "rejected", "live agreement"):
        table.add_column(col)
    for name in cascade["tiers"]:
        live = (cascade.get("agreement") or {}).get(name)
        agreement = "reference" if name == "teacher" else "-" if not live or not live.get("n") else (
            f"{_pct(live['agreement'])} ({live['k']}/{live['n']}, lower bound {_pct(live['lower_bound'])})")
        middle = name not in ("specialist", "teacher")
        table.add_row(escape(name), str(cascade["answered"].get(name, 0)), _pct(cascade["share"].get(name)),
                      str(cascade["tried"].get(name, 0)) if middle else "-",
                      str(cascade["rejected"].get(name, 0)) if middle else "-", agreement)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("monitor")(monitor_cmd)

"""``aad report``: one self-contained HTML file (plots as base64 PNG, no external links or scripts)
built from the stages' artifacts in ``.aad/state/``. A stage that has not run yet shows what to run."""

from __future__ import annotations

import html
import json
import logging
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aad_core.artifacts import Artifact, ClusterState, EvalReport, RouterEval, SelectionCurve
from aad_core.errors import AADError
from aad_core.report import plots
from aad_core.report.cluster_map import draw_cluster_map

if TYPE_CHECKING:
    from aad_core.workspace import Workspace

log = logging.getLogger(__name__)

_LIBS = ("torch", "transformers", "peft", "sentence-transformers", "scikit-learn", "sqlglot", "matplotlib")
_BANKING77 = ("banking77: Casanueva et al. 2020, \u201cEfficient Intent Detection with Dual Sentence Encoders\u201d, "
              "PolyAI-LDN/task-specific-datasets, licensed CC-BY-4.0")

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;width:100%;font-size:.9rem}th,td{border:1px solid #ddd;padding:.35rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.yes{color:#1a7f37;font-weight:600}.no{color:#b35900}.muted{color:#777}.todo{background:#fff8e1;border-left:4px solid #f0b400;padding:.6rem .9rem}
.note{background:#f6f8fa;border-left:4px solid #8c8c8c;padding:.6rem .9rem}
img{max-width:100%;height:auto;border:1px solid #eee}pre{background:#f6f8fa;padding:.8rem;overflow-x:auto;font-size:.8rem}
.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:.6rem 1rem;min-width:10rem}
.card b{display:block;font-size:1.5rem}code{background:#f0f0f0;padding:0 .2rem}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{b64}">'


def _todo(command: str, what: str) -> str:
    return f'<p class="todo">Not run yet: {_e(what)}. Run <code>{_e(command)}</code>.</p>'


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None:
        return '<span class="muted">n/a</span>'
    try:
        return _e(fmt.format(value))
    except (TypeError, ValueError):
        return _e(value)


A = TypeVar("A", bound=Artifact)


def _load(kind: type[A], ws: Workspace, problems: list[str]) -> A | None:
    """The artifact, or None when missing; an unreadable one is noted in ``problems`` (the report
    still renders, showing what to re-run)."""
    try:
        return kind.load_optional(ws)
    except AADError as err:
        problems.append(str(err))
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _has_store(ws: Workspace) -> bool:
    """Whether the workspace has a trace store to read (a ``[store] url``, or its SQLite file exists):
    the report does not create an empty SQLite file."""
    return bool(ws.store_url) or ws.db_path.exists()


def _attributions(ws: Workspace) -> list[str]:
    """Distinct data attributions recorded on the traces (and banking77's, when its data is used)."""
    if not _has_store(ws):
        return []
    try:
        with ws.store() as store:
            if hasattr(store, "metadata_values"):
                rows = sorted(store.metadata_values(["attribution", "gold_source"]), key=str)
            else:  # a store without the query: every trace's metadata
                rows = sorted({(t.metadata.get("attribution"), t.metadata.get("gold_source"))
                               for t in store.iter_traces()}, key=str)
    except Exception as err:  # noqa: BLE001 - the report still renders without attributions
        log.warning("the report lists no data attributions: %s", err)
        return []
    lines = sorted({str(a) for a, _ in rows if a})
    uses_banking77 = any("banking77" in f"{a} {g}".lower() for a, g in rows)
    if uses_banking77 and not any("cc-by" in line.lower() and "banking77" in line.lower() for line in lines):
        lines.insert(0, _BANKING77)
    return lines


def _trace_count(ws: Workspace) -> int | None:
    """How many traces the workspace's store holds (SQLite or PostgreSQL); None when it cannot be read."""
    if not _has_store(ws):
        return None
    try:
        with ws.store() as store:
            return int(store.count())
    except Exception as err:  # noqa: BLE001 - the report shows "n/a" rather than failing
        log.warning("the report shows no trace count: %s", err)
        return None


def _header(ws: Workspace, counts: dict[str, Any]) -> str:
    from aad_core import __version__

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cards = "".join(
        f'<div class="card">{_e(label)}<b>{_e(value if value is not None else "n/a")}</b></div>'
        for label, value in counts.items()
    )
    return (
        f"<h1>aad report</h1><p class=\"muted\">Workspace <code>{_e(ws.root)}</code> &middot; generated {_e(stamp)} "
        f"&middot; aad {_e(__version__)} &middot; seed {_e(ws.config.seed)}</p><div class=\"cards\">{cards}</div>"
    )


def _clusters_section(ws: Workspace, clusters: ClusterState | None) -> str:
    out = ["<h2>Task clusters</h2>"]
    if clusters is None:
        return out[0] + _todo("aad cluster", "task discovery")
    png = draw_cluster_map(ws)
    if png is not None:
        out.append(_img(plots.png_file(png), "cluster map"))
    items = [c.model_dump(mode="json") for c in clusters.clusters]
    if items:
        out.append(_img(plots.cluster_overview(items, ws.config.cluster.variance_threshold), "cluster size vs variance"))
    if clusters.dropped:  # {trace id: reason}
        from collections import Counter

        kinds = Counter(str(r).split(" of ")[0].split(" (")[0] for r in clusters.dropped.values())
        detail = ", ".join(f"{v} {k}" for k, v in kinds.most_common())
        out.append(f"<p class=\"muted\">Dropped during curation: {_e(detail)}.</p>")
    return "".join(out)


def _parity(evaluation: EvalReport) -> float:
    return 0.95 if evaluation.parity is None else float(evaluation.parity)


def _cluster_table(clusters: ClusterState | None, evaluation: EvalReport | None) -> str:
    out = ["<h2>Per-cluster results</h2>"]
    if clusters is None and evaluation is None:
        return out[0] + _todo("aad cluster", "task discovery")
    by_id = {r["cluster_id"]: r for r in (evaluation.clusters if evaluation else [])}
    items = [c.model_dump(mode="json") for c in clusters.clusters] if clusters else []
    items = items or [
        {"id": r["cluster_id"], "label": r.get("label"), "size": r.get("size"), "routine": r.get("routine"),
         "task": r.get("task")} for r in by_id.values()
    ]
    if evaluation is None:
        out.append(_todo("aad eval", "evaluation of the specialists"))
    else:
        gate = evaluation.gate
        out.append(f'<p class="note">{_e(evaluation.teacher_score_note)} A specialist is promoted by the '
                   "risk-coverage gate (below): it serves only the calls whose confidence clears its threshold, and "
                   f"must serve at least {_e(format(float(gate.get('min_coverage', 0.2)), '.0%'))} of the test calls "
                   f"at agreement {_e(format(float(gate.get('target_agreement', 0.95)), '.2f'))} or more. Scores are "
                   "agreement with the teacher on each cluster's whole held-out split (the dashed parity line: "
                   f"{_e(format(_parity(evaluation), '.0%'))} of the teacher's); the <em>semantic</em> metric "
                   "(embedding similarity) is the weakest and is marked with *.</p>")
    head = ("<tr><th>cluster</th><th>label</th><th>task</th><th class=num>size</th><th>answers</th>"
            "<th class=num>estimate</th><th>candidate</th><th>metric</th>"
            "<th class=num>base student</th><th class=num>specialist</th><th class=num>teacher</th><th>promoted</th>"
            "<th>reason</th></tr>")
    rows = []
    for c in items:
        r = by_id.get(c.get("id"), {})
        evaluated = r.get("status") == "evaluated"
        metric = (r.get("metric") or "") + ("*" if r.get("weakest_metric") else "")
        promoted = ('<span class="yes">yes</span>' if r.get("promoted") else '<span class="no">no</span>') if r else ""
        rows.append(
            f"<tr><td>{_e(c.get('id'))}</td><td>{_e(c.get('label'))}</td><td>{_e(c.get('task') or '')}</td>"
            f"<td class=num>{_e(c.get('size'))}</td><td>{_e(c.get('answer_kind') or '')}</td>"
            f"<td class=num>{_num((c.get('estimate') or {}).get('estimate'))}</td>"
            f"<td>{'yes' if c.get('routine') else 'no'}</td><td>{_e(metric)}</td>"
            f"<td class=num>{_num(r['base']['score']) if evaluated else ''}</td>"
            f"<td class=num>{_num(r['specialist']['score']) if evaluated else ''}</td>"
            f"<td class=num>{_num(r['teacher']['score']) if evaluated else ''}</td>"
            f"<td>{promoted}</td><td>{_e(r.get('reason', ''))}</td></tr>"
        )
    out.append(f"<table>{head}{''.join(rows)}</table>")
    out.append('<p class="note">estimate: the distillability estimate computed before training (nearest-neighbour '
               "answer agreement, answer structure, copy rate and length; aad_core/pipeline/distillability.py); a task "
               "below [cluster] min_estimate is no candidate and stays with the teacher.</p>")
    out.append(_candidates_table(list(by_id.values())))
    evaluated_rows = [r for r in by_id.values() if r.get("status") == "evaluated"]
    if evaluated_rows and evaluation is not None:
        out.append(_img(plots.score_bars(evaluated_rows, _parity(evaluation)), "held-out scores"))
        out.append(_examples(evaluated_rows))
    return "".join(out)


def _candidates_table(rows: list[dict[str, Any]]) -> str:
    """Per task, every specialist kind tried, cheapest first: score, coverage at target, latency, cost."""
    lines = []
    for r in rows:
        for c in r.get("candidates") or []:
            coverage = c.get("coverage")
            if coverage is None and c.get("mode") == "parity-fallback":
                coverage = 1.0 if c.get("promoted") else None
            lines.append(
                f"<tr><td>{_e(r.get('cluster_id'))}</td><td>{_e(r.get('label'))}</td><td>{_e(c.get('kind'))}</td>"
                f"<td>{_e(c.get('name'))} v{_e(c.get('version'))}</td><td class=num>{_num(c.get('score'))}</td>"
                f"<td class=num>{_pct(coverage) if coverage is not None else ''}</td>"
                f"<td class=num>{_num(c.get('agreement'))}</td>"
                f"<td class=num>{_num(c.get('latency_p50_ms'), '{:.1f}')}</td>"
                f"<td class=num>{_num(c.get('cost_per_mtok'), '{:.4f}')}</td>"
                f"<td>{'<span class=yes>yes</span>' if c.get('promoted') else '<span class=no>no</span>'}</td></tr>")
    if not lines:
        return ""
    head = ("<tr><th>cluster</th><th>label</th><th>kind</th><th>specialist</th><th class=num>score</th>"
            "<th class=num>coverage at target</th><th class=num>agreement served</th><th class=num>p50 ms</th>"
            "<th class=num>USD / 1M tok</th><th>promoted</th></tr>")
    return ("<h3>Specialist candidates per task</h3><p class=note>Kinds are tried cheapest first (a classifier on "
            "the routing embedding, then a LoRA student); a later kind trains only when the gate refuses the one "
            f"before.</p><table>{head}{''.join(lines)}</table>")


def _pct(value: Any) -> str:
    return _num(value, "{:.0%}")


def _gate_section(evaluation: EvalReport | None) -> str:
    """Per evaluated cluster: the confidence signal and threshold, what it serves on the calibration
    and test parts, and the test part's risk-coverage curves."""
    out = ["<h2>Risk-coverage gate</h2>"]
    rows = evaluation.evaluated() if evaluation else []
    if not rows or evaluation is None:
        return out[0] + _todo("aad eval", "the risk-coverage gate (which specialists take which share of calls)")
    settings = evaluation.gate
    out.append(
        "<p>Each cluster's held-out calls are split by a seeded hash into a calibration part (training saw only this "
        "part, for early stopping) and a test part. On the calibration part the gate picks the confidence threshold "
        "with the largest served share whose agreement with the teacher has a one-sided "
        f"{_e(format(1 - float(settings.get('alpha', 0.05)), '.0%'))} Clopper-Pearson lower bound of at least "
        f"{_e(settings.get('target_agreement', 0.95))}; the test part then measures that threshold. Requests below "
        "the threshold go to the teacher.</p>")
    head = ("<tr><th>cluster</th><th>signal</th><th class=num>threshold</th><th class=num>calibration: served</th>"
            "<th class=num>agreement</th><th class=num>lower bound</th><th class=num>calls</th>"
            "<th class=num>test: served</th><th class=num>agreement</th><th class=num>served / calls</th>"
            "<th>parity</th><th>promoted</th></tr>")
    body = []
    for r in rows:
        gate = r.get("gate") or {}
        cal, test = gate.get("calibration") or {}, gate.get("test") or {}
        parity = r.get("parity") or {}
        promoted = '<span class="yes">yes</span>' if r.get("promoted") else '<span class="no">no</span>'
        body.append(
            f"<tr><td>{_e(r['cluster_id'])}</td><td>{_e(gate.get('signal', ''))}</td>"
            f"<td class=num>{_num(gate.get('threshold'), '{:.4g}')}</td><td class=num>{_pct(cal.get('coverage'))}</td>"
            f"<td class=num>{_num(cal.get('agreement'))}</td><td class=num>{_num(cal.get('lower_bound'))}</td>"
            f"<td class=num>{_e(cal.get('n', ''))}</td><td class=num>{_pct(test.get('coverage'))}</td>"
            f"<td class=num>{_num(test.get('agreement') if test.get('n_served') else None)}</td>"
            f"<td class=num>{_e(test.get('n_served', ''))} / {_e(test.get('n', ''))}</td>"
            f"<td>{'' if 'reached' not in parity else 'reached' if parity['reached'] else 'not reached'}</td>"
            f"<td>{promoted}</td></tr>")
    out.append(f"<table>{head}{''.join(body)}</table>")
    if any((r.get("risk_coverage") or {}).get("test") for r in rows):
        out.append(_img(plots.risk_coverage(rows), "risk-coverage curves"))
    return "".join(out)


def _examples(rows: list[dict[str, Any]]) -> str:
    parts = ["<details><summary>Example held-out answers</summary>"]
    for r in rows:
        parts.append(f"<h3>Cluster {_e(r['cluster_id'])}: {_e(r.get('label'))}</h3><table>"
                     "<tr><th>request</th><th>teacher</th><th>base student</th><th>specialist</th></tr>")
        for ex in r.get("examples", []):
            mark = '<span class="yes">&#10003;</span>' if ex.get("specialist_correct") else '<span class="no">&#10007;</span>'
            parts.append(f"<tr><td>{_e(ex.get('request'))}</td><td>{_e(ex.get('teacher'))}</td>"
                         f"<td>{_e(ex.get('base'))}</td><td>{mark} {_e(ex.get('specialist'))}</td></tr>")
        parts.append("</table>")
    parts.append("</details>")
    return "".join(parts)


def _selection_section(curve: SelectionCurve | None) -> str:
    out = ["<h2>Data selection: KL + uncertainty vs random</h2>"]
    if not curve or not curve.budgets:
        return out[0] + _todo("python benchmarks/selection_vs_random.py", "the selection experiment")
    budgets = curve.budgets
    curves = curve.curves()
    if not curves:
        return out[0] + _todo("python benchmarks/selection_vs_random.py", "the selection experiment")
    out.append(_img(plots.learning_curves(budgets, curves, curve.base_accuracy), "selection learning curves"))
    ratio, ratio_text = curve.ratio, curve.ratio_text
    at = curve.ratio_at if curve.ratio_at is not None else budgets[len(budgets) // 2]
    if ratio is None and ratio_text is None and "kl_uncertainty" in curves and "random" in curves and at in budgets:
        from aad_core.pipeline.evaluate.curves import sample_ratio

        ratio = sample_ratio(budgets, curves["kl_uncertainty"], curves["random"], at)
    if ratio is not None:
        ratio_text = f"{ratio:.1f}\u00d7"
    if ratio_text:
        out.append(f"<p>Random selection needs <b>{_e(ratio_text)}</b> the samples to match the held-out accuracy "
                   f"KL + uncertainty selection reaches with {_e(at)} samples (the seed paper reports about 4&times;).</p>")
    if curve.dataset:
        out.append(f"<p class=\"muted\">Data: {_e(curve.dataset)}</p>")
    return "".join(out)


def _router_section(router_eval: RouterEval | None) -> str:
    out = ["<h2>Router</h2>"]
    if router_eval is None:
        return out[0] + _todo("aad distill", "router calibration")
    rows, cols = router_eval.labels, router_eval.targets
    out.append(_img(plots.confusion(router_eval.matrix, rows, cols, "Held-out routing (promoted specialists)"),
                    "router confusion matrix"))
    alt = router_eval.if_all_routine_served
    if alt and "matrix" in alt:
        out.append(_img(plots.confusion(alt["matrix"], rows, cols, "If every routine cluster were served"),
                        "router confusion matrix, all routine clusters served"))
    out.append(f"<p>Accuracy {_num(router_eval.accuracy)} &middot; routine recall "
               f"{_num(router_eval.routine_recall)} &middot; complex kept with the teacher "
               f"{_num(router_eval.complex_recall)} &middot; n = {_e(router_eval.n)}. Rows: requests of "
               "served (routine) clusters vs everything else; a routine request sent to another cluster's "
               "specialist counts as wrong.</p>")
    return "".join(out)


def _latency_cost_section(evaluation: EvalReport | None) -> str:
    out = ["<h2>Latency and cost</h2>"]
    rows = evaluation.evaluated() if evaluation else []
    if not rows or evaluation is None:
        return out[0] + _todo("aad eval", "evaluation of the specialists")
    out.append(_img(plots.latency_cost_bars(rows), "latency and cost"))
    head = ("<tr><th>cluster</th><th class=num>specialist p50 / p95 ms</th><th class=num>teacher p50 / p95 ms</th>"
            "<th class=num>specialist USD/1M tok</th><th class=num>teacher USD/1M tok</th></tr>")
    body = "".join(
        f"<tr><td>{_e(r['cluster_id'])}</td>"
        f"<td class=num>{_num(r['latency']['specialist'].get('p50_ms'), '{:.0f}')} / "
        f"{_num(r['latency']['specialist'].get('p95_ms'), '{:.0f}')}</td>"
        f"<td class=num>{_num(r['latency']['teacher'].get('p50_ms'), '{:.0f}')} / "
        f"{_num(r['latency']['teacher'].get('p95_ms'), '{:.0f}')}</td>"
        f"<td class=num>{_num(r['cost'].get('specialist_per_mtok'), '{:.4f}')}</td>"
        f"<td class=num>{_num(r['cost'].get('teacher_per_mtok'), '{:.2f}')}</td></tr>"
        for r in rows
    )
    out.append(f"<table>{head}{body}</table>")
    out.append(
        f"<p class=\"muted\">Specialist latency {_e(rows[0]['latency']['specialist'].get('source', 'measured'))} on "
        f"this machine ({_e(platform.machine())}, {_e(platform.system())}, {_e(os.cpu_count())} CPUs) with held-out "
        "requests; teacher latency "
        "from the recorded traces. Specialist cost = hardware price per hour "
        f"(USD {_e(evaluation.hardware_price_per_hour)}) &times; measured generation time &divide; tokens "
        f"processed (prompt + answer); teacher cost = configured price (USD {_e(evaluation.teacher_price_per_mtok)} "
        "per 1M tokens).</p>"
    )
    return "".join(out)


def _served_share(entry: dict[str, Any]) -> float:
    """The share of a promoted cluster's calls its specialist serves: the gate's test coverage (1.0 for
    an entry from before the gate)."""
    test = (entry.get("gate") or {}).get("test") or {}
    return float(test["coverage"]) if test.get("coverage") is not None else 1.0


def _replaceability_section(clusters: ClusterState | None, evaluation: EvalReport | None) -> str:
    out = ["<h2>Replaceability estimate</h2>"]
    if clusters is None or not clusters.replaceability:
        return out[0] + _todo("aad cluster", "task discovery")
    rep = clusters.replaceability
    shares: dict[str, dict[str, float]] = {
        "routine clusters (upper bound)": {k: float(rep.get(k) or 0.0) for k in ("calls", "tokens", "cost")}
    }
    if evaluation is not None:
        # a promoted specialist takes only the share of its cluster's calls that clears its threshold
        served = {int(r["cluster_id"]): _served_share(r) for r in evaluation.clusters if r.get("promoted")}
        shares["promoted specialists"] = {
            m: sum(float(getattr(c, f"share_{m}") or 0.0) * served[c.id] for c in clusters.clusters if c.id in served)
            for m in ("calls", "tokens", "cost")
        }
    out.append(_img(plots.share_bars(shares), "replaceability"))
    lines = "".join(
        f"<li>{_e(name)}: {_num(v['calls'], '{:.0%}')} of calls, {_num(v['tokens'], '{:.0%}')} of tokens, "
        f"{_num(v['cost'], '{:.0%}')} of cost</li>"
        for name, v in shares.items()
    )
    out.append(f"<ul>{lines}</ul>")
    if evaluation is None:
        out.append(_todo("aad eval", "the risk-coverage gate (which routine clusters actually get a specialist)"))
    return "".join(out)


_MONITOR_HINT = ("Nothing routed yet: this section reads the routing engine's logs, <code>.aad/state/serving.jsonl</code> "
                 "and <code>shadow.jsonl</code>. Route the agent's traffic through the specialists &mdash; "
                 "<code>RoutedChatModel</code> (LangChain), <code>RoutedLLM</code> (LlamaIndex) or the "
                 "OpenAI-compatible <code>aad serve</code> &mdash; with <code>[route] shadow_rate</code> &gt; 0 for "
                 "live agreement; <code>aad monitor</code> prints the same table.")


def _cascade_table(cascade: dict[str, Any] | None) -> str:
    """Traffic and live agreement per cascade tier (``[route] tiers``); "" when no middle tier was tried."""
    if not cascade:
        return ""
    rows = []
    for name in cascade["tiers"]:
        live = (cascade.get("agreement") or {}).get(name)
        middle = name not in ("specialist", "teacher")
        agreement = ("reference" if name == "teacher" else "" if not live or not live.get("n") else
                     f"{_num(live['agreement'])} ({_e(live['k'])}/{_e(live['n'])}), lower bound {_num(live['lower_bound'])}")
        rows.append(f"<tr><td>{_e(name)}</td><td class=num>{_e(cascade['answered'].get(name, 0))}</td>"
                    f"<td class=num>{_pct(cascade['share'].get(name))}</td>"
                    f"<td class=num>{_e(cascade['tried'].get(name, 0)) if middle else ''}</td>"
                    f"<td class=num>{_e(cascade['rejected'].get(name, 0)) if middle else ''}</td>"
                    f"<td>{agreement}</td></tr>")
    return ("<h3>Cascade tiers</h3><p>Who answered each routed request: the specialist, a middle tier "
            "(<code>[route] tiers</code>, tried in order when the specialist does not answer; its answer must pass the "
            "task's validators and its confidence gate) or the teacher. Live agreement: the tier's shadow pairs. Middle "
            "tiers' answers are never training data.</p><table><tr><th>tier</th><th class=num>answered</th>"
            "<th class=num>share</th><th class=num>tried</th><th class=num>rejected</th><th>live agreement</th></tr>"
            + "".join(rows) + "</table>")


def _monitor_section(ws: Workspace) -> str:
    """Live monitoring: per task, :func:`~aad_core.serving.monitor.monitor_summary` over everything logged,
    and per day the served share, the live agreement and the escalations by reason."""
    from aad_core.serving.monitor import monitor_daily, monitor_summary
    from aad_core.serving.shadow import SERVING_LOG, SHADOW_LOG, read_jsonl

    out = ["<h2>Live monitoring</h2>"]
    if not (ws.state_dir / SERVING_LOG).exists() and not (ws.state_dir / SHADOW_LOG).exists():
        return out[0] + f'<p class="todo">{_MONITOR_HINT}</p>'
    try:
        summary = monitor_summary(ws, days=None)
        daily = monitor_daily(ws)
    except Exception as err:  # noqa: BLE001 - the report still renders without this section
        log.warning("the report shows no live monitoring: %s", err)
        return out[0] + f'<p class="todo">The serving logs cannot be read: {_e(err)}.</p>'
    # a demotion line in shadow.jsonl carries no cluster id: monitor_summary lists an empty task for it
    tasks = [t for t in summary["tasks"] if t["requests"] or t["shadow_pairs"] or t["cluster_id"] is not None]
    if not tasks:
        return out[0] + f'<p class="todo">{_MONITOR_HINT}</p>'
    target, alpha = summary["target_agreement"], summary["alpha"]
    out.append(
        "<p>From the routing engine's logs (<code>.aad/state/serving.jsonl</code>, <code>shadow.jsonl</code>), "
        f"everything logged ({_e(daily['days'][0] if daily['days'] else '')} to "
        f"{_e(daily['days'][-1] if daily['days'] else '')}, UTC). Served share: requests the specialist answered "
        "of the requests routed to its task. Live agreement: shadow pairs (the teacher also answered a share "
        "of the specialist-served requests, <code>[route] shadow_rate</code>) that agree, over the served version's "
        f"last <code>[route] shadow_window</code> pairs, with the one-sided {_e(format(1 - float(alpha), '.0%'))} "
        f"Clopper-Pearson lower bound; a version whose bound falls below the target {_e(target)} is demoted. "
        "Saved: the teacher's price for the served requests' tokens minus the specialist's hardware time. "
        "<code>aad monitor</code> prints the same table (last 7 days by default).</p>")
    head = ("<tr><th>task</th><th>specialist</th><th class=num>requests</th><th class=num>served share</th>"
            "<th class=num>live agreement</th><th class=num>lower bound</th><th class=num>shadow pairs</th>"
            "<th>escalations by reason</th><th>drift</th><th>demotions</th><th class=num>saved USD</th></tr>")
    body = []
    for t in tasks:
        spec = f"{t['specialist']} v{t['version']}" if t.get("specialist") else ""
        state = t.get("state")
        state_html = (f' <span class="{"yes" if state == "promoted" else "no"}">{_e(state)}</span>' if state else "")
        escalations = ", ".join(f"{k} {v}" for k, v in (t.get("escalations") or {}).items())
        flags = t.get("drift_flags") or []
        new_labels = (t.get("new_labels") or {}).get("labels") or {}
        drift = ", ".join(flags) + (f" ({', '.join(map(str, new_labels))})" if "new labels" in flags and new_labels
                                    else "")
        bound = t.get("lower_bound")
        low = bound is not None and t.get("window_pairs") and bound < float(target)
        bound_html = f'<span class="no">{_num(bound)}</span>' if low else _num(bound)
        demotions = "; ".join(f"v{d.get('version')} {str(d.get('time') or '')[:16]}" for d in t.get("demotions") or [])
        body.append(
            f"<tr><td>{_e(t['task'])}</td><td>{_e(spec)}{state_html}</td><td class=num>{_e(t['requests'])}</td>"
            f"<td class=num>{_pct(t.get('served_share'))}</td>"
            f"<td class=num>{_num(t.get('live_agreement'))} ({_e(t.get('agreeing_pairs'))}/"
            f"{_e(t.get('window_pairs'))})</td><td class=num>{bound_html}</td>"
            f"<td class=num>{_e(t.get('shadow_pairs'))}</td><td>{_e(escalations)}</td>"
            f"<td>{'<span class=no>' + _e(drift) + '</span>' if drift else ''}</td><td>{_e(demotions)}</td>"
            f"<td class=num>{_num(t.get('saved_usd'), '{:.4f}')}</td></tr>")
    total = summary["total"]
    body.append(f"<tr><th>all</th><th></th><th class=num>{_e(total['requests'])}</th>"
                f"<th class=num>{_pct(total.get('served_share'))}</th><th></th><th></th>"
                f"<th class=num>{_e(total.get('shadow_pairs'))}</th><th></th><th></th><th></th>"
                f"<th class=num>{_num(total.get('saved_usd'), '{:.4f}')}</th></tr>")
    out.append(f"<table>{head}{''.join(body)}</table>")
    out.append(_cascade_table(summary.get("cascade")))
    demotions = [r for r in read_jsonl(ws.state_dir / SHADOW_LOG) if r.get("event") == "demoted"]
    if demotions:  # every one logged, also of versions no longer the task's newest
        items = "".join(f"<li>{_e(str(r.get('time') or '')[:19])} {_e(r.get('specialist'))} v{_e(r.get('version'))}: "
                        f"{_e(r.get('reason'))}</li>" for r in demotions)
        out.append(f"<p>Demotions by shadow evaluation (<code>aad specialists promote NAME</code> reverses one):</p>"
                   f"<ul>{items}</ul>")
    days = daily["days"]
    if days:
        out.append(_img(plots.monitor_over_time(days, daily["tasks"], target), "served share and live agreement per day"))
        if any(any(v) for v in daily["escalations"].values()):
            out.append(_img(plots.escalations_over_time(days, daily["escalations"]), "escalations by reason per day"))
        else:
            out.append('<p class="muted">No escalation logged: every specialist answer passed the validators and '
                       "the confidence gate.</p>")
    out.append('<p class="note">Drift (per task, flagged in the table): requests below the similarity threshold at '
               "least twice the calibration's share; new labels in the teacher's answers; a drop of the mean routing "
               "similarity; a changed teacher model. <code>aad distill --if-needed</code> retrains the tasks that "
               "drift, have new traces or shadow disagreements.</p>")
    return "".join(out)


def _footer(ws: Workspace, attributions: list[str]) -> str:
    versions = {"python": platform.python_version(), **{lib: _version(lib) for lib in _LIBS}}
    vtext = " &middot; ".join(f"{_e(k)} {_e(v)}" for k, v in versions.items() if v)
    config = json.dumps(ws.config.model_dump(mode="json"), indent=2)
    out = [f"<h2>Reproducibility</h2><p>{vtext}</p><p>seed {_e(ws.config.seed)}</p>",
           f"<details><summary>Configuration</summary><pre>{_e(config)}</pre></details>"]
    if attributions:
        out.append("<h2>Data attribution</h2><ul>" + "".join(f"<li>{_e(a)}</li>" for a in attributions) + "</ul>")
    return "".join(out)


def render_report(ws: Workspace) -> str:
    """The report as an HTML string, from whatever artifacts exist."""
    problems: list[str] = []
    clusters = _load(ClusterState, ws, problems)
    evaluation = _load(EvalReport, ws, problems)
    curve = _load(SelectionCurve, ws, problems)
    router_eval = _load(RouterEval, ws, problems)
    summary = evaluation.summary if evaluation else {}
    counts = {
        "traces": _trace_count(ws),
        "clusters": len(clusters.clusters) if clusters else None,
        "routine": len(clusters.routine_clusters()) if clusters else None,
        "specialists evaluated": summary.get("evaluated"),
        "promoted": summary.get("promoted"),
    }
    attributions = _attributions(ws)
    if curve and "banking77" in curve.dataset.lower() and not any("banking77" in a for a in attributions):
        attributions.insert(0, _BANKING77)
    body = "".join([
        _header(ws, counts),
        "".join(f'<p class="todo">{_e(p)}</p>' for p in problems),
        _clusters_section(ws, clusters),
        _cluster_table(clusters, evaluation),
        _gate_section(evaluation),
        _selection_section(curve),
        _router_section(router_eval),
        _latency_cost_section(evaluation),
        _replaceability_section(clusters, evaluation),
        _monitor_section(ws),
        _footer(ws, attributions),
    ])
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>aad report</title>"
            f"<style>{_CSS}</style></head><body>{body}</body></html>")


def write_report(ws: Workspace) -> Path:
    """Write ``.aad/report.html`` and return its path."""
    path = ws.report_path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_report(ws), encoding="utf-8")
    tmp.replace(path)
    return path

"""The report's plots: matplotlib (Agg) figures returned as base64 PNG strings."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aad_core.artifacts import ClusterMap
    from aad_core.schema import Cluster

_BLUE, _ORANGE, _GREEN, _GREY, _RED = "#4C72B0", "#DD8452", "#55A868", "#8C8C8C", "#C44E52"


def _figure(width: float = 7.5, height: float = 3.6) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    return fig, ax


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def png_file(path: Any) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def write_cluster_map(path: Path, cluster_map: ClusterMap, clusters: Sequence[Cluster]) -> Path:
    """Draw the 2-D PCA map of the embeddings coloured by cluster (routine clusters' centres as
    stars) to ``path`` as a PNG."""
    import numpy as np

    fig, ax = _figure(8, 6)
    import matplotlib.pyplot as plt

    P = np.asarray(cluster_map.points, dtype=np.float64).reshape(-1, 2)
    ids = np.asarray(cluster_map.cluster_ids)
    cmap = plt.get_cmap("tab20")
    for n, c in enumerate(clusters):
        mask = ids == c.id
        ax.scatter(P[mask, 0], P[mask, 1], s=6, alpha=0.5, color=cmap(n % 20),
                   label=f"{c.id}{'*' if c.routine else ''} {c.label[:28]} ({c.size})")
        if c.id not in cluster_map.centroids:
            continue
        cx, cy = cluster_map.centroids[c.id]
        ax.scatter([cx], [cy], s=180 if c.routine else 80, marker="*" if c.routine else "X",
                   color=cmap(n % 20), edgecolors="black", linewidths=0.8, zorder=3)
        ax.annotate(str(c.id), (cx, cy), xytext=(4, 4), textcoords="offset points", fontsize=8, weight="bold")
    ax.set_title("aad task clusters (PCA of the embeddings; * = routine)")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=6, loc="best", markerscale=2, framealpha=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def cluster_overview(clusters: Sequence[dict[str, Any]], variance_threshold: float | None) -> str:
    """Size vs variance per cluster; routine clusters in green, the tau line dashed."""
    fig, ax = _figure()
    for c in clusters:
        color = _GREEN if c.get("routine") else _GREY
        ax.scatter(c.get("variance", 0.0), c.get("size", 0), s=40 + 4 * min(c.get("size", 0), 400) ** 0.8,
                   color=color, alpha=0.6, edgecolor="black", linewidth=0.5)
        ax.annotate(str(c.get("id")), (c.get("variance", 0.0), c.get("size", 0)), ha="center", va="center", fontsize=8)
    if variance_threshold is not None:
        ax.axvline(variance_threshold, color=_RED, linestyle="--", linewidth=1, label=f"tau = {variance_threshold:g}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("variance (mean squared distance to centroid)")
    ax.set_ylabel("traces in cluster")
    ax.set_title("Task clusters (green = routine)")
    return _png(fig)


def score_bars(rows: Sequence[dict[str, Any]], parity: float) -> str:
    """Base student vs specialist vs teacher per evaluated cluster, with the parity target."""
    import numpy as np

    fig, ax = _figure(width=max(6.0, 1.3 * len(rows) + 2))
    x = np.arange(len(rows))
    w = 0.26
    base = [r["base"]["score"] if r["base"].get("score") is not None else float("nan") for r in rows]  # nan: not run
    spec = [r["specialist"]["score"] for r in rows]
    teacher = [r["teacher"]["score"] for r in rows]
    ax.bar(x - w, base, w, label="base student", color=_GREY)
    ax.bar(x, spec, w, label="specialist", color=[_GREEN if r["promoted"] else _ORANGE for r in rows])
    ax.bar(x + w, teacher, w, label="teacher", color=_BLUE)
    for i, r in enumerate(rows):
        ax.hlines(r.get("parity_target", parity * r["teacher"]["score"]), i - 1.5 * w, i + 1.5 * w, colors=_RED,
                  linestyles="--", linewidth=1)
    ax.set_xticks(x, [f"{r['cluster_id']}: {r['metric']}" for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out score")
    ax.set_title(f"Held-out score (dashed: parity {parity:.0%} of teacher)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def risk_coverage(rows: Sequence[dict[str, Any]]) -> str:
    """Agreement of the served share vs the share served (the test part's risk-coverage curve) per
    evaluated cluster; a dot where its gate threshold lands, the target agreement dashed."""
    fig, ax = _figure()
    colors = [_GREEN, _BLUE, _ORANGE, _RED, _GREY, "#8172B3", "#937860", "#DA8BC3"]
    targets = set()
    for n, r in enumerate(rows):
        curve = (r.get("risk_coverage") or {}).get("test") or []
        gate = r.get("gate") or {}
        targets.add(gate.get("target_agreement"))
        if not curve:
            continue
        color = colors[n % len(colors)]
        style = "-" if r.get("promoted") else ":"
        ax.plot([p["coverage"] for p in curve], [p["agreement"] for p in curve], style, color=color, linewidth=1.4,
                label=f"{r['cluster_id']}: {str(r.get('label') or '')[:24]}{' (promoted)' if r.get('promoted') else ''}")
        test = gate.get("test") or {}
        if test.get("n_served"):
            ax.scatter([test["coverage"]], [test["agreement"]], color=color, edgecolor="black", zorder=3, s=36)
    for target in targets - {None}:
        ax.axhline(float(target), color=_RED, linestyle="--", linewidth=1)
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("share of test calls served (coverage)")
    ax.set_ylabel("agreement on the served share")
    ax.set_title("Risk-coverage on the test part (dot: the gate's threshold; dashed: target)", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    return _png(fig)


def learning_curves(budgets: Sequence[float], curves: dict[str, Sequence[float]], base: float | None = None) -> str:
    fig, ax = _figure()
    colors = [_GREEN, _GREY, _BLUE, _ORANGE]
    for (name, values), color in zip(curves.items(), colors):
        ax.plot(list(budgets), list(values), marker="o", label=name, color=color)
    if base is not None:
        ax.axhline(base, color=_RED, linestyle=":", linewidth=1, label="base student (no training)")
    ax.set_xlabel("training samples (budget)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("Selection: KL + uncertainty vs random")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def confusion(matrix: Sequence[Sequence[int]], rows: Sequence[str], cols: Sequence[str], title: str) -> str:
    import numpy as np

    fig, ax = _figure(width=4.6, height=3.6)
    m = np.asarray(matrix, dtype=float)
    ax.imshow(m, cmap="Blues")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center",
                    color="white" if m[i, j] > m.max() / 2 else "black", fontsize=12)
    ax.set_xticks(range(len(cols)), [f"to {c}" for c in cols])
    ax.set_yticks(range(len(rows)), list(rows))
    ax.set_xlabel("routed")
    ax.set_ylabel("request")
    ax.set_title(title, fontsize=10)
    return _png(fig)


def latency_cost_bars(rows: Sequence[dict[str, Any]]) -> str:
    """Left: p50/p95 latency, specialist vs teacher. Right: USD per 1M tokens."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(rows) + 4), 3.6), dpi=110)
    x = np.arange(len(rows))
    w = 0.2
    labels = [str(r["cluster_id"]) for r in rows]

    def lat(r: dict[str, Any], who: str, key: str) -> float:
        return float(r["latency"][who].get(key) or 0.0)

    ax1.bar(x - 1.5 * w, [lat(r, "specialist", "p50_ms") for r in rows], w, label="specialist p50", color=_GREEN)
    ax1.bar(x - 0.5 * w, [lat(r, "specialist", "p95_ms") for r in rows], w, label="specialist p95", color=_GREEN, alpha=0.5)
    ax1.bar(x + 0.5 * w, [lat(r, "teacher", "p50_ms") for r in rows], w, label="teacher p50", color=_BLUE)
    ax1.bar(x + 1.5 * w, [lat(r, "teacher", "p95_ms") for r in rows], w, label="teacher p95", color=_BLUE, alpha=0.5)
    ax1.set_xticks(x, labels)
    ax1.set_xlabel("cluster")
    ax1.set_ylabel("latency (ms)")
    ax1.set_title("Latency per request")
    ax1.legend(fontsize=7)

    teacher = [float(r["cost"].get("teacher_per_mtok") or 0.0) for r in rows]
    spec = [float(r["cost"].get("specialist_per_mtok") or 0.0) for r in rows]
    bars_s = ax2.bar(x - w / 2, spec, w, label="specialist", color=_GREEN)
    bars_t = ax2.bar(x + w / 2, teacher, w, label="teacher", color=_BLUE)
    for bars, values in ((bars_s, spec), (bars_t, teacher)):
        for bar, value in zip(bars, values):
            ax2.annotate(f"${value:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                         ha="center", va="bottom", fontsize=7)
    ax2.set_xticks(x, labels)
    ax2.set_xlabel("cluster")
    ax2.set_ylabel("USD per 1M tokens")
    ax2.set_title("Cost per 1M tokens")
    ax2.legend(fontsize=7)
    return _png(fig)


def share_bars(shares: dict[str, dict[str, float]]) -> str:
    """Replaceability: share of calls / tokens / cost, per scenario."""
    import numpy as np

    fig, ax = _figure(width=6.5, height=3.2)
    metrics = ["calls", "tokens", "cost"]
    x = np.arange(len(metrics))
    w = 0.8 / max(1, len(shares))
    for k, ((name, vals), color) in enumerate(zip(shares.items(), [_GREEN, _ORANGE, _BLUE])):
        ax.bar(x + (k - (len(shares) - 1) / 2) * w, [float(vals.get(m) or 0.0) for m in metrics], w,
               label=name, color=color)
    ax.set_xticks(x, [f"share of {m}" for m in metrics])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share")
    ax.set_title("Replaceability: traffic a specialist can take")
    ax.legend(fontsize=8)
    return _png(fig)


def _day_ticks(ax: Any, days: Sequence[str]) -> None:
    step = max(1, len(days) // 10)
    ax.set_xticks(range(0, len(days), step), [d[5:] for d in days[::step]], rotation=30, ha="right", fontsize=7)


def monitor_over_time(days: Sequence[str], tasks: dict[str, dict[str, Sequence[int]]],
                      target: float | None = None) -> str:
    """Per task and UTC day: left, the served share (requests a specialist answered / routed requests);
    right, the live agreement (agreeing shadow pairs / shadow pairs of that day), the target dashed.
    A day without requests (or pairs) leaves a gap."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.6), dpi=110)
    colors = [_GREEN, _BLUE, _ORANGE, _RED, _GREY, "#8172B3", "#937860", "#DA8BC3"]
    x = list(range(len(days)))
    nan = float("nan")
    for n, (name, s) in enumerate(tasks.items()):
        color = colors[n % len(colors)]
        share = [sv / r if r else nan for sv, r in zip(s["served"], s["requests"])]
        agree = [a / p if p else nan for a, p in zip(s["agreeing"], s["pairs"])]
        if any(r for r in s["requests"]):
            ax1.plot(x, share, marker="o", color=color, label=str(name)[:28])
        if any(p for p in s["pairs"]):
            ax2.plot(x, agree, marker="o", color=color, label=str(name)[:28])
    if target is not None:
        ax2.axhline(float(target), color=_RED, linestyle="--", linewidth=1, label=f"target {target:g}")
    for ax, title in ((ax1, "Served share per day"), (ax2, "Live agreement per day (shadow pairs)")):
        _day_ticks(ax, days)
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlim(-0.5, max(0.5, len(days) - 0.5))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower left")
    ax1.set_ylabel("share of the task's requests")
    ax2.set_ylabel("agreement with the teacher")
    return _png(fig)


def escalations_over_time(days: Sequence[str], by_reason: dict[str, Sequence[int]]) -> str:
    """Escalations (rejected specialist answers) per UTC day, stacked by reason kind."""
    import numpy as np

    fig, ax = _figure()
    colors = [_ORANGE, _RED, _BLUE, _GREY, _GREEN, "#8172B3", "#937860", "#DA8BC3"]
    x = np.arange(len(days))
    bottom = np.zeros(len(days))
    for n, (reason, counts) in enumerate(by_reason.items()):
        values = np.asarray(counts, dtype=float)
        ax.bar(x, values, 0.7, bottom=bottom, label=str(reason), color=colors[n % len(colors)])
        bottom += values
    _day_ticks(ax, days)
    ax.set_ylabel("escalations")
    ax.set_title("Escalations to the teacher per day, by reason", fontsize=10)
    if by_reason:
        ax.legend(fontsize=7)
    return _png(fig)

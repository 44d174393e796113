"""Which confidence signal tells a LoRA specialist's right answers from its wrong ones?

The risk-coverage gate serves only the calls whose confidence clears a threshold, so the signal must
rank right answers above wrong ones. For every LoRA specialist trained in a workspace (``aad
distill`` done), this script answers the task's calls the specialist never trained on — its
cluster's held-out calls plus the training-split calls the selector left out — greedily, and
scores each answer against the teacher with the evaluator ``aad eval`` chose for the cluster. From
the same forward pass it computes four candidate signals per answer:

* ``mean_logprob``: mean log-prob of the generated tokens (what the gate uses today);
* ``min_logprob``: the lowest generated token's log-prob (one unsure token is enough to be wrong);
* ``min_margin``: the smallest gap between the best and second-best token's log-prob over the answer;
* ``first_margin``: that gap at the first answer token.

Per signal it prints the AUROC of agreement (0.5 = no better than chance) and the largest share of
calls served, highest confidence first, whose agreement stays >= the target (0.95, empirical, no
bound), then one line:

    confidence signals: best min_logprob (AUROC 0.91, serves 0.64 at 0.95) vs mean_logprob (AUROC 0.85, serves 0.52)

    .venv/bin/python benchmarks/confidence_signals.py --workspace demo-workspace [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")

SIGNALS = ("mean_logprob", "min_logprob", "min_margin", "first_margin")


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """Probability that a random right answer scores above a random wrong one (ties count half)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def coverage_at(scores: Sequence[float], agree: Sequence[float], target: float) -> float:
    """Largest share served, highest score first (ties together), whose agreement >= ``target``."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    best, ok, i = 0.0, 0.0, 0
    while i < len(order):
        j = i
        while j < len(order) and scores[order[j]] == scores[order[i]]:
            ok += agree[order[j]]
            j += 1
        if ok / j >= target - 1e-12:
            best = j / len(order)
        i = j
    return best


def answer_with_signals(model: Any, tok: Any, requests: Sequence[Any], max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy answers, one request at a time, with every candidate signal."""
    import torch

    from aad_core.models.chat_format import prompt_text

    out = []
    for request in requests:
        enc = tok([prompt_text(tok, request)], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, output_logits=True, return_dict_in_generate=True)
        new = gen.sequences[0, enc["input_ids"].shape[1]:].tolist()
        n = next((j for j, t in enumerate(new) if t == tok.eos_token_id), len(new))
        steps = [torch.log_softmax(s[0].float(), dim=-1) for s in gen.logits[: max(n, 1)]]
        chosen = [float(lp[t]) for lp, t in zip(steps, new[: max(n, 1)])]
        margins = []
        for lp in steps:
            top2 = torch.topk(lp, 2).values
            margins.append(float(top2[0] - top2[1]))
        out.append({"text": tok.decode(new[:n], skip_special_tokens=True).strip(),
                    "mean_logprob": sum(chosen) / len(chosen), "min_logprob": min(chosen),
                    "min_margin": min(margins), "first_margin": margins[0]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", required=True, type=Path)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--max-calls", type=int, default=120, help="Calls per specialist (held-out first).")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from peft import PeftModel

    from aad_core.artifacts import ClusterState, Selection
    from aad_core.formats.answers import answer_string
    from aad_core.models.quiet import quiet_loading
    from aad_core.models.students import load_student
    from aad_core.pipeline.evaluate.choose import evaluator_name_for
    from aad_core.pipeline.evaluate.runner import _context, _make_evaluator
    from aad_core.specialists import SpecialistRegistry
    from aad_core.workspace import Workspace

    ws = Workspace.find(args.workspace)
    state = ClusterState.load(ws)
    selection = Selection.load(ws)
    registry = SpecialistRegistry(ws)
    results: dict[str, Any] = {}
    pooled: dict[str, list[float]] = {s: [] for s in SIGNALS}
    pooled_agree: list[float] = []
    for cluster in state.clusters:
        spec = registry.latest(cluster.id)
        if spec is None or spec.kind != "lora":
            continue
        picked = set(selection.clusters[cluster.id].selected) if cluster.id in selection.clusters else set()
        train_ids = [t for t, c in state.assignments.items() if c == cluster.id and state.split.get(t) == "train"]
        ids = list(state.heldout_ids(cluster.id)) + [t for t in train_ids if t not in picked]
        with ws.store() as store:
            traces = [t for t in store.iter_traces(ids=ids[: args.max_calls]) if t.response is not None]
        with quiet_loading():
            model, tok = load_student(spec.base_model, device="cpu")
            model = PeftModel.from_pretrained(model, str(spec.path)).eval()
        answers = answer_with_signals(model, tok, [t.request for t in traces], ws.config.eval.max_new_tokens)
        name, _ = evaluator_name_for(ws.config, cluster, traces)
        metrics = _make_evaluator(name, ws).evaluate([a["text"] for a in answers], [answer_string(t) for t in traces],
                                                     **_context(ws, name, traces))
        agree = [float(x) for x in metrics["per_item"]]
        row: dict[str, Any] = {"calls": len(traces), "agreement": sum(agree) / len(agree), "evaluator": name}
        for s in SIGNALS:
            values = [a[s] for a in answers]
            row[s] = {"auroc": auroc(values, [x >= 1.0 for x in agree]),
                      "coverage_at_target": coverage_at(values, agree, args.target)}
            pooled[s].extend(values)
        pooled_agree.extend(agree)
        results[spec.name] = row
        print(f"{spec.name} ({cluster.label}, {name}): {len(traces)} calls, agreement {row['agreement']:.3f}")
        for s in SIGNALS:
            a = row[s]["auroc"]
            print(f"  {s:13s} AUROC {'n/a' if a is None else format(a, '.3f')}, serves "
                  f"{row[s]['coverage_at_target']:.2f} at agreement >= {args.target:.2f}")
    if not results:
        print("No LoRA specialist in this workspace: run aad distill first.", file=sys.stderr)
        return 1
    # Pooled over specialists: each signal is ranked per specialist in practice; pooled figures show which
    # signal orders right above wrong across tasks too.
    summary = {s: {"auroc": auroc(pooled[s], [x >= 1.0 for x in pooled_agree]),
                   "coverage_at_target": coverage_at(pooled[s], pooled_agree, args.target)} for s in SIGNALS}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"specialists": results, "pooled": summary, "target": args.target}, indent=2))
    best = max(SIGNALS, key=lambda s: (summary[s]["auroc"] or 0.0, summary[s]["coverage_at_target"]))
    fmt = lambda s: (f"AUROC {summary[s]['auroc']:.2f}" if summary[s]["auroc"] is not None else "AUROC n/a") + \
        f", serves {summary[s]['coverage_at_target']:.2f}"  # noqa: E731
    print(f"confidence signals: best {best} ({fmt(best)} at {args.target:.2f}) vs mean_logprob ({fmt('mean_logprob')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

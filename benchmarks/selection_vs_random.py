"""The seed paper's selection experiment (its Fig. 2) on real data: held-out accuracy vs the number
of training samples, for KL+uncertainty selection and for random selection, with the same seeds.

Data: banking77 (PolyAI, CC-BY-4.0) from aad_core/demo/data/banking77: customer messages -> intent
label, recorded as teacher traces (system prompt listing the intents + message -> label). A pool of
training traces is scored once with the ``kl-uncertainty`` scorer (the student SmolLM2-135M);
for each budget (a fraction of the pool) the ``top`` selector and the ``random`` selector pick
that many samples, a fresh LoRA adapter is trained on each pick with the ``qlora`` trainer
(same seed, same epochs), and every adapter is scored on the same held-out test messages with the
``classification`` evaluator. The budget of 100 % is the whole pool for both.

Prints both curves and the ratio of samples random selection needs to match the accuracy
KL+uncertainty reaches at 30 % (linear interpolation between measured budgets; a lower bound
"> x" when random never gets there). Writes benchmarks/out/selection_vs_random.json and, with
``--workspace``, ``.aad/state/selection_curve.json`` for the report.

    .venv/bin/python benchmarks/selection_vs_random.py                 # ~15 min on 2 CPU cores
    .venv/bin/python benchmarks/selection_vs_random.py --workspace demo-workspace
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "aad_core" / "demo" / "data" / "banking77"  # the copy that ships with aad


def load_rows(folder: Path, split: str) -> list[tuple[str, str]]:
    with (folder / f"{split}.csv").open(encoding="utf-8") as f:
        return [(r["text"], r["category"]) for r in csv.DictReader(f)]


def make_traces(rows, intents, tag):
    from aad_core.demo.workload import SYSTEM
    from aad_core.schema import ChatRequest, Message, Trace

    system = SYSTEM["intent"].format(labels=", ".join(intents))
    return [
        Trace(id=f"{tag}-{i}", source="benchmark", task="intent",
              request=ChatRequest(messages=[Message(role="system", content=system), Message(role="user", content=text)]),
              response=Message(role="assistant", content=label))
        for i, (text, label) in enumerate(rows)
    ]


def balanced_sample(rows, intents, per_intent, rng):
    by = defaultdict(list)
    for text, label in rows:
        if label in intents:
            by[label].append((text, label))
    out = []
    for label in intents:
        out += rng.sample(by[label], min(per_intent, len(by[label])))
    rng.shuffle(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="banking77 folder (train.csv, test.csv)")
    ap.add_argument("--intents", type=int, default=8, help="number of intents (the demo's first N)")
    ap.add_argument("--pool", type=int, default=200, help="training pool size (balanced over intents)")
    ap.add_argument("--test", type=int, default=80, help="held-out test messages (balanced)")
    ap.add_argument("--budgets", default="0.1,0.3,0.6,1.0", help="fractions of the pool")
    ap.add_argument("--epochs", type=float, default=2.0, help="epochs over each selected set")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--student", default="smollm2-135m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workspace", type=Path, help="also write .aad/state/selection_curve.json here")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "selection_vs_random.json")
    args = ap.parse_args(argv)

    from aad_core.demo.workload import INTENTS
    from aad_core.pipeline.evaluate.curves import sample_ratio, samples_to_reach
    from aad_core.models.runtime import SpecialistRuntime
    from aad_core.plugins import create_component

    if not (args.data / "train.csv").exists():
        print(f"error: banking77 not found at {args.data} (pass --data)", file=sys.stderr)
        return 2
    fractions = [float(x) for x in args.budgets.split(",")]
    if 0.3 not in fractions:
        print("error: --budgets must include 0.3 (the ratio is taken at 30 %)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    intents = list(INTENTS[: args.intents])
    rng = random.Random(args.seed)
    pool = make_traces(balanced_sample(load_rows(args.data, "train"), intents, args.pool // len(intents), rng), intents, "pool")
    test = make_traces(balanced_sample(load_rows(args.data, "test"), intents, args.test // len(intents), rng), intents, "test")
    print(f"banking77 (CC-BY-4.0): {len(intents)} intents, pool {len(pool)}, held-out test {len(test)}; student {args.student}")

    scorer = create_component("scorer", "kl-uncertainty", student=args.student, batch_size=8, max_length=args.max_length)
    scores = [s["score"] for s in scorer.score(pool, show_progress=True)]
    del scorer
    print(f"scored the pool in {time.perf_counter() - t0:.0f} s")
    ids = [t.id for t in pool]
    by_id = {t.id: t for t in pool}
    top, rnd = create_component("selector", "top"), create_component("selector", "random")

    runtime = SpecialistRuntime(args.student)
    evaluator = create_component("evaluator", "classification")
    refs = [t.answer_text() for t in test]
    requests = [t.request for t in test]

    def accuracy(adapter: str | None) -> float:
        gens = runtime.generate(requests, adapter=adapter, max_new_tokens=12)
        return float(evaluator.evaluate([g.text for g in gens], refs)["score"])

    base_acc = accuracy(None)
    print(f"base student accuracy: {base_acc:.3f}")
    work = Path(tempfile.mkdtemp(prefix="aad-selection-"))
    budgets, curves = [], {"kl_uncertainty": [], "random": []}
    trained: dict[tuple[str, ...], float] = {}
    label_counts = {}
    for frac in fractions:
        picks = {m: tuple(sorted(sel.select(ids, scores, frac, seed=args.seed))) for m, sel in (("kl_uncertainty", top), ("random", rnd))}
        n = len(picks["kl_uncertainty"])
        budgets.append(n)
        for method in ("kl_uncertainty", "random"):
            picked = picks[method]
            if picked not in trained:  # at 100 % both picks are the whole pool: train once
                out = work / f"{method}-{n}"
                trainer = create_component(
                    "trainer", "qlora", student=args.student, batch_size=8, gradient_accumulation=1,
                    epochs=args.epochs, max_length=args.max_length, learning_rate=args.lr,
                    early_stopping_patience=0, seed=args.seed, quantization="none",
                )
                info = trainer.train([by_id[i] for i in picked], [], out, show_progress=False)
                runtime.add_adapter(f"{method}-{n}", out)
                trained[picked] = accuracy(f"{method}-{n}")
                print(f"  {method:15s} n={n:4d}: {info['steps']} steps in {info['wall_s']:.0f} s, "
                      f"loss {info['train_loss_first']:.2f} -> {info['train_loss_last']:.2f}, accuracy {trained[picked]:.3f}")
            curves[method].append(trained[picked])
            label_counts[f"{method}-{n}"] = dict(sorted(Counter(by_id[i].answer_text() for i in picked).items()))

    at = budgets[fractions.index(0.3)]
    ratio = sample_ratio(budgets, curves["kl_uncertainty"], curves["random"], at)
    target = curves["kl_uncertainty"][fractions.index(0.3)]
    print("\nheld-out accuracy by training samples (same seed, same epochs):")
    print(f"  {'samples':>8} {'KL+uncert.':>11} {'random':>8}")
    for b, a, r in zip(budgets, curves["kl_uncertainty"], curves["random"]):
        print(f"  {b:>8} {a:>11.3f} {r:>8.3f}")
    if ratio is not None:
        ratio_text = f"{ratio:.2f}x"
        print(f"random needs {samples_to_reach(budgets, curves['random'], target):.0f} samples to reach the "
              f"{target:.3f} KL+uncertainty reaches with {at} (30 %): ratio {ratio_text} (paper: ~4x)")
    else:
        ratio_text = f"> {budgets[-1] / at:.2f}x"
        print(f"random never reaches {target:.3f} within {budgets[-1]} samples: ratio {ratio_text} (paper: ~4x)")
    result = {
        "dataset": f"banking77 (PolyAI, CC-BY-4.0): {len(intents)} intents, pool {len(pool)}, test {len(test)}",
        "budgets": budgets, "fractions": fractions, "kl_uncertainty": curves["kl_uncertainty"], "random": curves["random"],
        "base_accuracy": base_acc, "selected_labels": label_counts, "ratio": ratio, "ratio_text": ratio_text, "ratio_at": at, "seed": args.seed,
        "epochs": args.epochs, "student": args.student, "wall_s": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if args.workspace:
        from aad_core.artifacts import SelectionCurve
        from aad_core.workspace import Workspace

        path = SelectionCurve.from_json(result).save(Workspace.find(args.workspace))
        print(f"wrote {path}")
    print(f"total {result['wall_s']:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

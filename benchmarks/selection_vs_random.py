"""The seed paper's selection experiment (its Fig. 2) on real data: held-out accuracy vs the number
of training samples, for every selector (``top``, ``diverse``, ``random``, ``stratified``) with the
same seeds.

Data: banking77 (PolyAI, CC-BY-4.0) from aad_core/demo/data/banking77: customer messages -> intent
label, recorded as teacher traces (system prompt listing the intents + message -> label). A pool of
training traces is scored once with the ``kl-uncertainty`` scorer (the student SmolLM2-135M) and
embedded once (query + answer, as ``aad select`` does); for each budget (a fraction of the pool)
each selector picks that many samples (given the embeddings and the teacher answers when it asks
for them, as ``aad select`` gives them), a fresh LoRA adapter is trained on each pick with the
``qlora`` trainer (same seed, same epochs, no step minimum, so every budget keeps the same recipe),
and every adapter is scored on the same held-out test messages with the ``classification``
evaluator. The budget of 100 % is the whole pool for every selector (trained once); a pick that
equals another selector's at the same budget is trained once too.

Prints every selector's curve (budget -> held-out accuracy) and, per selector, the **sample
ratio at 30 %**: the number of samples random selection needs to reach the accuracy the selector
reaches with 30 % of the pool, divided by that 30 % budget (random's curve linearly interpolated
between measured budgets). 1.0x = as good as random; 2x = the selector saves half the samples; the
seed paper reports ~4x, and ``top`` measured 0.33x here (with ``--pool 200 --budgets
0.1,0.3,0.6,1.0``, the defaults before every selector ran). Two bounds are marked: "> x"
when random never gets there within the pool (x = pool / 30 % budget), and "<= x" when random's
smallest budget already gets there (x = smallest budget / 30 % budget). The last line judges the
default selector (``[select] selector``, or ``--default``)::

    selection: default selector >= random at every budget: yes (ratio 1.8x at 30 %)

"yes" when its accuracy is >= random's at every measured budget. Writes
benchmarks/out/selection_vs_random.json and, with ``--workspace``, ``.aad/state/selection_curve.json``
for the report (``kl_uncertainty`` there is the default selector's curve; ``curves`` holds all).

Defaults: 8 intents, a pool of 160 (20 per intent), 80 test messages, budgets 10 / 20 / 30 / 100 %,
2 epochs per set: 13 adapters trained and scored. ``--quick``: pool 96, 48 test messages, budgets
10 / 30 / 100 %, 1 epoch (checks that the script runs; its accuracies are not a measurement).

    .venv/bin/python benchmarks/selection_vs_random.py                 # ~15-20 min on 2 quiet CPU cores
    .venv/bin/python benchmarks/selection_vs_random.py --quick         # a smaller check
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
SELECTORS = ("top", "diverse", "random", "stratified")
#: --quick: a smaller pool and test set, three budgets, one epoch (a check that the script runs and a
#: rough curve, not the measurement).
QUICK = {"pool": 96, "test": 48, "budgets": "0.1,0.3,1.0", "epochs": 1.0}


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


def build_selector(spec: str):
    """A selector from ``NAME`` or ``NAME:KEY=VALUE`` (one parameter, its value read as JSON)."""
    from aad_core.plugins import create_component

    name, _, param = spec.partition(":")
    params = {}
    if param:
        key, _, value = param.partition("=")
        params[key] = json.loads(value)
    return create_component("selector", name, **params)


def ratio_text(budgets: list[int], selected: list[float], rnd: list[float], at: int) -> tuple[float | None, str]:
    """The sample ratio at budget ``at`` and how to print it (see the module docstring)."""
    from aad_core.pipeline.evaluate.curves import sample_ratio

    ratio = sample_ratio(budgets, selected, rnd, at)
    if ratio is None:
        return None, f"> {budgets[-1] / at:.2f}x"
    if ratio <= min(budgets) / at + 1e-9 and rnd[budgets.index(min(budgets))] > selected[budgets.index(at)]:
        return ratio, f"<= {ratio:.2f}x"
    return ratio, f"{ratio:.2f}x"


def main(argv: list[str] | None = None) -> int:
    from aad_core.config import SelectConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="banking77 folder (train.csv, test.csv)")
    ap.add_argument("--intents", type=int, default=8, help="number of intents (the demo's first N)")
    ap.add_argument("--pool", type=int, default=None, help="training pool size (balanced over intents; default 160)")
    ap.add_argument("--test", type=int, default=None, help="held-out test messages (balanced; default 80)")
    ap.add_argument("--budgets", default=None, help="fractions of the pool (default 0.1,0.2,0.3,1.0)")
    ap.add_argument("--epochs", type=float, default=None, help="epochs over each selected set (default 2)")
    ap.add_argument("--selectors", default=",".join(SELECTORS),
                    help="selectors to compare (random is always run); NAME:KEY=VALUE sets one parameter, "
                         "e.g. stratified:score_weight=0.2")
    ap.add_argument("--default", default=SelectConfig().selector,
                    help="the selector the last line judges (default: [select] selector's default)")
    ap.add_argument("--quick", action="store_true",
                    help=f"a smaller run for checks: {', '.join(f'{k} {v}' for k, v in QUICK.items())}")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--student", default="smollm2-135m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"],
                    help="training precision (the recorded figures: fp32)")
    ap.add_argument("--workspace", type=Path, help="also write .aad/state/selection_curve.json here")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "selection_vs_random.json")
    args = ap.parse_args(argv)
    full = {"pool": 160, "test": 80, "budgets": "0.1,0.2,0.3,1.0", "epochs": 2.0}
    for key, value in (QUICK if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    from aad_core.config import EmbedConfig
    from aad_core.demo.workload import INTENTS
    from aad_core.formats.answers import answer_string
    from aad_core.models.embedding import embed_texts, embedder_named
    from aad_core.models.runtime import SpecialistRuntime
    from aad_core.plugins import create_component

    if not (args.data / "train.csv").exists():
        print(f"error: banking77 not found at {args.data} (pass --data)", file=sys.stderr)
        return 2
    fractions = [float(x) for x in args.budgets.split(",")]
    if 0.3 not in fractions:
        print("error: --budgets must include 0.3 (the ratio is taken at 30 %)", file=sys.stderr)
        return 2
    names = list(dict.fromkeys([*(n.strip() for n in args.selectors.split(",") if n.strip()), "random", args.default]))
    t0 = time.perf_counter()
    intents = list(INTENTS[: args.intents])
    rng = random.Random(args.seed)
    pool = make_traces(balanced_sample(load_rows(args.data, "train"), intents, args.pool // len(intents), rng), intents, "pool")
    test = make_traces(balanced_sample(load_rows(args.data, "test"), intents, args.test // len(intents), rng), intents, "test")
    print(f"banking77 (CC-BY-4.0): {len(intents)} intents, pool {len(pool)}, held-out test {len(test)}; "
          f"student {args.student}; {args.epochs:g} epochs per set; selectors {', '.join(names)}")

    scorer = create_component("scorer", "kl-uncertainty", student=args.student, batch_size=8, max_length=args.max_length)
    scores = [s["score"] for s in scorer.score(pool, show_progress=False)]
    del scorer
    # what `aad select` gives a selector that asks: query + answer vectors, the teacher's answers
    embeddings = embed_texts([f"{t.request.last_user_message()}\n{t.answer_text()}" for t in pool],
                             embedder_named(EmbedConfig().embedder))
    answers = [answer_string(t) for t in pool]
    print(f"scored and embedded the pool in {time.perf_counter() - t0:.0f} s")
    ids = [t.id for t in pool]
    by_id = {t.id: t for t in pool}
    selectors = {n: build_selector(n) for n in names}

    def pick(name: str, frac: float) -> tuple[str, ...]:
        sel = selectors[name]
        extra = {"answers": answers} if getattr(sel, "needs_answers", False) else {}
        emb = embeddings if getattr(sel, "needs_embeddings", False) else None
        return tuple(sorted(sel.select(ids, scores, frac, embeddings=emb, seed=args.seed, **extra)))

    runtime = SpecialistRuntime(args.student, batch_size=16)
    evaluator = create_component("evaluator", "classification")
    refs = [t.answer_text() for t in test]
    requests = [t.request for t in test]

    def accuracy(adapter: str | None) -> float:
        gens = runtime.generate(requests, adapter=adapter, max_new_tokens=12)
        return float(evaluator.evaluate([g.text for g in gens], refs)["score"])

    base_acc = accuracy(None)
    print(f"base student accuracy: {base_acc:.3f}")
    work = Path(tempfile.mkdtemp(prefix="aad-selection-"))
    budgets: list[int] = []
    curves: dict[str, list[float]] = {n: [] for n in names}
    trained: dict[tuple[str, ...], float] = {}
    label_counts: dict[str, dict[str, int]] = {}
    for frac in fractions:
        picks = {n: pick(n, frac) for n in names}
        n = len(picks[names[0]])
        budgets.append(n)
        for name in names:
            picked = picks[name]
            if picked not in trained:  # at 100 % every pick is the whole pool: train once
                tag = "".join(c if c.isalnum() else "_" for c in name) + f"-{n}"  # an adapter name: no '.' or ':'
                out = work / tag
                trainer = create_component(
                    "trainer", "qlora", student=args.student, batch_size=8, gradient_accumulation=1,
                    epochs=args.epochs, min_steps=1, max_length=args.max_length, learning_rate=args.lr,
                    early_stopping_patience=0, seed=args.seed, quantization="none", precision=args.precision,
                )
                info = trainer.train([by_id[i] for i in picked], [], out, show_progress=False)
                runtime.add_adapter(tag, out)
                started = time.perf_counter()
                trained[picked] = accuracy(tag)
                eval_s = time.perf_counter() - started
                labels = Counter(by_id[i].answer_text() for i in picked)
                print(f"  {name:11s} n={n:4d}: {info['steps']} steps in {info['wall_s']:.0f} s, loss "
                      f"{info['train_loss_first']:.2f} -> {info['train_loss_last']:.2f}, accuracy {trained[picked]:.3f} "
                      f"in {eval_s:.0f} s ({len(labels)} of {len(intents)} intents, {min(labels.values())}-{max(labels.values())} each)",
                      flush=True)
            curves[name].append(trained[picked])
            label_counts[f"{name}-{n}"] = dict(sorted(Counter(by_id[i].answer_text() for i in picked).items()))

    at = budgets[fractions.index(0.3)]
    ratios = {name: ratio_text(budgets, curves[name], curves["random"], at) for name in names}
    print("\nheld-out accuracy by training samples (same seed, same epochs; base student "
          f"{base_acc:.3f}):")
    width = max(11, *(len(n) for n in names))
    print(f"  {'samples':>8} {'budget':>7} " + " ".join(f"{n:>{width}}" for n in names))
    for i, (b, frac) in enumerate(zip(budgets, fractions)):
        print(f"  {b:>8} {frac:>7.0%} " + " ".join(f"{curves[n][i]:>{width}.3f}" for n in names))
    print(f"  {'ratio at 30 %':>16} " + " ".join(f"{ratios[n][1]:>{width}}" for n in names))
    for name in names:
        print(f"curve {name}: " + ", ".join(f"{b} ({f:.0%}) -> {a:.3f}" for b, f, a in zip(budgets, fractions, curves[name])))
    default = args.default
    ok = all(d >= r for d, r in zip(curves[default], curves["random"]))
    print(f"default selector: {default}")
    print(f"selection: default selector >= random at every budget: {'yes' if ok else 'no'} "
          f"(ratio {ratios[default][1]} at 30 %)")
    result = {
        "dataset": f"banking77 (PolyAI, CC-BY-4.0): {len(intents)} intents, pool {len(pool)}, test {len(test)}",
        "budgets": budgets, "fractions": fractions, "default_selector": default,
        "kl_uncertainty": curves[default], "random": curves["random"], "curves": curves,
        "base_accuracy": base_acc, "selected_labels": label_counts,
        "ratio": ratios[default][0], "ratio_text": ratios[default][1], "ratio_at": at,
        "ratios": {n: {"ratio": r, "text": t} for n, (r, t) in ratios.items()},
        "default_beats_random_every_budget": ok, "seed": args.seed, "epochs": args.epochs,
        "quick": args.quick, "student": args.student, "wall_s": round(time.perf_counter() - t0, 1),
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

"""LoRA training in bfloat16 autocast against float32 on CPU: the same adapter (``qlora`` trainer,
SmolLM2-135M, same seed, samples, order and steps) trained with ``precision = "fp32"`` and
``precision = "bf16"``, on two tasks of ``benchmarks/loop.py``'s part (d):

- ``banking77``: the demo's 8 Banking77 intents, 20 training queries each, 80 test queries, max_length
  96, 40 steps of 8;
- ``extract``: the demo's JSON extraction tickets, 96 training and 32 held-out, 24 steps of 8.

Each adapter answers the held-out calls greedily, scored by the evaluator ``aad eval`` picks (labels:
accuracy; JSON: canonical equality). The headline::

    train precision: bf16 1.28x the training tokens/s of fp32; held-out banking77 0.838 vs 0.800, extract 1.000 vs 1.000

Run on a quiet machine (the two precisions run one after the other, in one process)::

    python benchmarks/train_precision.py [--tasks banking77,extract] [--seed 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loop import CURRICULUM_TASKS, held_out_task, log  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def run_task(task: str, work: Path, seed: int, student: str = "smollm2-135m") -> dict[str, Any]:
    from aad_core.models.runtime import SpecialistRuntime
    from aad_core.plugins import create_component

    held = held_out_task(task, seed, student=student)
    r, name, train, test, requests, refs = held.recipe, held.name, held.train, held.test, held.requests, held.refs
    r = {k: v for k, v in r.items() if k != "precision"}  # both precisions run here
    evaluator_name, evaluator = held.evaluator_name, held.evaluator
    runtime = SpecialistRuntime(student, batch_size=16)
    log(f"{name}: {len(train)} training and {len(test)} held-out calls, max_length {r['max_length']}, "
        f"{r['steps']} steps of {r['batch_size']}, evaluator {evaluator_name}")
    out: dict[str, Any] = {"task": name, "recipe": r, "evaluator": evaluator_name}
    for precision in PRECISIONS:
        trainer = create_component(
            "trainer", "qlora", student=student, batch_size=r["batch_size"], gradient_accumulation=1,
            max_steps=r["steps"], max_length=r["max_length"], early_stopping_patience=0, seed=seed,
            quantization="none", precision=precision)
        started = time.perf_counter()
        info = trainer.train(train, [], work / f"{task}-{precision}", show_progress=False)
        wall = time.perf_counter() - started
        runtime.add_adapter(f"{task}-{precision}", work / f"{task}-{precision}")
        gens = runtime.generate(requests, adapter=f"{task}-{precision}", max_new_tokens=r["max_new_tokens"])
        answers = [g.text for g in gens]
        score = float(evaluator.evaluate(answers, refs)["score"])
        out[precision] = {"score": score, "loop_s": info["wall_s"], "train_s": round(wall, 1),
                          "tokens_per_s": info["tokens_per_s"], "loss_first": info["train_loss_first"],
                          "loss_last": info["train_loss_last"], "precision": info["precision"], "answers": answers}
        log(f"  {precision}: {info['steps']} steps in {info['wall_s']:.0f} s ({info['tokens_per_s']:.0f} tokens/s), "
            f"loss {info['train_loss_first']:.3f} -> {info['train_loss_last']:.3f}, held-out {score:.3f}")
    out["same_answers"] = sum(a == b for a, b in zip(out["fp32"]["answers"], out["bf16"]["answers"]))
    out["n_test"] = len(test)
    log(f"  the same answer on {out['same_answers']} of {len(test)} held-out calls")
    return out


def headline(results: dict[str, dict[str, Any]]) -> str:
    tokens = {p: sum(r[p]["tokens_per_s"] * r[p]["loop_s"] for r in results.values()) for p in PRECISIONS}
    seconds = {p: sum(r[p]["loop_s"] for r in results.values()) for p in PRECISIONS}
    speed = (tokens["bf16"] / seconds["bf16"]) / (tokens["fp32"] / seconds["fp32"])
    scores = ", ".join(f"{task} {r['bf16']['score']:.3f} vs {r['fp32']['score']:.3f}" for task, r in results.items())
    return f"train precision: bf16 {speed:.2f}x the training tokens/s of fp32; held-out {scores}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="banking77,extract", help="comma-separated: banking77, extract")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write every figure (and answer) here")
    args = parser.parse_args(argv)
    from aad_plugins.qlora.trainer import cpu_has_native_bf16

    log(f"CPU bfloat16 instructions: {'yes' if cpu_has_native_bf16() else 'no (bf16 is emulated: expect it slower)'}")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="aad-precision-") as tmp:
        for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
            if task not in CURRICULUM_TASKS:
                parser.error(f"unknown task {task!r}: expected one of {', '.join(sorted(CURRICULUM_TASKS))}")
            results[task] = run_task(task, Path(tmp), args.seed)
    line = headline(results)
    print(line)
    if args.json:
        args.json.write_text(json.dumps({"headline": line, "results": results}, indent=1), encoding="utf-8")
    return {"headline": line, "results": results}


if __name__ == "__main__":
    main()

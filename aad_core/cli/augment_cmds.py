"""``aad augment`` (teacher-generated paraphrases as training data) and ``aad prompt-search`` (the prompt
the teacher answers a task's requests best with); see :mod:`aad_core.pipeline.augment`."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from aad_core.cli.app import JsonOption, WorkspaceOption, console, err_console, open_workspace, print_json

TaskArgument = Annotated[str, typer.Argument(help="The task: a cluster id as 'aad cluster' shows it, or its task tag "
                                             "or label.")]
SeedOption = Annotated[int | None, typer.Option("--seed", help="Seed of the sample (default: the workspace's seed).")]


def augment_cmd(
    task: TaskArgument,
    n: Annotated[int, typer.Option("--n", min=1, help="Training calls paraphrased (a seeded sample; all when "
                                   "fewer). Held-out calls are never paraphrased.")] = 50,
    paraphrases: Annotated[int, typer.Option("--paraphrases", min=1, help="Paraphrases asked for per call.")] = 3,
    check: Annotated[str, typer.Option("--check", help="Keep a paraphrase when the teacher's answer to it agrees "
                                       "with: 'recorded' = the call's recorded answer; 'second-sample' = a second "
                                       "teacher answer to the same paraphrase.")] = "recorded",
    saved_prompt: Annotated[bool, typer.Option("--saved-prompt/--recorded-prompt", help="Ask with the best prompt "
                                               "variant 'aad prompt-search TASK' saved, when there is one "
                                               "(default), or the recorded request as is.")] = True,
    seed: SeedOption = None,
    json_out: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Ask the teacher (\\[teacher]) for paraphrases of a task's training requests, have it answer them, and
    store those whose answer agrees as traces with source 'augmented' (redacted as 'aad ingest' redacts).
    A summary goes to stderr; run 'aad cluster' again for them to join the task's training split."""
    from aad_core.pipeline.augment import CHECKS, run_augment

    if check not in CHECKS:
        raise typer.BadParameter(f"must be one of {', '.join(CHECKS)}. Got {check!r} instead.", param_hint="--check")
    ws = open_workspace(workspace)
    result = run_augment(ws, task, n=n, paraphrases=paraphrases, check=check, seed=seed,  # type: ignore[arg-type]
                         use_saved_prompt=saved_prompt)
    if json_out:
        print_json(result.to_json())
        return
    against = "the recorded answers" if check == "recorded" else "a second teacher answer"
    table = Table(title=f"aad augment: task {result.cluster_id} ({escape(result.task)})", title_justify="left")
    table.add_column("step")
    table.add_column("count", justify="right")
    skipped = sum(result.skipped.values())
    rows = [("training calls sampled", result.sampled),
            *([("  not paraphrasable (" + "; ".join(result.skipped) + ")", skipped)] if skipped else []),
            ("paraphrases asked for", result.asked),
            ("paraphrases received", result.paraphrases),
            ("answered by the teacher", result.answered),
            (f"agreed with {against} ({result.evaluator})", result.agreed),
            ("stored as new traces", result.stored)]
    if result.already_stored:
        rows.append(("already stored (earlier run)", result.already_stored))
    if result.paraphrase_calls_failed or result.failed:
        rows.append(("failed teacher calls", result.paraphrase_calls_failed + result.failed))
    for step, count in rows:
        table.add_row(escape(step), str(count))
    err_console.print(table)
    err_console.print(f"prompt: {escape(result.prompt)} ({escape(result.prompt_source)})", highlight=False)
    if result.stored:
        err_console.print("Run 'aad cluster' (or 'aad distill') for them to join the task's training split.",
                          highlight=False)


def prompt_search_cmd(
    task: TaskArgument,
    n: Annotated[int, typer.Option("--n", min=1, help="Training calls each variant is scored on (a seeded sample).")
                 ] = 20,
    shots: Annotated[int, typer.Option("--shots", min=0, help="Few-shot examples of the few-shot variants "
                                       "(training calls; 0 = no few-shot variants).")] = 3,
    seed: SeedOption = None,
    json_out: JsonOption = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Try prompt variants on a sample of a task's training requests (the recorded prompt; with an
    instruction to answer in the recorded format; with few-shot examples; both), score each by its
    teacher answers' agreement with the recorded ones, and save the best for 'aad augment'."""
    from aad_core.pipeline.augment import run_prompt_search

    ws = open_workspace(workspace)
    result = run_prompt_search(ws, task, n=n, shots=shots, seed=seed)
    choice = result.choice
    if json_out:
        print_json({"cluster_id": result.cluster_id, "evaluator": result.evaluator, "path": str(result.path),
                    **choice.to_json()})
        return
    table = Table(title=f"Prompt search: task {result.cluster_id}, {choice.n} training calls, seed {choice.seed} "
                  f"({escape(result.evaluator)})", title_justify="left")
    for col, just in (("variant", "left"), ("agreed", "right"), ("answered", "right"), ("failed", "right"),
                      ("agreement", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for s in choice.scores:
        best = s["name"] == choice.best.name
        table.add_row(("[bold]" if best else "") + escape(s["name"]) + (" (best)[/]" if best else ""),
                      str(s["agreed"]), str(s["answered"]), str(s["failed"]), f"{100 * s['agreement']:.1f} %")
    console.print(table)
    console.print(f"saved: {result.path} ('aad augment {task}' uses {choice.best.name!r})", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("augment")(augment_cmd)
    app.command("prompt-search")(prompt_search_cmd)

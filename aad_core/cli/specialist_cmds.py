"""Specialist commands: select, train, specialists, models list|pull."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from aad_core.cli.app import JsonOption, WorkspaceOption, console, open_workspace, print_json

specialists_app = typer.Typer(
    help="List the trained specialists (every version); promote, demote or roll back one.", invoke_without_command=True)
models_app = typer.Typer(help="Student models: list the known ones, prepare one for offline use.", no_args_is_help=True)


def select_cmd(
    fraction: Annotated[float | None, typer.Option("--fraction", help="Share of each routine cluster's training split to keep (default: \\[select] fraction).")] = None,
    selector: Annotated[str | None, typer.Option("--selector", help="top | random | diverse, or a plugin's selector (default: \\[select] selector).")] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Score each routine cluster's training traces (KL to the teacher + student uncertainty) and keep the top share."""
    from aad_core.artifacts import Selection
    from aad_core.pipeline.select import run_select

    ws = open_workspace(workspace)
    artifact = run_select(ws, fraction=fraction, selector=selector, show_progress=not as_json)
    rows = []
    for cid, entry in sorted(artifact["clusters"].items(), key=lambda kv: int(kv[0])):
        scores = entry["scores"]
        sel = entry["selected"]
        def mean(ids: list[str]) -> float | None:
            values = [scores[i]["score"] for i in ids if i in scores]
            return sum(values) / len(values) if values else None  # None: not scored (e.g. a classifier task)

        rows.append({"cluster": int(cid), "label": entry["label"], "train": entry["n_train"], "selected": len(sel),
                     "mean_score_selected": mean(sel), "mean_score_all": mean(list(scores))})
    if as_json:
        print_json({"fraction": artifact["fraction"], "selector": artifact["selector"], "clusters": rows})
        return
    table = Table(title=f"Selection ({artifact['selector']}, {artifact['fraction']:.0%} per cluster)")
    for col in ("cluster", "label", "train", "selected", "score (selected)", "score (all)"):
        table.add_column(col)
    for r in rows:
        shown = ["-" if r[k] is None else f"{r[k]:.3f}" for k in ("mean_score_selected", "mean_score_all")]
        table.add_row(str(r["cluster"]), r["label"], str(r["train"]), str(r["selected"]), *shown)
    console.print(table)
    console.print(f"Saved {Selection.path(ws)}. Next: [bold]aad train[/]")


def train_cmd(
    cluster: Annotated[int | None, typer.Option("--cluster", help="Train only this cluster id.")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Passes over the selection (default: \\[trainer.qlora] epochs).")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after N optimizer steps (overrides epochs).")] = None,
    answer_hints: Annotated[int | None, typer.Option(
        "--answer-hints", help="Labels of the N nearest training requests in each prompt, for clusters with a closed "
        "label set; 0 = off (default: \\[trainer.qlora] answer_hints).")] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train one specialist per routine cluster, of the first kind in \\[train] trainer that fits its task
    (default: a classifier for closed answer sets, else a LoRA adapter on the selected traces)."""
    from aad_core.pipeline.train import run_train

    ws = open_workspace(workspace)
    specs = run_train(ws, cluster_id=cluster, epochs=epochs, max_steps=max_steps, answer_hints=answer_hints,
                      show_progress=not as_json)
    if as_json:
        print_json([s.model_dump(mode="json") for s in specs])
        return
    for s in specs:
        m = s.metrics
        if s.kind != "lora":
            acc = m.get("eval_accuracy")
            console.print(f"[bold]{s.name}[/] v{s.version}: {s.kind} ({s.trainer}) on {m.get('n_train')} traces"
                          + (f", held-out accuracy {acc:.3f}" if isinstance(acc, float) else "") + f"  ({s.path})")
            continue
        console.print(
            f"[bold]{s.name}[/] v{s.version}: {m.get('steps')} steps, loss {m.get('train_loss_first')} -> "
            f"{m.get('train_loss_last')}, held-out loss {m.get('best_eval_loss')}, {m.get('tokens_per_s')} tok/s"
            + (f", answer hints: {m['answer_hints']}" if m.get("answer_hints") else "") + f"  ({s.path})"
        )
    console.print("Next: [bold]aad eval[/]")


@specialists_app.callback()
def specialists_cmd(ctx: typer.Context, workspace: WorkspaceOption = None, as_json: JsonOption = False) -> None:
    """List the trained specialists (every version) and whether they are promoted."""
    from aad_core.specialists import SpecialistRegistry

    if ctx.invoked_subcommand is not None:
        return

    specs = SpecialistRegistry(open_workspace(workspace)).list()
    if as_json:
        print_json([s.model_dump(mode="json") for s in specs])
        return
    table = Table(title="Specialists")
    for col in ("name", "version", "kind", "cluster", "base model", "promoted", "held-out", "path"):
        table.add_column(col)
    for s in specs:
        held_out = (f"loss {s.metrics['best_eval_loss']:.3f}" if isinstance(s.metrics.get("best_eval_loss"), float)
                    else f"accuracy {s.metrics['eval_accuracy']:.3f}" if isinstance(s.metrics.get("eval_accuracy"), float)
                    else "-")
        table.add_row(s.name, str(s.version), s.kind, str(s.cluster_id), s.base_model if s.kind == "lora" else "-",
                      "yes" if s.promoted else "no", held_out, s.path)
    console.print(table)
    registry = SpecialistRegistry(open_workspace(workspace))
    for s in specs:
        reason = str(registry.manifest(s).get("promotion_reason") or "") if not s.promoted else ""
        if reason.startswith("demoted by shadow"):
            console.print(f"[yellow]{s.name} v{s.version}[/]: {reason}. "
                          f"Undo: [bold]aad specialists promote {s.name} --version {s.version}[/]")


@specialists_app.command("promote")
def promote_cmd(
    name: Annotated[str, typer.Argument(help="The specialist's name (see 'aad specialists').")],
    version: Annotated[int | None, typer.Option("--version", help="The version (default: the newest).")] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Promote a specialist by hand (e.g. undo an automatic demotion): the router serves it again
    (restart 'aad serve', or the engine's reload(), to pick it up)."""
    from aad_core.pipeline.calibrate import refresh_served_gates
    from aad_core.specialists import SpecialistRegistry

    registry = SpecialistRegistry(open_workspace(workspace))
    spec = registry.get(name, version)
    spec = registry.set_promoted(spec.name, spec.version, True, "promoted by hand ('aad specialists promote')")
    refresh_served_gates(registry.ws)
    served = registry.promoted().get(spec.cluster_id)
    _say_promotion(spec, served, as_json)


@specialists_app.command("demote")
def demote_cmd(
    name: Annotated[str, typer.Argument(help="The specialist's name (see 'aad specialists').")],
    version: Annotated[int | None, typer.Option("--version", help="The version (default: the one served).")] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Demote a specialist by hand: its task goes back to an earlier promoted version, or to the teacher."""
    from aad_core.pipeline.calibrate import refresh_served_gates
    from aad_core.specialists import SpecialistRegistry

    registry = SpecialistRegistry(open_workspace(workspace))
    spec = registry.get(name, version)
    if version is None:
        promoted = [s for s in registry.list() if s.name == name and s.promoted]
        spec = promoted[-1] if promoted else spec
    spec = registry.set_promoted(spec.name, spec.version, False, "demoted by hand ('aad specialists demote')")
    refresh_served_gates(registry.ws)
    _say_promotion(spec, registry.promoted().get(spec.cluster_id), as_json)


@specialists_app.command("rollback")
def rollback_cmd(
    task: Annotated[str, typer.Argument(help="The task: its cluster id, label, task tag or specialist name.")],
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Return a task to its previous promoted version: the served version is demoted and the newest
    earlier version that is still promoted serves instead."""
    from aad_core.errors import AADError
    from aad_core.pipeline.calibrate import refresh_served_gates
    from aad_core.specialists import SpecialistRegistry

    registry = SpecialistRegistry(open_workspace(workspace))
    cluster_id = _task_cluster(registry, task)
    current = registry.promoted().get(cluster_id)
    if current is None:
        raise AADError(f"Task {task!r} (cluster {cluster_id}) has no promoted specialist to roll back.",
                       hint="'aad specialists' lists them; 'aad specialists promote NAME --version V' promotes one.")
    earlier = [s for s in registry.list() if s.cluster_id == cluster_id and s.promoted and s.path != current.path]
    if not earlier:
        raise AADError(f"Task {task!r} has no earlier promoted version than {current.name} v{current.version}.",
                       hint=f"'aad specialists demote {current.name}' sends the task to the teacher; "
                       "'aad specialists promote NAME --version V' promotes a given version.")
    spec = registry.set_promoted(current.name, current.version, False,
                                 "rolled back ('aad specialists rollback')")
    refresh_served_gates(registry.ws)
    _say_promotion(spec, registry.promoted().get(cluster_id), as_json)


def _task_cluster(registry, task: str) -> int:  # noqa: ANN001
    from aad_core.errors import AADError

    specs = registry.list()
    if task.lstrip("-").isdigit():
        return int(task)
    for s in specs:
        if task in (s.name, registry.manifest(s).get("label")):
            return int(s.cluster_id)
    from aad_core.artifacts import ClusterState

    state = ClusterState.load_optional(registry.ws)
    for c in state.clusters if state else []:
        if task in (c.task, c.label):
            return int(c.id)
    raise AADError(f"No task {task!r} among the specialists.",
                   hint="Give a cluster id, a task label or a specialist name ('aad specialists' lists them).")


def _say_promotion(spec, served, as_json: bool) -> None:  # noqa: ANN001
    if as_json:
        print_json({"specialist": spec.model_dump(mode="json"),
                    "served": served.model_dump(mode="json") if served is not None else None})
        return
    state = "promoted" if spec.promoted else "demoted"
    console.print(f"[bold]{spec.name}[/] v{spec.version}: {state}.")
    if served is None:
        console.print(f"Cluster {spec.cluster_id} now goes to the teacher.")
    elif served.path != spec.path:
        console.print(f"Cluster {spec.cluster_id} is served by {served.name} v{served.version}.")
    console.print("A running 'aad serve' picks this up when restarted (or on RoutingEngine.reload()).")


@models_app.command("list")
def models_list(as_json: JsonOption = False) -> None:
    """Known students and whether each is prepared in the local cache."""
    from aad_core.models.students import KNOWN_STUDENTS, is_materialised, student_cache_dir

    rows = [{"name": s.name, "description": s.description, "license": s.license,
             "prepared": is_materialised(s.name), "path": str(student_cache_dir(s.name))} for s in KNOWN_STUDENTS.values()]
    if as_json:
        print_json(rows)
        return
    table = Table(title="Known students (any Hugging Face causal LM path or hub id also works)")
    for col in ("name", "prepared", "description", "license", "cache"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], "yes" if r["prepared"] else "no", r["description"], r["license"], r["path"])
    console.print(table)


@models_app.command("pull")
def models_pull(
    name: Annotated[str, typer.Argument(help="A known student (see 'aad models list').")] = "smollm2-135m",
) -> None:
    """Prepare a known student for offline use (converted once into the local cache)."""
    from aad_core.errors import AADError
    from aad_core.models.students import KNOWN_STUDENTS, resolve_student

    if name not in KNOWN_STUDENTS:
        raise AADError(f"Unknown student {name!r}. Known: {', '.join(KNOWN_STUDENTS)}.",
                       hint="Other models need no pull: set [train] student to a local folder or hub id.")
    console.print(f"{name}: ready at {resolve_student(name, show_progress=True)}")


def register(app: typer.Typer) -> None:
    app.command("select")(select_cmd)
    app.command("train")(train_cmd)
    app.add_typer(specialists_app, name="specialists")
    app.add_typer(models_app, name="models")

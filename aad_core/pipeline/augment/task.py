"""A task of ``aad augment`` / ``aad prompt-search``: its cluster, the recorded training calls that may be
paraphrased or shown as examples (never a held-out call), and how agreement with an answer is judged."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aad_core.artifacts import ClusterState, EvalReport
from aad_core.errors import AADError
from aad_core.formats.answers import answer_string
from aad_core.schema import Cluster, Trace, augmented_from, is_specialist_answer

if TYPE_CHECKING:
    from aad_core.workspace import Workspace


@dataclass
class TaskCalls:
    """A task's cluster and its usable training calls (recorded, answered, on the training side)."""

    cluster: Cluster
    #: Recorded training-split calls with an answer, by id (no augmented trace, no held-out call).
    train: list[Trace]
    #: Ids of the task's held-out calls: never paraphrased, never an example.
    heldout_ids: set[str] = field(default_factory=set)

    def sample(self, n: int, seed: int) -> list[Trace]:
        """``n`` of the training calls (all when there are fewer), chosen with ``seed``."""
        if n >= len(self.train):
            return list(self.train)
        return sorted(random.Random(seed).sample(self.train, n), key=lambda t: t.id)


def resolve_cluster(state: ClusterState, task: str | int) -> Cluster:
    """The cluster ``task`` names: its id, else its task tag or label (as ``aad cluster`` shows them)."""
    key = str(task).strip()
    if key.lstrip("-").isdigit():
        for c in state.clusters:
            if c.id == int(key):
                return c
    matches = [c for c in state.clusters if key in (c.task, c.label)]
    if len(matches) == 1:
        return matches[0]
    known = ", ".join(f"{c.id} ({c.task or c.label})" for c in state.clusters) or "none"
    what = "several clusters" if matches else "no cluster"
    raise AADError(f"The task {task!r} names {what}: expected a cluster id, task tag or label. The clusters are: "
                   f"{known}.", hint="Give a cluster id as 'aad cluster' shows it (clusters.json).")


def load_task(ws: Workspace, task: str | int) -> TaskCalls:
    """The task ``task`` of ``ws`` and its usable training calls."""
    state = ClusterState.load(ws)
    cluster = resolve_cluster(state, task)
    heldout = set(state.heldout_ids(cluster.id))
    ids = [t for t in state.train_ids(cluster.id) if t not in heldout]
    with ws.store() as store:
        traces = list(store.iter_traces(ids=ids))
    usable = sorted((t for t in traces if t.status == "ok" and t.response is not None and augmented_from(t) is None
                     and not is_specialist_answer(t) and answer_string(t).strip()), key=lambda t: t.id)
    if not usable:
        raise AADError(f"Task {cluster.id} ({cluster.task or cluster.label}) has no recorded training call with an "
                       f"answer (expected at least 1, got 0 of {len(ids)} training-split ids).",
                       hint="Record or ingest more calls, then run 'aad cluster' again.")
    return TaskCalls(cluster=cluster, train=usable, heldout_ids=heldout)


class Agreement:
    """Whether a teacher answer agrees with a reference answer, by the task's evaluator: the one
    ``aad eval`` used for the cluster, else the one its answers call for (``[eval]`` overrides first)."""

    def __init__(self, ws: Workspace, calls: TaskCalls) -> None:
        from aad_core.pipeline.evaluate.choose import evaluator_name_for

        self.ws = ws
        report = EvalReport.load_optional(ws)
        used = [e.get("evaluator") for e in (report.clusters if report else [])
                if e.get("cluster_id") == calls.cluster.id and e.get("evaluator")]
        self.name = str(used[0]) if used else evaluator_name_for(ws.config, calls.cluster, calls.train)[0]
        self._evaluator: Any = None

    def agree(self, answers: Sequence[str], references: Sequence[str]) -> list[bool]:
        """Per pair, whether the evaluator scores it as agreeing (a per-item score of 1)."""
        if not answers:
            return []
        if self._evaluator is None:
            from aad_core.models.embedding import get_embedder
            from aad_core.plugins.params import Lazy, build_component

            config = self.ws.config
            self._evaluator = build_component("evaluator", self.name, config, workspace=self.ws,
                                              embedder=Lazy(lambda: get_embedder(config)))
        out = self._evaluator.evaluate(list(answers), list(references))
        per_item = out.get("per_item") or [out.get("score", 0.0)] * len(answers)
        return [float(x) >= 1.0 - 1e-9 for x in per_item]

"""Every file in ``.aad/state/``: its name, the command that writes it, and its typed load and save.

Stages, the report, the CLI and plugins read state only through the classes here, so each file has
one reader, and a missing or unreadable file always fails the same way: a :class:`StageError`
(an :class:`AADError`) that names the file and the command that makes it.

====================  ===========================================  ===================
file                  written by                                   class
====================  ===========================================  ===================
clusters.json         aad cluster                                  :class:`ClusterState`
cluster_map.json      aad cluster (2-D PCA of the embeddings)      :class:`ClusterMap`
cluster_map.png       aad cluster / aad report (drawn from above)  name only
selection.json        aad select                                   :class:`Selection`
eval.json             aad eval                                     :class:`EvalReport`
router.json           aad route --calibrate                        :class:`RouterState`
router_eval.json      aad route --calibrate                        :class:`RouterEval`
distill.json          aad distill                                  :class:`DistillState`
selection_curve.json  benchmarks/selection_vs_random.py            :class:`SelectionCurve`
prompt_search.json    aad prompt-search TASK                       :class:`PromptSearch`
====================  ===========================================  ===================

Each JSON file is written through :meth:`Workspace.write_state`, which stamps it with the aad
version and the time (:attr:`Artifact.stamp` holds them after a load).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from aad_core.errors import AADError, StageError
from aad_core.schema import Cluster

if TYPE_CHECKING:
    import numpy as np

    from aad_core.workspace import Workspace

CLUSTERS = "clusters.json"
CLUSTER_MAP = "cluster_map.json"
CLUSTER_MAP_PNG = "cluster_map.png"
SELECTION = "selection.json"
EVAL = "eval.json"
ROUTER = "router.json"
ROUTER_EVAL = "router_eval.json"
DISTILL = "distill.json"
SELECTION_CURVE = "selection_curve.json"
PROMPT_SEARCH = "prompt_search.json"
#: ``{cluster id: why}`` for the routine tasks no configured specialist kind fits (the train stage writes it).
UNFIT = "unfit.json"

#: The command that writes each file (the hint of every "missing" or "unreadable" error).
MAKERS: dict[str, str] = {
    CLUSTERS: "aad cluster",
    CLUSTER_MAP: "aad cluster",
    CLUSTER_MAP_PNG: "aad cluster",
    SELECTION: "aad select",
    EVAL: "aad eval",
    ROUTER: "aad route --calibrate",
    ROUTER_EVAL: "aad route --calibrate",
    DISTILL: "aad distill",
    SELECTION_CURVE: "python benchmarks/selection_vs_random.py --workspace .",
    PROMPT_SEARCH: "aad prompt-search TASK",
}
#: Keys :meth:`Workspace.write_state` adds to every JSON artifact.
STAMP_KEYS = ("aad_version", "written_at")

A = TypeVar("A", bound="Artifact")


def read_json(ws: Workspace, name: str, *, what: str = "") -> dict[str, Any]:
    """The JSON object in state file ``name``; :class:`StageError` when it is missing or unreadable."""
    path = ws.state_path(name)
    maker = MAKERS.get(name)
    if not path.exists():
        raise StageError(f"{path} does not exist yet{f': no {what}' if what else ''}.",
                         hint=f"Run '{maker}' first." if maker else None)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _unreadable(path, name, f"it is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise _unreadable(path, name, f"it must hold a JSON object. Got {type(data).__name__} instead")
    return data


def fingerprint(ws: Workspace, name: str) -> str | None:
    """A short hash of state file ``name``'s content without its time stamp; None when it is missing.
    ``aad distill`` compares it to tell whether a stage's output changed since it last ran."""
    path = ws.state_path(name)
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(data, dict):  # the time stamp alone does not make a new result
        data = {k: v for k, v in data.items() if k != "written_at"}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _unreadable(path: Path, name: str, why: str) -> StageError:
    maker = MAKERS.get(name)
    return StageError(f"{path} cannot be read: {why}.",
                      hint=f"Run '{maker}' again to write it anew." if maker else "Delete it and run its stage again.")


class Artifact:
    """Load and save of one JSON state file; each subclass is a dataclass with ``to_json`` and
    ``from_json`` and names its file in ``FILE``."""

    FILE: ClassVar[str]
    #: What the file holds, for the "does not exist yet: no ..." message.
    WHAT: ClassVar[str] = ""
    #: ``aad_version`` and ``written_at`` of the file this object was loaded from ({} when built in memory).
    stamp: dict[str, str] = {}  # noqa: RUF012  (replaced per instance, never mutated)

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_json(cls: type[A], data: Mapping[str, Any]) -> A:
        raise NotImplementedError

    @classmethod
    def path(cls, ws: Workspace) -> Path:
        return ws.state_path(cls.FILE)

    @classmethod
    def exists(cls, ws: Workspace) -> bool:
        return cls.path(ws).exists()

    @classmethod
    def load(cls: type[A], ws: Workspace) -> A:
        """The saved artifact; :class:`StageError` naming the file and its command when it is
        missing or does not hold what this class expects."""
        data = read_json(ws, cls.FILE, what=cls.WHAT)
        try:
            obj = cls.from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # pydantic's ValidationError is a ValueError
            detail = f"missing key {err}" if isinstance(err, KeyError) else str(err).splitlines()[0]
            raise _unreadable(cls.path(ws), cls.FILE, f"it is not a valid {cls.FILE} ({detail}; written by "
                                                      "another aad version?)") from err
        obj.stamp = {k: str(data[k]) for k in STAMP_KEYS if k in data}
        return obj

    @classmethod
    def load_optional(cls: type[A], ws: Workspace) -> A | None:
        """Like :meth:`load`, but None when the file does not exist (an unreadable file still raises)."""
        return cls.load(ws) if cls.exists(ws) else None

    def save(self, ws: Workspace) -> Path:
        """Write the artifact atomically (stamped with the aad version and time)."""
        return ws.write_state(self.FILE, self.to_json())


def _opt_float(value: Any) -> float | None:
    """A number as written (an int stays an int), or None; TypeError for anything else."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a number. Got {value!r} instead")
    return value


# -- clusters.json ---------------------------------------------------------------------------------

@dataclass
class ClusterState(Artifact):
    """The result of ``aad cluster``, as every later stage reads it."""

    FILE: ClassVar[str] = CLUSTERS
    WHAT: ClassVar[str] = "task clusters"

    clusters: list[Cluster]
    assignments: dict[str, int]
    split: dict[str, str]
    dropped: dict[str, str]
    seed: int = 0
    embedder: str = ""
    model_id: str = ""
    view: list[str] = field(default_factory=list)
    k: int = 0
    criterion: str = ""
    replaceability: dict[str, Any] = field(default_factory=dict)
    #: Train-side ids moved to the ``"excluded"`` side of :attr:`split` -> why (user feedback marks the
    #: teacher's answer wrong): in their cluster, never selected nor trained on.
    excluded: dict[str, str] = field(default_factory=dict)

    def centroids(self) -> np.ndarray:
        """Unit centroids, one row per cluster in the order of :attr:`clusters`."""
        import numpy as np

        return np.asarray([c.centroid for c in self.clusters], dtype=np.float32)

    def cluster(self, cid: int) -> Cluster:
        for c in self.clusters:
            if c.id == cid:
                return c
        raise KeyError(f"No cluster {cid}; the clusters are {[c.id for c in self.clusters]}.")

    def member_ids(self, cid: int) -> list[str]:
        return [t for t, c in self.assignments.items() if c == cid]

    def train_ids(self, cid: int) -> list[str]:
        return [t for t, c in self.assignments.items() if c == cid and self.split.get(t) == "train"]

    def heldout_ids(self, cid: int) -> list[str]:
        return [t for t, c in self.assignments.items() if c == cid and self.split.get(t) == "heldout"]

    def routine_clusters(self) -> list[Cluster]:
        return [c for c in self.clusters if c.routine]

    def to_json(self) -> dict[str, Any]:
        out = {
            "seed": self.seed,
            "embedder": self.embedder,
            "model_id": self.model_id,
            "view": list(self.view),
            "k": self.k,
            "criterion": self.criterion,
            "clusters": [c.model_dump(mode="json") for c in self.clusters],
            "assignments": self.assignments,
            "split": self.split,
            "dropped": self.dropped,
            "replaceability": self.replaceability,
        }
        if self.excluded:  # written only when feedback left calls out (older files have no such key)
            out["excluded"] = self.excluded
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClusterState:
        return cls(
            clusters=[Cluster.model_validate(c) for c in data["clusters"]],
            assignments={k: int(v) for k, v in data["assignments"].items()},
            split=dict(data["split"]),
            dropped=dict(data.get("dropped") or {}),
            seed=int(data.get("seed", 0)),
            embedder=str(data.get("embedder", "")),
            model_id=str(data.get("model_id", "")),
            view=list(data.get("view", [])),
            k=int(data.get("k", len(data["clusters"]))),
            criterion=str(data.get("criterion", "")),
            replaceability=dict(data.get("replaceability") or {}),
            excluded=dict(data.get("excluded") or {}),
        )


def load_clusters(ws: Workspace) -> ClusterState:
    """The saved clusters of the workspace; :class:`StageError` when 'aad cluster' has not run."""
    return ClusterState.load(ws)


# -- cluster_map.json ------------------------------------------------------------------------------

@dataclass
class ClusterMap(Artifact):
    """A 2-D projection (PCA) of the clustered embeddings, for drawing ``cluster_map.png``.

    ``points`` is a sample of at most a few thousand traces, ``cluster_ids`` their clusters;
    ``centroids`` {cluster id: (x, y)} is each cluster's mean over all its members, projected.
    """

    FILE: ClassVar[str] = CLUSTER_MAP
    WHAT: ClassVar[str] = "cluster map"

    points: list[tuple[float, float]]
    cluster_ids: list[int]
    centroids: dict[int, tuple[float, float]]
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "points": [[round(float(x), 6), round(float(y), 6)] for x, y in self.points],
            "cluster_ids": [int(c) for c in self.cluster_ids],
            "centroids": {str(c): [round(float(x), 6), round(float(y), 6)] for c, (x, y) in self.centroids.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClusterMap:
        points = [(float(x), float(y)) for x, y in data["points"]]
        ids = [int(c) for c in data["cluster_ids"]]
        if len(points) != len(ids):
            raise ValueError(f"{len(points)} points but {len(ids)} cluster ids")
        return cls(points=points, cluster_ids=ids,
                   centroids={int(c): (float(x), float(y)) for c, (x, y) in data["centroids"].items()},
                   seed=int(data.get("seed", 0)))

    def save(self, ws: Workspace) -> Path:
        """Write the map; the PNG drawn from the previous one is removed (it no longer matches)."""
        path = super().save(ws)
        png_path(ws).unlink(missing_ok=True)
        return path


def png_path(ws: Workspace) -> Path:
    """``cluster_map.png``: drawn from :class:`ClusterMap` by ``aad cluster`` and ``aad report``."""
    return ws.state_path(CLUSTER_MAP_PNG)


# -- selection.json --------------------------------------------------------------------------------

@dataclass
class ClusterSelection:
    """One routine cluster's selection: the chosen training traces and every train trace's score."""

    selected: list[str]
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    label: str = ""
    n_train: int = 0
    #: Training-split calls left out because user feedback marks the teacher's answer wrong.
    n_excluded: int = 0

    def to_json(self) -> dict[str, Any]:
        out = {"label": self.label, "n_train": self.n_train, "selected": list(self.selected), "scores": self.scores}
        if self.n_excluded:
            out["n_excluded"] = self.n_excluded
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ClusterSelection:
        return cls(selected=[str(t) for t in data["selected"]], scores=dict(data.get("scores") or {}),
                   label=str(data.get("label") or ""), n_train=int(data.get("n_train") or 0),
                   n_excluded=int(data.get("n_excluded") or 0))


@dataclass
class Selection(Artifact):
    """The result of ``aad select``: per routine cluster, the training traces to train on."""

    FILE: ClassVar[str] = SELECTION
    WHAT: ClassVar[str] = "selection of training traces"

    clusters: dict[int, ClusterSelection]
    fraction: float | None = None
    selector: str = ""
    scorer: str = ""
    student: str = ""
    uncertainty_weight: float | None = None
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "clusters": {str(cid): entry.to_json() for cid, entry in self.clusters.items()},
            "fraction": self.fraction,
            "selector": self.selector,
            "scorer": self.scorer,
            "student": self.student,
            "uncertainty_weight": self.uncertainty_weight,
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Selection:
        return cls(
            clusters={int(cid): ClusterSelection.from_json(e) for cid, e in data["clusters"].items()},
            fraction=_opt_float(data.get("fraction")),
            selector=str(data.get("selector") or ""),
            scorer=str(data.get("scorer") or ""),
            student=str(data.get("student") or ""),
            uncertainty_weight=_opt_float(data.get("uncertainty_weight")),
            seed=int(data.get("seed", 0)),
        )


# -- eval.json -------------------------------------------------------------------------------------

@dataclass
class EvalReport(Artifact):
    """The result of ``aad eval``: one entry per cluster (status, scores, latency, cost, the gate's
    verdict and reason) and a summary. Entries stay plain dicts: their fields depend on the status."""

    FILE: ClassVar[str] = EVAL
    WHAT: ClassVar[str] = "evaluation of the specialists"

    clusters: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    parity: float | None = None
    teacher_price_per_mtok: float | None = None
    hardware_price_per_hour: float | None = None
    teacher_score_note: str = ""
    #: The risk-coverage gate's settings (target_agreement, min_coverage, alpha, test_fraction).
    gate: dict[str, Any] = field(default_factory=dict)

    def evaluated(self) -> list[dict[str, Any]]:
        """The entries of clusters whose specialist was evaluated."""
        return [r for r in self.clusters if r.get("status") == "evaluated"]

    def promoted_ids(self) -> set[int]:
        return {int(r["cluster_id"]) for r in self.clusters if r.get("promoted")}

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "parity": self.parity,
            "gate": self.gate,
            "teacher_price_per_mtok": self.teacher_price_per_mtok,
            "hardware_price_per_hour": self.hardware_price_per_hour,
            "teacher_score_note": self.teacher_score_note,
            "clusters": self.clusters,
            "summary": self.summary,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> EvalReport:
        clusters = data["clusters"]
        if not isinstance(clusters, list) or not all(isinstance(r, dict) and "cluster_id" in r for r in clusters):
            raise ValueError("'clusters' must be a list of entries with a 'cluster_id'")
        return cls(
            clusters=list(clusters),
            summary=dict(data.get("summary") or {}),
            seed=int(data.get("seed", 0)),
            parity=_opt_float(data.get("parity")),
            gate=dict(data.get("gate") or {}),
            teacher_price_per_mtok=_opt_float(data.get("teacher_price_per_mtok")),
            hardware_price_per_hour=_opt_float(data.get("hardware_price_per_hour")),
            teacher_score_note=str(data.get("teacher_score_note") or ""),
        )


# -- router.json -----------------------------------------------------------------------------------

def still_teacher_only(nodes: Mapping[str, Any], served: set[int] | Sequence[int] | Mapping[int, Any],
                       min_calls: int) -> dict[str, int]:
    """{node key: calls} of the ``nodes`` ({key: {"calls", "clusters"}}) that may skip the
    embedding: ``min_calls`` > 0, at least that many calls, and none of their clusters served.
    The one rule, applied at calibration and again whenever the router loads."""
    served = set(served)
    return {k: int(v["calls"]) for k, v in nodes.items()
            if isinstance(v, dict) and min_calls > 0 and int(v["calls"]) >= min_calls
            and not set(v.get("clusters", ())) & served}


@dataclass
class RouterState(Artifact):
    """The calibrated router (``aad route --calibrate``): per cluster its similarity threshold (and
    the parts it came from), output kind, specialist and confidence threshold (from the eval gate); and the agent nodes
    that go to the teacher without being embedded."""

    FILE: ClassVar[str] = ROUTER
    WHAT: ClassVar[str] = "calibrated router"

    clusters: dict[int, dict[str, Any]]
    teacher_nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    router: str = ""
    seed: int = 0
    embedder: str = ""
    embed_model: str | None = None
    view: list[str] = field(default_factory=list)
    threshold_quantile: float | None = None

    def thresholds(self) -> dict[int, float]:
        return {cid: float(entry["threshold"]) for cid, entry in self.clusters.items() if "threshold" in entry}

    def teacher_only(self, served: set[int] | Sequence[int] | Mapping[int, Any], min_calls: int) -> dict[str, int]:
        """The saved teacher-only nodes that still are, given today's ``served`` clusters (see
        :func:`still_teacher_only`)."""
        return still_teacher_only(self.teacher_nodes, served, min_calls)

    def to_json(self) -> dict[str, Any]:
        return {
            "router": self.router,
            "seed": self.seed,
            "embedder": self.embedder,
            "embed_model": self.embed_model,
            "view": list(self.view),
            "threshold_quantile": self.threshold_quantile,
            "clusters": {str(cid): entry for cid, entry in self.clusters.items()},
            "teacher_nodes": self.teacher_nodes,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RouterState:
        return cls(
            clusters={int(cid): dict(entry) for cid, entry in data["clusters"].items()},
            teacher_nodes=dict(data.get("teacher_nodes") or {}),
            router=str(data.get("router") or ""),
            seed=int(data.get("seed", 0)),
            embedder=str(data.get("embedder") or ""),
            embed_model=None if data.get("embed_model") is None else str(data["embed_model"]),
            view=list(data.get("view") or []),
            threshold_quantile=_opt_float(data.get("threshold_quantile")),
        )


@dataclass
class RouterEval(Artifact):
    """The calibrated router on the held-out split: a confusion matrix (rows: requests of served
    routine clusters / everything else; columns: to a specialist / to the teacher)."""

    FILE: ClassVar[str] = ROUTER_EVAL
    WHAT: ClassVar[str] = "router evaluation"

    matrix: list[list[int]]
    labels: list[str] = field(default_factory=lambda: ["routine", "complex"])
    targets: list[str] = field(default_factory=lambda: ["specialist", "teacher"])
    wrong_specialist: int = 0
    accuracy: float | None = None
    routine_recall: float | None = None
    complex_recall: float | None = None
    n: int = 0
    #: The same numbers as if every routine cluster had a promoted specialist (matrix, accuracy, n).
    if_all_routine_served: dict[str, Any] | None = None
    served_clusters: list[int] = field(default_factory=list)
    routine_clusters: list[int] = field(default_factory=list)
    split: str = "heldout"

    def to_json(self) -> dict[str, Any]:
        return {
            "labels": self.labels, "targets": self.targets, "matrix": self.matrix,
            "wrong_specialist": self.wrong_specialist, "accuracy": self.accuracy,
            "routine_recall": self.routine_recall, "complex_recall": self.complex_recall, "n": self.n,
            "if_all_routine_served": self.if_all_routine_served, "served_clusters": self.served_clusters,
            "routine_clusters": self.routine_clusters, "split": self.split,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RouterEval:
        matrix = [[int(v) for v in row] for row in data["matrix"]]
        if len(matrix) != 2 or any(len(row) != 2 for row in matrix):
            raise ValueError(f"'matrix' must be 2 x 2. Got {matrix!r} instead")
        alt = data.get("if_all_routine_served")
        return cls(
            matrix=matrix,
            labels=[str(x) for x in data.get("labels") or ["routine", "complex"]],
            targets=[str(x) for x in data.get("targets") or ["specialist", "teacher"]],
            wrong_specialist=int(data.get("wrong_specialist") or 0),
            accuracy=_opt_float(data.get("accuracy")),
            routine_recall=_opt_float(data.get("routine_recall")),
            complex_recall=_opt_float(data.get("complex_recall")),
            n=int(data.get("n") or 0),
            if_all_routine_served=dict(alt) if isinstance(alt, dict) else None,
            served_clusters=[int(c) for c in data.get("served_clusters") or []],
            routine_clusters=[int(c) for c in data.get("routine_clusters") or []],
            split=str(data.get("split") or "heldout"),
        )


# -- distill.json ----------------------------------------------------------------------------------

@dataclass
class DistillState(Artifact):
    """What ``aad distill`` last did per stage: {stage: {input_hash, output, profile, detail,
    seconds, finished_at}}; a stage is skipped while its input hash and output fingerprint match."""

    FILE: ClassVar[str] = DISTILL
    WHAT: ClassVar[str] = "distill run"

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"stages": self.stages, "seed": self.seed}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DistillState:
        stages = data["stages"]
        if not isinstance(stages, dict):
            raise ValueError(f"'stages' must be an object. Got {type(stages).__name__} instead")
        seed = data.get("seed")
        return cls(stages={str(k): dict(v) for k, v in stages.items()}, seed=None if seed is None else int(seed))


# -- selection_curve.json --------------------------------------------------------------------------

@dataclass
class SelectionCurve(Artifact):
    """Held-out accuracy by training budget, KL + uncertainty selection vs random (written by
    ``benchmarks/selection_vs_random.py --workspace``); ``extra`` keeps the benchmark's other keys."""

    FILE: ClassVar[str] = SELECTION_CURVE
    WHAT: ClassVar[str] = "selection experiment"
    _KNOWN: ClassVar[tuple[str, ...]] = ("budgets", "kl_uncertainty", "random", "base_accuracy", "ratio",
                                          "ratio_text", "ratio_at", "dataset")

    budgets: list[float]
    kl_uncertainty: list[float] | None = None
    random: list[float] | None = None
    base_accuracy: float | None = None
    ratio: float | None = None
    ratio_text: str | None = None
    ratio_at: float | None = None
    dataset: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def curves(self) -> dict[str, list[float]]:
        """{"kl_uncertainty": [...], "random": [...]}, each present only when recorded."""
        return {k: v for k, v in (("kl_uncertainty", self.kl_uncertainty), ("random", self.random)) if v is not None}

    def to_json(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self._KNOWN}, **self.extra}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SelectionCurve:
        def numbers(key: str) -> list[float] | None:
            value = data.get(key)
            return [_opt_float(v) for v in value] if isinstance(value, list) else None  # type: ignore[misc]

        ratio_text = data.get("ratio_text")
        return cls(
            budgets=numbers("budgets") or [], kl_uncertainty=numbers("kl_uncertainty"), random=numbers("random"),
            base_accuracy=_opt_float(data.get("base_accuracy")) if isinstance(data.get("base_accuracy"), (int, float))
            else None,
            ratio=_opt_float(data.get("ratio")), ratio_text=None if ratio_text is None else str(ratio_text),
            ratio_at=_opt_float(data.get("ratio_at")), dataset=str(data.get("dataset") or ""),
            extra={k: v for k, v in data.items() if k not in cls._KNOWN and k not in STAMP_KEYS},
        )


# -- prompt_search.json ----------------------------------------------------------------------------

@dataclass
class PromptVariant:
    """A way of asking the teacher a task's requests (``aad prompt-search``): the recorded request, with
    ``instruction`` appended to its system prompt and the answers of the training calls ``shot_ids``
    shown as earlier turns."""

    name: str
    instruction: str | None = None
    shot_ids: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "instruction": self.instruction, "shot_ids": list(self.shot_ids)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PromptVariant:
        instruction = data.get("instruction")
        return cls(name=str(data["name"]), instruction=None if instruction is None else str(instruction),
                   shot_ids=[str(t) for t in data.get("shot_ids") or []])


@dataclass
class PromptChoice:
    """One task's prompt search: every variant's score on a sample of its training calls, and the best."""

    best: PromptVariant
    #: Per variant, in the order tried: its fields plus asked, answered, agreed, failed and agreement.
    scores: list[dict[str, Any]]
    seed: int = 0
    n: int = 0
    searched_at: str = ""
    aad_version: str = ""
    teacher: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"best": self.best.to_json(), "scores": self.scores, "seed": self.seed, "n": self.n,
                "searched_at": self.searched_at, "aad_version": self.aad_version, "teacher": self.teacher}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PromptChoice:
        return cls(best=PromptVariant.from_json(data["best"]), scores=[dict(s) for s in data.get("scores") or []],
                   seed=int(data.get("seed", 0)), n=int(data.get("n", 0)), searched_at=str(data.get("searched_at", "")),
                   aad_version=str(data.get("aad_version", "")), teacher=str(data.get("teacher", "")))


@dataclass
class PromptSearch(Artifact):
    """The result of ``aad prompt-search``: per task (cluster id), the prompt variant ``aad augment`` uses."""

    FILE: ClassVar[str] = PROMPT_SEARCH
    WHAT: ClassVar[str] = "prompt search"

    tasks: dict[int, PromptChoice] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"tasks": {str(cid): choice.to_json() for cid, choice in sorted(self.tasks.items())}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PromptSearch:
        return cls(tasks={int(cid): PromptChoice.from_json(c) for cid, c in data["tasks"].items()})


__all__ = [
    "Artifact", "CLUSTERS", "CLUSTER_MAP", "CLUSTER_MAP_PNG", "DISTILL", "EVAL", "MAKERS", "PROMPT_SEARCH", "ROUTER",
    "ROUTER_EVAL", "SELECTION", "SELECTION_CURVE", "ClusterMap", "ClusterSelection", "ClusterState", "DistillState",
    "EvalReport", "PromptChoice", "PromptSearch", "PromptVariant", "RouterEval", "RouterState", "Selection",
    "SelectionCurve", "fingerprint", "load_clusters", "png_path", "read_json", "still_teacher_only",
]


def read_unfit(ws: Workspace) -> dict[str, str]:
    """``{cluster id: why}`` of the routine tasks the train stage found no fitting specialist kind for."""
    try:
        data = ws.read_state(UNFIT)
    except (StageError, OSError, ValueError):  # absent or unreadable: nothing recorded yet
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def unfit_reason(ws: Workspace, cluster_id: int) -> str | None:
    """Why no specialist kind fits the routine task ``cluster_id`` (None when one fits or it was not tried)."""
    return read_unfit(ws).get(str(cluster_id))

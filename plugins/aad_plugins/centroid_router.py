"""Router ``centroid``: nearest task-cluster centroid plus a calibrated per-cluster threshold.

A request is embedded with the same view and embedder as clustering (``[embed]``). It goes to the
specialist of its nearest cluster only when that cluster has a promoted specialist and the cosine
similarity clears the cluster's threshold (``aad route --calibrate`` writes them to
``.aad/state/router.json``); every other request goes to the teacher. Each decision says why.

Requests of an agent node (a system prompt) whose calibration calls never reached a cluster with a
specialist go to the teacher without being embedded (``[route] teacher_node_min_calls``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core import hookimpl
from aad_core.plugins.components import Router
from aad_core.errors import param_error
from aad_core.schema import ChatRequest, RoutingDecision

if TYPE_CHECKING:
    import numpy as np

    from aad_core.workspace import Workspace

EmbedFn = Callable[[Sequence[ChatRequest]], "np.ndarray"]


class CentroidRouter(Router):
    """Nearest-centroid router with per-cluster similarity thresholds.

    Parameters
    ----------
    workspace : str, Path, Workspace or None
        Where clusters, specialists and calibrated thresholds are read from (:meth:`load`).
        None = the workspace found from the current folder.
    default_threshold : float or None
        Threshold of a cluster that has no calibrated one (None = ``[route] default_threshold``).

    After :meth:`load` or :meth:`fit`: ``cluster_ids_``, ``centroids_`` (k, dim, unit rows),
    ``thresholds_`` {cluster id: float}, ``specialists_`` {cluster id: specialist name} of the
    clusters that may be served, ``teacher_nodes_`` {node key: calibration calls} of the agent
    nodes sent to the teacher unembedded, and ``calibrated_`` (bool).
    """

    def __init__(self, workspace: Any = None, default_threshold: float | None = None) -> None:
        self.workspace = workspace
        self.default_threshold = default_threshold

    # -- fitting ------------------------------------------------------------------------------
    def fit(
        self,
        centroids: np.ndarray,
        cluster_ids: Sequence[int],
        thresholds: Mapping[int, float],
        specialists: Mapping[int, str],
        embed: EmbedFn,
        *,
        calibrated: bool = True,
        teacher_nodes: Mapping[str, int] | None = None,
    ) -> CentroidRouter:
        """Set the routing state directly (tests, benchmarks, applications without a workspace)."""
        import numpy as np

        cents = np.asarray(centroids, dtype=np.float32)
        if cents.ndim != 2 or cents.shape[0] != len(cluster_ids):
            raise param_error("centroids", type(self).__name__, f"a ({len(cluster_ids)}, dim) array",
                              getattr(cents, "shape", cents))
        norms = np.linalg.norm(cents, axis=1, keepdims=True)
        self.centroids_ = cents / np.maximum(norms, 1e-12)
        self.cluster_ids_ = [int(c) for c in cluster_ids]
        default = self._default_threshold()
        self.thresholds_ = {c: float(thresholds.get(c, default)) for c in self.cluster_ids_}
        self.specialists_ = {int(c): str(n) for c, n in specialists.items()}
        self.embed_ = embed
        self.calibrated_ = calibrated
        self.teacher_nodes_ = dict(teacher_nodes or {})
        return self

    def _default_threshold(self) -> float:
        if self.default_threshold is not None:
            return float(self.default_threshold)
        ws = self._workspace_or_none()
        return float(ws.config.route.default_threshold) if ws is not None else 0.6

    def _workspace_or_none(self) -> Workspace | None:
        from aad_core.workspace import Workspace

        if isinstance(self.workspace, Workspace):
            return self.workspace
        if self.workspace is None:
            try:
                return Workspace.find()
            except Exception:
                return None
        return Workspace(Path(self.workspace))

    def load(self) -> CentroidRouter:
        """Read clusters, promoted specialists and calibrated thresholds from the workspace."""
        from aad_core.artifacts import ClusterState, RouterState
        from aad_core.models.embedding import embed_requests
        from aad_core.specialists import SpecialistRegistry

        ws = self._workspace_or_none()
        if ws is None:
            from aad_core.workspace import Workspace

            ws = Workspace.find()  # raises the usual "no workspace" error with its hint
        self.workspace = ws
        state = ClusterState.load(ws)
        saved = RouterState.load_optional(ws)
        specialists = {cid: spec.name for cid, spec in SpecialistRegistry(ws).promoted().items()}
        # The calibration's rule again, with today's specialists and setting: a specialist promoted
        # since then brings its nodes back to the embedding path, and min_calls = 0 turns it off.
        teacher_nodes = saved.teacher_only(specialists, ws.config.route.teacher_node_min_calls) if saved else {}
        config = ws.config  # the embedder and view clustering used

        def embed(requests: Sequence[ChatRequest]) -> np.ndarray:
            return embed_requests(list(requests), config)

        return self.fit(state.centroids(), [c.id for c in state.clusters], saved.thresholds() if saved else {},
                        specialists, embed, calibrated=saved is not None, teacher_nodes=teacher_nodes)

    def _ensure(self) -> None:
        if not hasattr(self, "centroids_"):
            self.load()

    # -- routing ------------------------------------------------------------------------------
    def nearest(self, requests: Sequence[ChatRequest]) -> tuple[list[int], list[float]]:
        """(nearest cluster id, cosine similarity) per request."""
        self._ensure()
        import numpy as np

        emb = np.asarray(self.embed_(list(requests)), dtype=np.float32)
        sims = emb @ self.centroids_.T
        best = sims.argmax(axis=1)
        return [self.cluster_ids_[int(i)] for i in best], [float(sims[r, i]) for r, i in enumerate(best)]

    def route(self, requests: Sequence[ChatRequest]) -> list[RoutingDecision]:
        """One :class:`RoutingDecision` per request (the routing engine passes them to ``aad_request_routed``)."""
        requests = list(requests)
        if not requests:
            return []
        self._ensure()
        decisions: dict[int, RoutingDecision] = {}
        for i, request in enumerate(requests):
            start = time.perf_counter()
            n = self._teacher_node_calls(request)
            if n is not None:
                decisions[i] = RoutingDecision(
                    target="teacher", latency_ms=round((time.perf_counter() - start) * 1000, 3),
                    reason=f"its agent node (system prompt) reached no specialist in {n} calibration calls: "
                    "teacher, without embedding the request")
        todo = [i for i in range(len(requests)) if i not in decisions]
        if todo:
            start = time.perf_counter()
            cids, sims = self.nearest([requests[i] for i in todo])
            per_request_ms = (time.perf_counter() - start) * 1000 / len(todo)
            for i, c, s in zip(todo, cids, sims):
                decisions[i] = self._decide(c, s, per_request_ms)
        return [decisions[i] for i in range(len(requests))]

    def _teacher_node_calls(self, request: ChatRequest) -> int | None:
        """Calibration calls of the request's agent node if that node goes to the teacher unembedded."""
        if not self.teacher_nodes_ or not request.system_prompt():
            return None
        from aad_core.schema import node_key

        return self.teacher_nodes_.get(node_key(request))

    def _decide(self, cid: int, sim: float, latency_ms: float) -> RoutingDecision:
        threshold = self.thresholds_.get(cid, self._default_threshold())
        specialist = self.specialists_.get(cid)
        common = {"cluster_id": cid, "similarity": round(sim, 4), "threshold": round(threshold, 4),
                  "latency_ms": round(latency_ms, 3)}
        note = "" if self.calibrated_ else " (uncalibrated threshold: run 'aad route --calibrate')"
        if specialist is None:
            return RoutingDecision(target="teacher", reason=f"cluster {cid} has no promoted specialist{note}", **common)
        if sim < threshold:
            return RoutingDecision(
                target="teacher", specialist=specialist,
                reason=f"similarity {sim:.3f} to cluster {cid} is below its threshold {threshold:.3f}{note}", **common,
            )
        return RoutingDecision(
            target="specialist", specialist=specialist,
            reason=f"similarity {sim:.3f} to cluster {cid} clears its threshold {threshold:.3f}{note}", **common,
        )


@hookimpl
def aad_register_routers(register: Any) -> None:
    register(
        "centroid",
        CentroidRouter,
        description="Nearest task-cluster centroid (same embedder as clustering) with a calibrated per-cluster "
        "similarity threshold; only clusters with a promoted specialist are served.",
    )

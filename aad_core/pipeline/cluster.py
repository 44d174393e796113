"""Stage S2+S3: curate the traces, embed them, find task clusters, flag the routine ones.

Writes ``.aad/state/clusters.json`` (:class:`~aad_core.artifacts.ClusterState`, read back with
:func:`load_clusters`) and ``.aad/state/cluster_map.json``, the 2-D projection that ``aad cluster``
and the report draw as ``cluster_map.png``. Cluster ids are stable across re-runs: new centroids
are matched to the previous run's by a Hungarian assignment on cosine similarity.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aad_core.artifacts import ClusterMap, ClusterState, load_clusters  # the last two re-exported
from aad_core.pipeline.curate import curate, exclude_wrong_answers, place_augmented, split_clusters
from aad_core.schema import augmented_from, is_specialist_answer, node_key
from aad_core.models.embedding import CONTEXT_PARTS, embed_part_lists, get_embedder, unit_vectors, view_parts
from aad_core.errors import AADError, StageError
from aad_core.schema import Cluster

if TYPE_CHECKING:
    import numpy as np

    from aad_core.schema import Trace
    from aad_core.workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["ClusterState", "answer_space", "cluster_variance", "group_tasks", "load_clusters", "project_map", "rehome_stray_calls", "run_cluster",
           "split_mixed_nodes"]


def _tokens(t: Trace) -> int:
    if t.usage is None:
        return 0
    return t.usage.total_tokens or (t.usage.prompt_tokens + t.usage.completion_tokens)


def run_cluster(ws: Workspace, *, k: int | None = None, show_progress: bool = True) -> ClusterState:
    """Curate, embed and cluster every trace of ``ws``; save and return the :class:`ClusterState`."""
    import numpy as np

    from aad_core.plugins.params import build_component

    cfg = ws.config
    ccfg = cfg.cluster
    with ws.store() as store:
        # a specialist's own answers are never training data (only the teacher's are)
        traces = [t for t in store.iter_traces() if not is_specialist_answer(t)]
    if not traces:
        raise StageError(f"The workspace {ws.root} holds no traces to cluster.",
                         hint="run 'aad ingest FILE.jsonl' or record an agent with a capture handler first.")

    embedder = get_embedder(cfg)
    view = list(cfg.embed.view)
    part_lists = [view_parts(t.request, view, cfg.embed.max_chars_per_part, t.answer_text()) for t in traces]
    combined, per_part = embed_part_lists(part_lists, embedder, cache_dir=ws.cache_dir, show_progress=show_progress)

    content_parts = [p for p in per_part if p not in CONTEXT_PARTS]
    content = unit_vectors(sum(per_part[p] for p in content_parts)) if content_parts else None
    cur = curate(traces, content, near_duplicate_threshold=ccfg.near_duplicate_threshold)
    index = {t.id: i for i, t in enumerate(traces)}
    kept_rows = np.asarray([index[t] for t in cur.kept], dtype=np.int64)
    if len(kept_rows) == 0:
        raise StageError("Every trace was dropped by curation (errors or duplicates); nothing to cluster.",
                         hint="record more successful calls, then run 'aad cluster' again.")
    X = combined[kept_rows]

    nodes = [node_key(traces[index[tid]]) for tid in cur.kept]
    by_task = ccfg.unit == "task" and k is None and ccfg.k is None  # a given K asks for topic clusters
    if by_task:
        kept_traces = [traces[index[tid]] for tid in cur.kept]
        labels, criterion = group_tasks(kept_traces, nodes, min_calls=ccfg.min_size)
    else:
        clusterer = build_component("clusterer", ccfg.clusterer, cfg, workspace=ws, k=k)
        with _status(f"clustering {len(X)} traces with {ccfg.clusterer}", show_progress):
            clusterer.fit(X)
        labels = np.asarray(clusterer.labels_)
        criterion = str(getattr(clusterer, "criterion_", "given" if (k or ccfg.k) else ""))
        if ccfg.split_by_node:
            labels, n_split = split_mixed_nodes(labels, nodes, X, min_calls=ccfg.min_size,
                                                variance_threshold=ccfg.variance_threshold)
            if n_split:
                criterion += f" + {n_split} split by agent node"
    local_ids = sorted(set(labels.tolist()))

    previous, used_max = _previous(ws, embedder.model_id, view, X.shape[1])
    centroids = {lid: unit_vectors(X[labels == lid].mean(axis=0)) for lid in local_ids}
    id_map = _stable_ids(centroids, previous, used_max, ccfg.min_match_similarity)

    assignments = {cur.kept[r]: id_map[int(lab)] for r, lab in enumerate(labels)}
    clusters = _describe(traces, index, cur.kept, labels, X, id_map, cur.representative, cfg, by_task=by_task)
    # 'aad augment' paraphrases are split by their original, never held out themselves
    augmented = {tid: original for tid in assignments
                 if (original := augmented_from(traces[index[tid]])) is not None}
    split = split_clusters({t: c for t, c in assignments.items() if t not in augmented},
                           heldout_fraction=ccfg.heldout_fraction, seed=cfg.seed)
    # user feedback that marks the teacher's answer wrong keeps a call out of its task's training data
    excluded = exclude_wrong_answers(split, {tid: traces[index[tid]] for tid in assignments})
    excluded.update(place_augmented(split, augmented))
    split = {tid: split[tid] for tid in assignments}
    if by_task:
        clusters = _with_estimates(clusters, traces, index, cur.kept, labels, X, id_map, split, cfg)
    routine = [c for c in clusters if c.routine]
    total_cost = sum(t.cost or 0.0 for t in traces)
    replaceability = {
        "calls": round(sum(c.share_calls for c in routine), 6),
        "tokens": round(sum(c.share_tokens for c in routine), 6),
        "cost": round(sum(c.share_cost for c in routine), 6) if total_cost > 0 else None,
        "routine_clusters": len(routine),
    }
    state = ClusterState(
        clusters=clusters, assignments=assignments, split=split, dropped=cur.dropped, seed=cfg.seed,
        embedder=cfg.embed.embedder, model_id=embedder.model_id, view=view, k=len(clusters),
        criterion=criterion,
        replaceability=replaceability, excluded=excluded,
    )
    state.save(ws)
    project_map(X, [id_map[int(lab)] for lab in labels], seed=cfg.seed).save(ws)
    return state


ANSWER_SPACE_MIN_SHARE = 0.2


def answer_space(trace: Trace) -> str:
    """The answer space of one call: ``tool_calls``, ``json``, ``sql`` or ``text`` (labels and free text)."""
    from aad_core.formats.answers import answer_pairs
    from aad_core.formats.kinds import output_kind

    pairs = answer_pairs([trace])
    kind = output_kind(pairs) if pairs else "text"
    return kind if kind in ("tool_calls", "json", "sql") else "text"


def group_tasks(traces: Sequence[Trace], nodes: Sequence[str], *, min_calls: int) -> tuple[np.ndarray, str]:
    """Tasks, not topics: one task per agent node (system prompt) with one answer space.

    A node with ``min_calls`` calls or more is one task, split only where its answers show distinct
    sub-tasks: answer spaces (tool calls, JSON, SQL, text) that each hold ``min_calls`` calls and
    :data:`ANSWER_SPACE_MIN_SHARE` of the node's calls (a text answer counts as a tool-call answer
    in a node whose calls bind tools: "no tool fits" is one of its answers). The calls of smaller
    nodes are pooled by answer space (say, one text-to-SQL prompt per database): one task per space.
    Returns the labels (0..T-1, in the order of ``traces``) and a description of the grouping.
    """
    import numpy as np

    spaces = [answer_space(t) for t in traces]
    by_node: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(nodes):
        by_node[node].append(i)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    n_split = 0
    for node, rows in sorted(by_node.items(), key=lambda kv: kv[1][0]):
        counts = Counter(spaces[i] for i in rows)
        binds_tools = any(traces[i].request.tools for i in rows)
        if binds_tools and "tool_calls" in counts:
            counts["tool_calls"] += counts.pop("text", 0)
        space_of = {s: s for s in counts}
        if binds_tools and "tool_calls" in counts:
            space_of["text"] = "tool_calls"
        if len(rows) < min_calls:  # pooled with the other small nodes of its answer space
            for i in rows:
                groups[("pool", counts.most_common(1)[0][0])].append(i)
            continue
        own = [s for s, c in counts.items() if c >= min_calls and c >= ANSWER_SPACE_MIN_SHARE * len(rows)]
        main = counts.most_common(1)[0][0]
        if len(own) > 1:
            n_split += 1
        for i in rows:
            space = space_of.get(spaces[i], spaces[i])
            groups[(node, space if space in own else main)].append(i)
    labels = np.empty(len(traces), dtype=np.int64)
    for lid, (_, rows) in enumerate(sorted(groups.items(), key=lambda kv: kv[1][0])):
        labels[rows] = lid
    n_nodes = sum(len(r) >= min_calls for r in by_node.values())
    pools = sum(key[0] == "pool" for key in groups)
    what = f"tasks: {n_nodes} agent node(s) with >= {min_calls} calls"
    if n_split:
        what += f" ({n_split} split by answer space)"
    if pools:
        what += f" + {pools} pool(s) of smaller nodes by answer space"
    return labels, what


def _with_estimates(clusters: list[Cluster], traces: Sequence[Trace], index: dict[str, int], kept: list[str],
                    labels: np.ndarray, X: np.ndarray, id_map: dict[int, int], split: dict[str, str],
                    cfg: Any) -> list[Cluster]:
    """Each task's distillability estimate on its training split; a task is a candidate (``routine``)
    when it has ``[cluster] min_size`` calls and an estimate of at least ``[cluster] min_estimate``."""
    import numpy as np

    from aad_core.formats.kinds import output_kind_of
    from aad_core.pipeline.distillability import estimate_distillability

    ccfg = cfg.cluster
    rows_of: dict[int, list[int]] = defaultdict(list)
    for r, tid in enumerate(kept):
        if split.get(tid) == "train":
            rows_of[id_map[int(labels[r])]].append(r)
    out = []
    for c in clusters:
        rows = rows_of.get(c.id, [])
        members = [traces[index[kept[r]]] for r in rows]
        kind = output_kind_of(members)
        est = estimate_distillability(members, X[np.asarray(rows, dtype=np.int64)] if rows else X[:0], kind,
                                      seed=cfg.seed)
        routine = c.size >= ccfg.min_size and est.estimate >= ccfg.min_estimate
        out.append(c.model_copy(update={"routine": routine, "estimate": est.to_json(), "answer_kind": kind}))
    return out


def cluster_variance(members: np.ndarray) -> float:
    """The paper's sigma^2: mean squared distance of the members to their mean."""
    import numpy as np

    return float(np.mean(np.sum((members - members.mean(axis=0)) ** 2, axis=1)))


def split_mixed_nodes(
    labels: np.ndarray, nodes: Sequence[str], X: np.ndarray, *, min_calls: int, variance_threshold: float
) -> tuple[np.ndarray, int]:
    """Split every broad cluster (variance >= ``variance_threshold``) in which two or more agent
    nodes have ``min_calls`` members or more, then move stray calls home.

    Each such node becomes its own cluster; the cluster's other members join the part whose
    centroid is nearest. Afterwards a call whose node is a minority in its cluster but the
    majority of some other cluster moves to the nearest such cluster, so that a few calls of
    one node do not sit (and get routed) with another node's calls. Returns the new labels
    (0..K'-1) and the number of clusters split.
    """
    import numpy as np

    node_arr = np.asarray(nodes)
    out = np.empty(len(labels), dtype=np.int64)
    nxt, n_split = 0, 0
    for lid in sorted(set(labels.tolist())):
        rows = np.nonzero(labels == lid)[0]
        counts = Counter(node_arr[rows].tolist())
        major = sorted(n for n, c in counts.items() if c >= min_calls)
        if len(major) < 2 or cluster_variance(X[rows]) < variance_threshold:
            out[rows] = nxt
            nxt += 1
            continue
        n_split += 1
        masks = [node_arr[rows] == n for n in major]
        cents = np.stack([unit_vectors(X[rows[m]].mean(axis=0)) for m in masks])
        part = np.argmax(X[rows] @ cents.T, axis=1)  # the nearest part, for the minor nodes' calls
        for i, m in enumerate(masks):
            part[m] = i
        out[rows] = nxt + part
        nxt += len(major)
    return rehome_stray_calls(out, node_arr, X, max_calls=min_calls - 1), n_split


def rehome_stray_calls(labels: np.ndarray, nodes: np.ndarray, X: np.ndarray, *, max_calls: int) -> np.ndarray:
    """Move each call whose node is not its cluster's majority node, and has at most ``max_calls``
    calls there, to the nearest cluster (by centroid) whose majority node is its own. Calls of a
    node that is no cluster's majority stay, and so does a sizeable group (the node split left it
    in a narrow cluster on purpose). No cluster empties, so the labels keep their numbers."""
    import numpy as np

    ids = sorted(set(labels.tolist()))
    in_cluster = Counter(zip(labels.tolist(), nodes.tolist()))
    majority = {lid: Counter(nodes[labels == lid].tolist()).most_common(1)[0][0] for lid in ids}
    cents = {lid: unit_vectors(X[labels == lid].mean(axis=0)) for lid in ids}
    homes: dict[str, list[int]] = {}
    for lid, node in majority.items():
        homes.setdefault(node, []).append(lid)
    out = labels.copy()
    for lid in ids:
        for row in np.nonzero(labels == lid)[0]:
            home = homes.get(str(nodes[row]))
            if home and lid not in home and in_cluster[(lid, nodes[row])] <= max_calls:
                out[row] = max(home, key=lambda h: float(X[row] @ cents[h]))
    return out


def _status(text: str, show: bool) -> Any:
    if not show:
        return contextlib.nullcontext()
    from rich.console import Console

    return Console(stderr=True).status(text)


def _previous(ws: Workspace, model_id: str, view: list[str], dim: int) -> tuple[dict[int, np.ndarray], int]:
    """The previous run's unit centroids (only when it used the same model and view, else none)
    and the highest cluster id it used (fresh ids start above it)."""
    import numpy as np

    try:
        old = ClusterState.load_optional(ws)
    except AADError as err:  # an unreadable old file only costs id stability
        log.warning("ignoring the previous clusters: %s", err)
        return {}, -1
    if old is None:
        return {}, -1
    used_max = max((c.id for c in old.clusters), default=-1)
    if old.model_id != model_id or list(old.view) != view:
        return {}, used_max
    return {c.id: np.asarray(c.centroid, dtype=np.float32) for c in old.clusters if len(c.centroid) == dim}, used_max


def _stable_ids(
    new: dict[int, np.ndarray], previous: dict[int, np.ndarray], used_max: int, min_sim: float
) -> dict[int, int]:
    """Map local labels to cluster ids: matched to a previous id (Hungarian, cosine >= min_sim) or fresh."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    out: dict[int, int] = {}
    local = sorted(new)
    if previous:
        old_ids = sorted(previous)
        S = np.stack([new[lid] for lid in local]) @ np.stack([previous[o] for o in old_ids]).T
        rows, cols = linear_sum_assignment(-S)
        for r, c in zip(rows, cols):
            if S[r, c] >= min_sim:
                out[local[r]] = old_ids[c]
    nxt = used_max + 1
    for lid in local:
        if lid not in out:
            out[lid] = nxt
            nxt += 1
    return out


def _describe(
    traces: Sequence[Trace],
    index: dict[str, int],
    kept: list[str],
    labels: np.ndarray,
    X: np.ndarray,
    id_map: dict[int, int],
    representative: dict[str, str],
    cfg: Any,
    *,
    by_task: bool = False,
) -> list[Cluster]:
    import numpy as np

    ccfg = cfg.cluster
    kept_pos = {tid: r for r, tid in enumerate(kept)}
    # 'aad augment' paraphrases are training data, not traffic: they count in no size, share or routine test
    recorded = [augmented_from(traces[index[tid]]) is None for tid in kept]
    traffic: dict[int, list[Trace]] = defaultdict(list)
    for r, tid in enumerate(kept):
        if recorded[r]:
            traffic[int(labels[r])].append(traces[index[tid]])
    for dup, rep in representative.items():
        if rep in kept_pos and augmented_from(traces[index[dup]]) is None:
            traffic[int(labels[kept_pos[rep]])].append(traces[index[dup]])
    real = [t for t in traces if augmented_from(t) is None]
    total_calls = len(real)
    total_tokens = sum(_tokens(t) for t in real)
    total_cost = sum(t.cost or 0.0 for t in real)
    keywords = _ctfidf_keywords(traces, index, kept, labels, cfg)

    clusters = []
    for lid in sorted(set(labels.tolist())):
        members = X[labels == lid]
        mu = members.mean(axis=0)
        variance = cluster_variance(members)
        centroid = unit_vectors(mu)
        mean_sim = float(np.mean(members @ centroid))
        size = int(sum(recorded[r] for r in np.nonzero(labels == lid)[0]))
        tasks = Counter(traces[index[kept[r]]].task for r in np.nonzero(labels == lid)[0])
        tasks.pop(None, None)
        kw = keywords.get(lid, [])
        calls = traffic[lid]
        clusters.append(
            Cluster(
                id=id_map[lid],
                label=" / ".join(kw[:3]) if kw else f"cluster {id_map[lid]}",
                keywords=kw,
                size=size,
                variance=round(variance, 6),
                mean_similarity=round(mean_sim, 6),
                routine=bool(size >= ccfg.min_size and (by_task or variance < ccfg.variance_threshold)),
                share_calls=round(len(calls) / total_calls, 6) if total_calls else 0.0,
                share_tokens=round(sum(_tokens(t) for t in calls) / total_tokens, 6) if total_tokens else 0.0,
                share_cost=round(sum(t.cost or 0.0 for t in calls) / total_cost, 6) if total_cost else 0.0,
                centroid=[round(float(x), 6) for x in centroid],
                task=tasks.most_common(1)[0][0] if tasks else None,
            )
        )
    return sorted(clusters, key=lambda c: c.id)


def _ctfidf_keywords(
    traces: Sequence[Trace], index: dict[str, int], kept: list[str], labels: np.ndarray, cfg: Any, top: int = 8
) -> dict[int, list[str]]:
    """c-TF-IDF (BERTopic's class-based TF-IDF): one document per cluster; a shared context
    (system prompt, tools) counts once per cluster so the varying user content is not drowned."""
    import numpy as np
    from sklearn.feature_extraction.text import CountVectorizer

    docs: dict[int, list[str]] = defaultdict(list)
    contexts: dict[int, set[str]] = defaultdict(set)
    view = [p for p in cfg.embed.view if p != "answer"]
    for r, tid in enumerate(kept):
        lid = int(labels[r])
        for part, text in view_parts(traces[index[tid]].request, view, cfg.embed.max_chars_per_part):
            if part in CONTEXT_PARTS:
                contexts[lid].add(text)
            else:
                docs[lid].append(text)
    lids = sorted(set(labels.tolist()))
    class_docs = ["\n".join(sorted(contexts[l]) + docs[l]) for l in lids]
    try:
        vec = CountVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z_]{2,}\b", max_features=50_000)
        counts = vec.fit_transform(class_docs).toarray().astype(np.float64)
    except ValueError:  # no words at all
        return {}
    tf = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    avg_words = counts.sum() / max(len(lids), 1)
    idf = np.log(1 + avg_words / np.maximum(counts.sum(axis=0), 1))
    scores = tf * idf
    vocab = np.asarray(vec.get_feature_names_out())
    out: dict[int, list[str]] = {}
    for row, lid in enumerate(lids):
        best = np.argsort(-scores[row])[:top]
        out[lid] = [str(vocab[j]) for j in best if scores[row, j] > 0]
    return out


def project_map(X: np.ndarray, cluster_ids: Sequence[int], *, seed: int = 0, max_points: int = 5000) -> ClusterMap:
    """A 2-D PCA projection of the embeddings (a sample of at most ``max_points`` rows) and of each
    cluster's mean, for :func:`aad_core.report.draw_cluster_map` to draw."""
    import numpy as np
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    ids = np.asarray(cluster_ids)
    rng = np.random.default_rng(seed)
    rows = np.arange(len(X)) if len(X) <= max_points else np.sort(rng.choice(len(X), max_points, replace=False))
    n_comp = min(2, X.shape[1], max(len(X) - 1, 1))
    with threadpool_limits(limits=1):  # a 5,000 x 384 PCA gains nothing from threads; spinning costs
        pca = PCA(n_components=n_comp, random_state=seed).fit(X[rows])
    P = pca.transform(X[rows])
    if P.shape[1] == 1:
        P = np.hstack([P, np.zeros_like(P)])
    centroids = {}
    for cid in sorted(set(ids.tolist())):
        cen = pca.transform(X[ids == cid].mean(axis=0, keepdims=True))[0]
        centroids[int(cid)] = (float(cen[0]), float(cen[1]) if len(cen) > 1 else 0.0)
    return ClusterMap(points=[(float(x), float(y)) for x, y in P], cluster_ids=[int(c) for c in ids[rows]],
                      centroids=centroids, seed=seed)

"""The train stage tries specialist kinds cheapest first and keeps every candidate the gate refused."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aad_core.artifacts import ClusterSelection, EvalReport, Selection
from aad_core.models.runtime import Generation
from aad_core.plugins import Predictor, Trainer, get_plugin_manager, hookimpl
from aad_core.schema import ChatRequest, Trace
from aad_core.workspace import Workspace
from tests.conftest import make_trace

LABELS = ("card_arrival", "exchange_rate", "pin_blocked")


class _Fixed(Predictor):
    def __init__(self, table: dict[str, str], default: str) -> None:
        self.table, self.default = table, default

    def generate(self, requests: Sequence[ChatRequest], *, max_new_tokens: int) -> list[Generation]:
        out = []
        for r in requests:
            answer = self.table.get(r.last_user_message().split()[-1], self.default)
            out.append(Generation(text=answer, mean_logprob=0.0, n_tokens=1, latency_ms=0.01, confidence=1.0))
        return out


class MajorityTrainer(Trainer):
    """Always the most common answer: cheap, and wrong on two labels of three."""

    kind = "majority"

    def train(self, train: Sequence[Trace], eval: Sequence[Trace], output_dir: Path, *,
              show_progress: bool = True) -> dict[str, Any]:
        Path(output_dir, "answer.txt").write_text(Counter(t.answer_text() for t in train).most_common(1)[0][0])
        return {"n_train": len(train)}

    def load_predictor(self, specialist_dir: Path) -> Predictor:
        return _Fixed({}, Path(specialist_dir, "answer.txt").read_text())


class KeywordTrainer(Trainer):
    """The answer seen with the request's last word: right on this task."""

    kind = "keyword"

    def train(self, train: Sequence[Trace], eval: Sequence[Trace], output_dir: Path, *,
              show_progress: bool = True) -> dict[str, Any]:
        import json

        table = {t.request.last_user_message().split()[-1]: t.answer_text() for t in train}
        Path(output_dir, "table.json").write_text(json.dumps(table))
        return {"n_train": len(train)}

    def load_predictor(self, specialist_dir: Path) -> Predictor:
        import json

        return _Fixed(json.loads(Path(specialist_dir, "table.json").read_text()), "unknown")


class _Kinds:
    @hookimpl
    def aad_register_trainers(self, register: Any) -> None:
        register("majority", MajorityTrainer, description="the most common answer (tests only)")
        register("keyword", KeywordTrainer, description="a last-word lookup (tests only)")


def _task(ws: Workspace, n: int = 60) -> None:
    """One routine task of ``n`` calls; held out: every third call of the second half."""
    traces = [make_trace(f"question {i} about {LABELS[i % 3]}", LABELS[i % 3]) for i in range(n)]
    with ws.store() as store:
        store.add(traces)
    split = {t.id: ("heldout" if i % 3 == 0 and i >= n // 2 else "train") for i, t in enumerate(traces)}
    ws.write_state("clusters.json", {
        "clusters": [{"id": 0, "label": "intents", "size": n, "variance": 0.2, "mean_similarity": 0.8,
                      "routine": True, "centroid": [1.0, 0.0]}],
        "assignments": {t.id: 0 for t in traces}, "split": split, "dropped": []})
    train_ids = [t.id for t in traces if split[t.id] == "train"]
    Selection(clusters={0: ClusterSelection(selected=train_ids, label="intents")}, fraction=1.0, selector="top",
              scorer="none").save(ws)


def test_a_refused_kind_is_kept_as_a_candidate_and_the_next_kind_is_trained(workspace: Workspace) -> None:
    from aad_core.pipeline.evaluate import run_evaluate
    from aad_core.pipeline.train import run_train
    from aad_core.specialists import SpecialistRegistry

    get_plugin_manager().add_plugin(_Kinds(), name="candidate-kinds")
    _task(workspace)
    workspace.config.train.trainer = ["majority", "keyword"]
    specs = run_train(workspace, show_progress=False)
    assert [s.kind for s in specs] == ["majority", "keyword"]
    registry = SpecialistRegistry(workspace)
    first = registry.get(specs[0].name, specs[0].version)
    assert not first.promoted  # the audition refused it
    before = registry.manifest(specs[1])["hyperparameters"]["candidates_before"]
    assert [(c["kind"], c["promoted"]) for c in before] == [("majority", False)]
    assert before[0]["score"] < 0.5 and "not promoted" in before[0]["reason"]

    run_evaluate(workspace, show_progress=False)
    entry = EvalReport.load(workspace).clusters[0]
    assert entry["promoted"] and entry["specialist"]["kind"] == "keyword"
    assert [(c["kind"], c["promoted"]) for c in entry["candidates"]] == [("majority", False), ("keyword", True)]


def test_a_kind_that_passes_stops_the_search(workspace: Workspace) -> None:
    from aad_core.pipeline.train import run_train

    get_plugin_manager().add_plugin(_Kinds(), name="candidate-kinds-2")
    _task(workspace)
    workspace.config.train.trainer = ["keyword", "majority"]
    specs = run_train(workspace, show_progress=False)
    assert [s.kind for s in specs] == ["keyword"]


_THIRD_PARTY = '''
"""A third-party specialist kind, installed as a package: the answer seen with the request's last word."""
import json
from pathlib import Path

from aad_core import hookimpl
from aad_core.models.runtime import Generation
from aad_core.plugins import Predictor, Trainer


class _Lookup(Predictor):
    def __init__(self, table):
        self.table = table

    def generate(self, requests, *, max_new_tokens):
        out = []
        for r in requests:
            answer = self.table.get(r.last_user_message().split()[-1])
            out.append(Generation(text=answer or "", mean_logprob=0.0, n_tokens=1, latency_ms=0.01,
                                  confidence=1.0 if answer else 0.0))
        return out


class LastWordTrainer(Trainer):
    kind = "lastword"
    uses_selection = False

    def train(self, train, eval, output_dir, *, show_progress=True):
        table = {t.request.last_user_message().split()[-1]: t.answer_text() for t in train}
        Path(output_dir, "table.json").write_text(json.dumps(table))
        return {"n_train": len(train)}

    def load_predictor(self, specialist_dir):
        return _Lookup(json.loads(Path(specialist_dir, "table.json").read_text()))


@hookimpl
def aad_register_trainers(register):
    register("lastword", LastWordTrainer, description="a last-word lookup (third-party test kind)")
'''


def test_a_third_party_kind_installed_through_an_entry_point_is_chosen_by_the_gate(
        workspace: Workspace, tmp_path: Path, monkeypatch: Any) -> None:
    """A kind from another distribution (declared in its dist-info entry_points.txt, as pip installs
    it) is listed after the built-in kind the gate refuses, trained, and promoted by the gate."""
    from aad_core.pipeline.evaluate import run_evaluate
    from aad_core.pipeline.train import run_train
    from aad_core.plugins import reset_plugin_manager

    site = tmp_path / "site"
    (site / "aad_lastword-0.2.0.dist-info").mkdir(parents=True)
    (site / "aad_lastword.py").write_text(_THIRD_PARTY)
    (site / "aad_lastword-0.2.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: aad-lastword\nVersion: 0.2.0\n")
    (site / "aad_lastword-0.2.0.dist-info" / "entry_points.txt").write_text("[aad]\nlastword = aad_lastword\n")
    monkeypatch.syspath_prepend(str(site))
    reset_plugin_manager()  # a fresh manager discovers the installed distribution's entry point
    get_plugin_manager().add_plugin(_Kinds(), name="candidate-kinds-3")
    assert get_plugin_manager().plugins["lastword"].status == "loaded"

    _task(workspace, n=900)  # 150 held-out calls: enough for a 95 % lower bound on agreement
    workspace.config.train.trainer = ["majority", "lastword"]
    specs = run_train(workspace, show_progress=False)
    assert [s.kind for s in specs] == ["majority", "lastword"]
    run_evaluate(workspace, show_progress=False)
    entry = EvalReport.load(workspace).clusters[0]
    assert entry["promoted"] and entry["specialist"]["kind"] == "lastword"
    assert [(c["kind"], c["promoted"]) for c in entry["candidates"]] == [("majority", False), ("lastword", True)]
    assert entry["gate"]["threshold"] == 1.0  # the risk-coverage gate chose a threshold on the kind's confidence
    assert entry["gate"]["test"]["coverage"] == 1.0

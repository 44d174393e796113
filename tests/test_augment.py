"""Teacher-generated data (``aad augment``) and prompt search (``aad prompt-search``) against a local,
deterministic OpenAI-compatible teacher on 127.0.0.1.

The stub teacher answers a paraphrase request with fixed variants of the text: one that keeps the
task's keyword (and carries an e-mail address), one that loses it, a case-changed duplicate and the
original itself. It labels a request by a keyword rule ("card" -> card_arrival, "rate" ->
exchange_rate, else other), so the first paraphrase agrees with the recorded label and the second
does not. In "picky" mode its label's format depends on the prompt: verbose for the recorded
request, right for exchange_rate only with the format instruction, always right with few-shot turns.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from aad_core.artifacts import PromptSearch, PromptVariant
from aad_core.cli import app
from aad_core.config import load_config
from aad_core.errors import AADError, ConfigError
from aad_core.pipeline.augment import run_augment, run_prompt_search
from aad_core.pipeline.augment.paraphrase import parse_paraphrases
from aad_core.pipeline.augment.prompts import apply_variant
from aad_core.pipeline.curate import place_augmented
from aad_core.schema import AUGMENT_METADATA_KEY, Cluster, Message, Trace
from aad_core.traces import delete_traces
from aad_core.workspace import Workspace

from _chat_stub import chat_stub, completion
from conftest import make_trace

SYSTEM = "Classify the banking request. Reply with the intent label only."
EMAIL = "jane.roe@example.com"
runner = CliRunner()


# -- the stub teacher -------------------------------------------------------------------------------

def label_of(text: str) -> str:
    low = text.lower()
    return "card_arrival" if "card" in low else "exchange_rate" if "rate" in low else "other"


def paraphrases_of(text: str) -> str:
    keeps = f"Could you tell me, for {EMAIL}: {text}"
    loses = text.replace("card", "plastic").replace("exchange rate", "swap price")
    return "\n".join([f"1. {keeps}", "", f'2. "{loses}"', keeps.upper(), text])


class StubTeacher:
    """The server's state: its URL, every request body it got, and its answering mode."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.mode = "plain"
        self.url = ""

    def answer(self, body: dict[str, Any]) -> str:
        messages = body["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        last = messages[-1]["content"]
        if system.startswith("You paraphrase requests"):
            return paraphrases_of(last)
        label = label_of(last)
        if self.mode == "plain" or any(m["role"] == "assistant" for m in messages[:-1]):  # few-shot turns
            return label
        if "Answer in exactly the format" in system:
            return label if label == "exchange_rate" else "Card arrival"
        return f"The intent is {label}."

    def seen_text(self) -> str:
        return json.dumps(self.bodies)


@pytest.fixture
def teacher() -> Iterator[StubTeacher]:
    stub = StubTeacher()

    def reply(body: dict[str, Any], _request: Any) -> dict[str, Any]:
        stub.bodies.append(body)
        return completion(stub.answer(body), body.get("model"), prompt_tokens=20, completion_tokens=3)

    with chat_stub(reply) as url:
        stub.url = url
        yield stub


# -- a workspace with one classification task -------------------------------------------------------

def _calls() -> tuple[list[Trace], list[Trace]]:
    """12 training calls and 4 held-out ones (their texts say so)."""
    train = [make_trace(f"where is my card number {i}", "card_arrival", system=SYSTEM, task="intent")
             for i in range(7)]
    train += [make_trace(f"what is the exchange rate for coin {i}", "exchange_rate", system=SYSTEM, task="intent")
              for i in range(5)]
    held = [make_trace(f"heldout card question {i}", "card_arrival", system=SYSTEM, task="intent") for i in range(2)]
    held += [make_trace(f"heldout rate question {i}", "exchange_rate", system=SYSTEM, task="intent")
             for i in range(2)]
    return train, held


def seed_workspace(root: Path, *, teacher_url: str | None) -> tuple[Workspace, list[Trace], list[Trace]]:
    from aad_core.artifacts import ClusterState

    ws = Workspace.init(root)
    if teacher_url:
        text = ws.config_path.read_text().replace("# base_url =\n", f'base_url = "{teacher_url}"\n', 1)
        ws.config_path.write_text(text)
        ws = Workspace(root)
    train, held = _calls()
    with ws.store() as store:
        store.add(train + held)
    split = {t.id: "train" for t in train} | {t.id: "heldout" for t in held}
    ClusterState(clusters=[Cluster(id=0, label="banking intents", size=16, variance=0.1, mean_similarity=0.9,
                                   routine=True, task="intent")],
                 assignments={t: 0 for t in split}, split=split, dropped={}).save(ws)
    return ws, train, held


@pytest.fixture(autouse=True)
def _no_spacy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Presidio's pattern recognisers only (the e-mail one is what these tests need): no spaCy load."""
    monkeypatch.setenv("AAD_REDACTOR__PRESIDIO__SPACY_MODEL", "null")


@pytest.fixture
def ws(tmp_path: Path, teacher: StubTeacher) -> tuple[Workspace, list[Trace], list[Trace]]:
    return seed_workspace(tmp_path / "ws", teacher_url=teacher.url)


def augmented(ws: Workspace) -> list[Trace]:
    with ws.store() as store:
        return list(store.iter_traces(source="augmented"))


# -- aad augment --------------------------------------------------------------------------------------

def test_augment_stores_the_agreeing_paraphrases_of_training_calls_only(ws, teacher: StubTeacher) -> None:
    workspace, train, held = ws
    result = run_augment(workspace, "intent", n=50)
    # every training call sampled; 2 paraphrases read of each (the duplicate and the original dropped),
    # the one that keeps the keyword agrees
    assert (result.sampled, result.asked, result.paraphrases, result.dropped) == (12, 36, 24, 24)
    assert (result.answered, result.failed, result.agreed, result.stored, result.already_stored) == (24, 0, 12, 12, 0)
    assert result.evaluator == "classification" and result.prompt == "recorded"
    stored = augmented(workspace)
    assert len(stored) == 12 and sorted(t.id for t in stored) == sorted(result.ids)
    by_id = {t.id: t for t in train}
    for t in stored:
        link = t.metadata[AUGMENT_METADATA_KEY]
        original = by_id[link["original_id"]]  # the link names a training call
        assert t.source == "augmented" and t.tags == ["augmented"] and link["check"] == "recorded"
        assert t.task == "intent" and t.model == "teacher-model"  # [teacher] model unset: the recorded one
        assert t.answer_text() == original.answer_text()
        assert t.request.system_prompt() == SYSTEM and len(t.request.messages) == 2  # the agent's own request
        user = t.request.last_user_message()
        assert EMAIL not in user and "<EMAIL_ADDRESS_1>" in user and original.request.last_user_message() in user
        assert t.redacted
    # no held-out call was ever shown to the teacher, nor paraphrased
    seen = teacher.seen_text()
    assert "heldout" not in seen and all(t.request.last_user_message() in seen for t in train)
    assert not {t.metadata[AUGMENT_METADATA_KEY]["original_id"] for t in stored} & {t.id for t in held}
    # a rerun stores nothing twice
    again = run_augment(workspace, "0", n=50)
    assert (again.agreed, again.stored, again.already_stored) == (12, 0, 12) and len(augmented(workspace)) == 12


def test_the_sample_is_seeded_and_never_paraphrases_an_augmented_trace(ws) -> None:
    workspace, _, _ = ws
    first = run_augment(workspace, "intent", n=5, paraphrases=2, seed=7)
    assert (first.sampled, first.asked, first.stored) == (5, 10, 5)
    # the stored traces are not clustered yet; even once they are on the training side they are not sampled
    from aad_core.artifacts import ClusterState

    state = ClusterState.load(workspace)
    state.assignments.update({i: 0 for i in first.ids})
    state.split.update({i: "train" for i in first.ids})
    state.save(workspace)
    second = run_augment(workspace, "intent", n=50, paraphrases=2, seed=7)
    assert second.sampled == 12 and second.stored == 12 - 5 and second.already_stored == 5


def test_cli_augment_prints_its_summary_on_stderr_only(ws) -> None:
    workspace, _, _ = ws
    res = runner.invoke(app, ["augment", "intent", "--n", "4", "-w", str(workspace.root)])
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    err = res.stderr
    for line in ("training calls sampled", "paraphrases asked for", "answered by the teacher",
                 "agreed with the recorded answers", "stored as new traces"):
        assert line in err
    assert re.search(r"\| stored as new traces +\| +4 \|", err) and re.search(r"\| agreed with .* \| +4 \|", err)
    assert "prompt: recorded (the recorded request)" in err
    res = runner.invoke(app, ["augment", "intent", "--n", "4", "--json", "-w", str(workspace.root)])
    data = json.loads(res.stdout)
    assert data["stored"] == 0 and data["already_stored"] == 4 and data["cluster_id"] == 0


def test_second_sample_check_compares_two_teacher_answers(ws, teacher: StubTeacher) -> None:
    workspace, _, _ = ws
    result = run_augment(workspace, "intent", n=3, check="second-sample")
    # the stub answers the same way twice: both paraphrases agree with themselves, even the one whose
    # label ("other") differs from the recorded one
    assert (result.paraphrases, result.answered, result.agreed, result.stored) == (6, 6, 6, 6)
    labels = sorted(t.answer_text() for t in augmented(workspace))
    assert labels.count("other") == 3
    assert all(t.metadata[AUGMENT_METADATA_KEY]["check"] == "second-sample" for t in augmented(workspace))
    answer_calls = [b for b in teacher.bodies if not b["messages"][0]["content"].startswith("You paraphrase")]
    assert len(answer_calls) == 12  # each paraphrase answered twice


# -- prompt search ------------------------------------------------------------------------------------

def test_prompt_search_picks_the_variant_the_teacher_favours_and_augment_uses_it(ws, teacher: StubTeacher) -> None:
    workspace, train, _ = ws
    teacher.mode = "picky"
    res = runner.invoke(app, ["prompt-search", "intent", "--n", "6", "--shots", "3", "--seed", "1",
                              "-w", str(workspace.root)])
    assert res.exit_code == 0, res.output
    assert "few-shot-3 (best)" in res.stdout and "prompt_search.json" in res.stdout
    saved = json.loads(workspace.state_path("prompt_search.json").read_text())
    assert saved["aad_version"] and saved["written_at"]
    task = saved["tasks"]["0"]
    assert task["seed"] == 1 and task["n"] == 6 and task["searched_at"] and task["aad_version"] == saved["aad_version"]
    assert task["best"]["name"] == "few-shot-3" and len(task["best"]["shot_ids"]) == 3
    scores = {s["name"]: s for s in task["scores"]}
    assert list(scores) == ["recorded", "format", "few-shot-3", "format+few-shot-3"]
    assert scores["recorded"]["agreement"] == 0.0 and scores["few-shot-3"]["agreement"] == 1.0
    assert 0.0 < scores["format"]["agreement"] < 1.0  # right for the exchange_rate calls only
    assert scores["format+few-shot-3"]["agreement"] == 1.0  # a tie goes to the simpler variant
    train_ids = {t.id for t in train}
    assert set(task["best"]["shot_ids"]) <= train_ids and "heldout" not in teacher.seen_text()

    choice = PromptSearch.load(workspace).tasks[0]
    assert choice.best.name == "few-shot-3"
    res = runner.invoke(app, ["augment", "intent", "--n", "12", "-w", str(workspace.root)])
    assert res.exit_code == 0, res.output
    assert "prompt: few-shot-3 (saved prompt search (100 % agreement" in res.stderr
    stored = augmented(workspace)
    # with the recorded prompt this teacher agrees with nothing; with the saved one, as in plain mode
    assert len(stored) == 12 and all(t.metadata[AUGMENT_METADATA_KEY]["prompt"] == "few-shot-3" for t in stored)
    assert all(len(t.request.messages) == 2 for t in stored)  # the examples shaped the question, not the trace
    res = runner.invoke(app, ["augment", "intent", "--n", "12", "--recorded-prompt", "--json",
                              "-w", str(workspace.root)])
    assert json.loads(res.stdout)["agreed"] == 0


def test_apply_variant_adds_the_instruction_and_the_examples_after_the_system_prompt() -> None:
    request = make_trace("where is my card", "card_arrival", system=SYSTEM).request
    shots = [make_trace("rate for coin", "exchange_rate", system=SYSTEM)]
    out = apply_variant(request, PromptVariant(name="v", instruction="Be terse.", shot_ids=[shots[0].id]), shots)
    assert [m.role for m in out.messages] == ["system", "user", "assistant", "user"]
    assert out.messages[0].content == f"{SYSTEM}\n\nBe terse." and out.messages[2].content == "exchange_rate"
    bare = apply_variant(request.model_copy(update={"messages": request.messages[1:]}),
                         PromptVariant(name="v", instruction="Be terse."), [])
    assert [m.role for m in bare.messages] == ["system", "user"] and bare.messages[0].content == "Be terse."


# -- errors and configuration -------------------------------------------------------------------------

def test_no_teacher_configured_is_an_error_with_the_lines_to_add(tmp_path: Path) -> None:
    workspace, _, _ = seed_workspace(tmp_path / "ws", teacher_url=None)
    for command in (["augment", "intent"], ["prompt-search", "intent"]):
        res = runner.invoke(app, [*command, "-w", str(workspace.root)])
        assert res.exit_code == 1 and res.stdout == ""
        assert f"'aad {command[0]}' needs a live teacher" in res.stderr and "[teacher] base_url" in res.stderr
        assert "Hint: Add to aad.toml:\n[teacher]\nbase_url = " in res.stderr and "api_key_env = " in res.stderr
    with pytest.raises(AADError, match="needs a live teacher"):
        run_augment(workspace, "intent")
    res = runner.invoke(app, ["augment", "nope", "-w", str(workspace.root)])
    assert res.exit_code == 1 and "The task 'nope' names no cluster" in res.stderr and "0 (intent)" in res.stderr


def test_an_unreachable_teacher_and_a_bad_teacher_section_fail_clearly(tmp_path: Path) -> None:
    workspace, _, _ = seed_workspace(tmp_path / "ws", teacher_url="http://127.0.0.1:9/v1")
    with pytest.raises(AADError, match=r"Every paraphrase request to the teacher failed .*127\.0\.0\.1:9"):
        run_augment(workspace, "intent", n=2)
    path = tmp_path / "aad.toml"
    path.write_text('[teacher]\nbase_url = "127.0.0.1:8001"\n')
    with pytest.raises(ConfigError, match=r"aad\.toml:\d+: \[teacher\] The 'base_url' parameter of \[teacher\] must"):
        load_config(path)
    path.write_text('[teacher]\nmodel = "gpt-4o"\n')
    with pytest.raises(ConfigError, match=r"model is set but base_url is not"):
        load_config(path)


def test_a_function_teacher_works_without_any_endpoint(tmp_path: Path) -> None:
    workspace, _, _ = seed_workspace(tmp_path / "ws", teacher_url=None)
    stub = StubTeacher()

    def fn(request: Any) -> str:
        return stub.answer({"messages": [m.model_dump(exclude_none=True) for m in request.messages]})

    result = run_augment(workspace, "intent", teacher=fn, n=4)
    assert (result.agreed, result.stored) == (4, 4)
    assert {t.metadata[AUGMENT_METADATA_KEY]["teacher"] for t in augmented(workspace)} == {"fn"}
    found = run_prompt_search(workspace, "intent", teacher=fn, n=4, shots=0)
    assert [s["name"] for s in found.choice.scores] == ["recorded", "format"]


def test_a_langchain_chat_model_is_a_teacher_through_langchain_teacher(tmp_path: Path) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.language_models.chat_models import SimpleChatModel
    from langchain_core.messages import convert_to_openai_messages

    from aad_langchain import langchain_teacher

    class StubChat(SimpleChatModel):
        """The stub teacher's answers, as a LangChain chat model."""

        @property
        def _llm_type(self) -> str:
            return "stub-chat"

        def _call(self, messages: Any, stop: Any = None, run_manager: Any = None, **kwargs: Any) -> str:
            return StubTeacher().answer({"messages": convert_to_openai_messages(messages)})

    workspace, _, _ = seed_workspace(tmp_path / "ws", teacher_url=None)
    with pytest.raises(AADError, match="langchain_teacher"):
        run_augment(workspace, "intent", teacher=StubChat(), n=1)
    result = run_augment(workspace, "intent", teacher=langchain_teacher(StubChat()), n=3)
    assert (result.paraphrases, result.answered, result.agreed, result.stored) == (6, 6, 3, 3)
    assert {t.metadata[AUGMENT_METADATA_KEY]["teacher"] for t in augmented(workspace)} == {"teacher-stub-chat"}


# -- the split and deletion ---------------------------------------------------------------------------

def test_augmented_traces_follow_their_original_and_are_never_held_out() -> None:
    split = {"a": "train", "b": "heldout", "c": "excluded"}
    moved = place_augmented(split, {"a1": "a", "b1": "b", "c1": "c", "x1": "gone"})
    assert split == {"a": "train", "b": "heldout", "c": "excluded", "a1": "train", "b1": "excluded",
                     "c1": "excluded", "x1": "excluded"}
    assert set(moved) == {"b1", "c1", "x1"} and "'heldout' side" in moved["b1"] and "not a kept call" in moved["x1"]


def test_reclustering_keeps_every_paraphrase_off_the_held_out_side(tmp_path: Path) -> None:
    from _fake_embedder import register_fake_embedder

    from aad_core.pipeline.cluster import run_cluster
    from aad_core.schema import AUGMENTED_SOURCE

    ws = Workspace.init(tmp_path / "ws")
    register_fake_embedder()
    ws.config_path.write_text(ws.config_path.read_text().replace('embedder = "minilm"', 'embedder = "fake"'))
    ws = Workspace(ws.root)
    originals = [make_trace(f"where is my card number {i}", "card_arrival", system=SYSTEM) for i in range(30)]
    children = [Trace(source=AUGMENTED_SOURCE, request=t.request.model_copy(update={"messages": [
        t.request.messages[0], Message(role="user", content=f"tell me please {t.request.last_user_message()} now")]}),
        response=t.response, metadata={AUGMENT_METADATA_KEY: {"original_id": t.id}}) for t in originals]
    with ws.store() as store:
        store.add(originals + children)
    state = run_cluster(ws, show_progress=False)
    side = state.split
    kids = [c for c in children if c.id in side]  # the fake embedder's hash collisions drop a few as duplicates
    assert len(kids) >= 20 and any(side.get(t.id) == "heldout" for t in originals)
    for c in kids:
        original = c.metadata[AUGMENT_METADATA_KEY]["original_id"]
        assert side[c.id] == ("train" if side.get(original) == "train" else "excluded")
    assert any(side[c.id] == "excluded" for c in kids) and any(side[c.id] == "train" for c in kids)
    assert not [c for c in kids if side[c.id] == "heldout"]
    assert all("augmented from" in state.excluded[c.id] for c in kids if side[c.id] == "excluded")
    # paraphrases are training data, not traffic: sizes and traffic shares count the recorded calls only
    recorded = [t for t in originals if t.id in side]
    assert sum(c.size for c in state.clusters) == len(recorded)
    assert sum(c.share_calls for c in state.clusters) <= 1.0 + 1e-6


def test_deleting_a_call_deletes_its_paraphrases(ws) -> None:
    workspace, train, _ = ws
    result = run_augment(workspace, "intent", n=50)
    child = augmented(workspace)[0]
    original = child.metadata[AUGMENT_METADATA_KEY]["original_id"]
    report = delete_traces(workspace, [original])
    assert report.deleted == 2 and child.id in report.ids
    assert len(augmented(workspace)) == result.stored - 1


# -- parsing ------------------------------------------------------------------------------------------

def test_paraphrases_are_read_one_per_line_without_markers_duplicates_or_the_original() -> None:
    answer = ("1. Where is my card?\n\n2) \"Has my card shipped\"\n- where is my card\n* WHERE IS MY CARD?\n"
              "where's it\nmore")
    assert parse_paraphrases(answer, "Where is my card", 2) == (["Has my card shipped", "where's it"], 4)

"""Answer hints: the nearest training requests' labels in the prompt, in training and at serving time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _fake_embedder import register_fake_embedder
from conftest import make_trace
from tiny_models import tiny_student  # noqa: F401  (session fixture)

from aad_core.models.answer_bank import HINT_PREFIX, HINTS_FILE, AnswerHints, hints_apply, with_hint
from aad_core.schema import ChatRequest, Message

TOPICS = {
    "card_arrival": ["when will my new card arrive", "my card has still not arrived", "card arrive delivery time"],
    "exchange_rate": ["what exchange rate do you use", "is the exchange rate good", "exchange rate for euros"],
    "transfer_fee": ["is there a fee for a transfer", "transfer fee charged twice", "why a fee on my transfer"],
}


def _labelled() -> list:
    return [make_trace(q, label, system="Reply with the intent label.") for label, qs in TOPICS.items() for q in qs]


@pytest.fixture
def fake_embedder():
    register_fake_embedder()


def test_hints_are_the_nearest_distinct_answers_nearest_first(fake_embedder) -> None:
    bank = AnswerHints(k=2, embedder="fake").fit(_labelled())
    assert bank.embeddings_.shape == (9, 64) and len(bank.answers_) == 9
    hints = bank.hints_for_texts(["exchange rate for dollars", "fee for my transfer"])
    assert [h[0] for h in hints] == ["exchange_rate", "transfer_fee"]
    assert all(len(h) == 2 and len(set(h)) == 2 for h in hints)
    assert AnswerHints(k=5, embedder="fake").fit(_labelled()).hints_for_texts(["x"])[0].__len__() == 3  # only 3 labels


def test_training_hints_never_show_a_request_its_own_entry(fake_embedder) -> None:
    traces = [make_trace("alpha beta", "A"), make_trace("alpha beta gamma", "B"), make_trace("delta", "C")]
    bank = AnswerHints(k=1, embedder="fake").fit(traces)
    served = bank.hints_for_texts(["alpha beta"])[0]
    trained = bank.apply_to_training(traces)
    assert served == ["A"]  # at serving time the identical request is the nearest
    first = trained[0].request.messages[0].content
    assert first.endswith(HINT_PREFIX + "B")  # in training its own entry is left out
    assert [t.response.content for t in trained] == ["A", "B", "C"] and trained[0].id == traces[0].id


def test_with_hint_appends_to_the_system_message_or_adds_one() -> None:
    req = ChatRequest(messages=[Message(role="system", content="Classify."), Message(role="user", content="hi")])
    hinted = with_hint(req, ["a", "b"])
    assert hinted.messages[0].content == "Classify.\n" + HINT_PREFIX + "a; b"
    assert req.messages[0].content == "Classify."  # the caller's request is not changed
    bare = with_hint(ChatRequest(messages=[Message(role="user", content="hi")]), ["a"])
    assert [m.role for m in bare.messages] == ["system", "user"]
    assert with_hint(req, []) is req


def test_bank_saves_and_loads(fake_embedder, tmp_path: Path) -> None:
    bank = AnswerHints(k=2, embedder="fake").fit(_labelled())
    assert AnswerHints.load(tmp_path) is None
    bank.save(tmp_path)
    again = AnswerHints.load(tmp_path)
    assert again is not None and (again.k, again.embedder, again.answers_) == (2, "fake", bank.answers_)
    assert again.hints_for_texts(["exchange rate for dollars"]) == bank.hints_for_texts(["exchange rate for dollars"])


def test_hints_only_suit_closed_label_sets() -> None:
    assert hints_apply(_labelled())[0]
    free = [make_trace(f"write a poem number {i}", f"Roses are red, number {i} is blue.") for i in range(9)]
    ok, why = hints_apply(free)
    assert not ok and "closed label set" in why


def test_bad_k_is_refused(fake_embedder) -> None:
    with pytest.raises(ValueError, match="'k' parameter of AnswerHints must be an int >= 1"):
        AnswerHints(k=0, embedder="fake").fit(_labelled())


def test_trainer_and_runtime_add_the_same_hints(fake_embedder, tiny_student: Path, tmp_path: Path, monkeypatch) -> None:
    import aad_core.models.chat_format as chat_format
    from aad_core.models.runtime import SpecialistRuntime
    from aad_plugins.qlora import QLoRATrainer

    trainer = QLoRATrainer(student=str(tiny_student), batch_size=4, gradient_accumulation=1, learning_rate=5e-3,
                           max_length=96, quantization="none", device="cpu", max_steps=2, answer_hints=2,
                           hint_embedder="fake")
    metrics = trainer.train(_labelled(), _labelled()[:2], tmp_path / "hinted", show_progress=False)
    assert metrics["answer_hints"] == 2 and (tmp_path / "hinted" / HINTS_FILE).exists()

    prompts: list[str] = []
    real = chat_format.prompt_text
    monkeypatch.setattr(chat_format, "prompt_text", lambda tok, req: prompts.append(real(tok, req)) or prompts[-1])
    runtime = SpecialistRuntime(tiny_student, device="cpu", warmup=False)
    runtime.add_adapter("intent", tmp_path / "hinted")
    req = ChatRequest(messages=[Message(role="system", content="Reply with the intent label."),
                                Message(role="user", content="exchange rate for dollars")])
    runtime.generate([req], adapter="intent", max_new_tokens=2)
    assert prompts and all(HINT_PREFIX + "exchange_rate; " in p for p in prompts)
    prompts.clear()
    runtime.generate([req], adapter=None, max_new_tokens=2)  # the base student gets no hints
    assert prompts and not any(HINT_PREFIX in p for p in prompts)


def test_trainer_leaves_hints_off_for_free_text_answers(fake_embedder, tiny_student: Path, tmp_path: Path) -> None:
    from aad_plugins.qlora import QLoRATrainer

    free = [make_trace(f"write a poem number {i}", f"Roses are red, number {i} is blue.") for i in range(6)]
    metrics = QLoRATrainer(student=str(tiny_student), batch_size=4, gradient_accumulation=1, max_length=48,
                           quantization="none", device="cpu", max_steps=1, answer_hints=3,
                           hint_embedder="fake").train(free, [], tmp_path / "free", show_progress=False)
    assert metrics["answer_hints"] == 0 and "not a closed label set" in metrics["answer_hints_note"]
    assert not (tmp_path / "free" / HINTS_FILE).exists()


@pytest.mark.real_model
def test_minilm_hints_find_the_paraphrased_intent() -> None:
    bank = AnswerHints(k=1).fit(_labelled())  # the default embedder: the packaged all-MiniLM-L6-v2
    hints = bank.hints_for_texts(["How long does it take for the card to be delivered?",
                                  "What rate do you convert pounds at?", "Do I pay anything to send money?"])
    assert [h[0] for h in hints] == ["card_arrival", "exchange_rate", "transfer_fee"]
    assert np.allclose(np.linalg.norm(bank.embeddings_, axis=1), 1.0, atol=1e-5)


def test_candidate_votes_sum_the_nearest_similarities(fake_embedder) -> None:
    bank = AnswerHints(k=0, embedder="fake", candidates=2, vote_neighbours=3).fit(_labelled())
    votes = bank.candidate_votes(bank.embed([ChatRequest(messages=[Message(role="user", content="exchange rate for dollars")])]))[0]
    assert list(votes)[0] == "exchange_rate" and len(votes) == 2
    assert votes["exchange_rate"] > 0 and all(v >= 0 for v in votes.values())


def test_vote_weight_is_fitted_on_held_out_answers() -> None:
    from aad_core.models.answer_bank import choose, fit_vote_weight

    # The log-prob prefers "a", the vote prefers "b"; the held-out answers say "b".
    scored = [{"a": (-1.0, 2, 0.0), "b": (-2.0, 2, 0.6)}] * 3
    weight, acc = fit_vote_weight(scored, ["b", "b", "b"])
    assert choose(scored[0], 0.0) == "a" and choose(scored[0], weight) == "b" and acc == 1.0
    assert weight == 2.0  # the first weight that flips it, nearest 1 among the perfect ones
    assert fit_vote_weight(scored, ["a", "a", "a"]) == (1.0, 1.0)  # 0 .. 1.5 all keep "a": ties go to 1


def test_trainer_fits_the_vote_and_the_runtime_answers_a_candidate(fake_embedder, tiny_student: Path,
                                                                  tmp_path: Path) -> None:
    from aad_core.models.runtime import SpecialistRuntime
    from aad_plugins.qlora import QLoRATrainer

    trainer = QLoRATrainer(student=str(tiny_student), batch_size=4, gradient_accumulation=1, learning_rate=5e-3,
                           max_length=96, quantization="none", device="cpu", max_steps=2, answer_candidates=2,
                           hint_embedder="fake")
    metrics = trainer.train(_labelled(), _labelled()[:4], tmp_path / "chooser", show_progress=False)
    assert metrics["answer_candidates"] == 2 and metrics["answer_hints"] == 0
    assert metrics["vote_weight"] in (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
    assert metrics["vote_fit_samples"] == 4
    bank = AnswerHints.load(tmp_path / "chooser")
    assert bank is not None and bank.vote_weight == metrics["vote_weight"]

    runtime = SpecialistRuntime(tiny_student, device="cpu", warmup=False)
    runtime.add_adapter("intent", tmp_path / "chooser")
    reqs = [ChatRequest(messages=[Message(role="user", content=q)]) for q in ("exchange rate for dollars", "fee for my transfer")]
    gens = runtime.generate(reqs, adapter="intent", max_new_tokens=1)
    scored = runtime.candidate_scores(reqs, adapter="intent")
    # The random tiny model could not spell a label; the chooser always answers one of the two nearest.
    assert [g.text for g in gens] == [max(s, key=lambda k: s[k][0] + bank.vote_weight * s[k][2]) for s in scored]
    assert all(g.text in s and g.mean_logprob < 0 and g.n_tokens >= 1 for g, s in zip(gens, scored))
    assert list(scored[0])[0] == "exchange_rate" and len(scored[0]) == 2  # nearest label first, 2 candidates
    free = runtime.generate(reqs, adapter=None, max_new_tokens=4)
    assert not all(g.text in {"card_arrival", "exchange_rate", "transfer_fee"} for g in free)


def test_cli_help_names_the_config_keys_it_defaults_to() -> None:
    from typer.testing import CliRunner

    from aad_core.cli import app

    out = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"}).output
    # rich would take an unescaped "[train]" for a style tag and drop it
    assert "(default: [trainer.qlora] epochs)" in out and "(default: [trainer.qlora] answer_hints)" in out

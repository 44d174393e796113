"""The classifier kind's tuned encoder, on a tiny random sentence-transformers BERT built in-process:
its forward pass matches the model's own, tuning lowers the contrastive loss, the tuned layers
round-trip through safetensors, and the classifier trains, saves and serves on a tuned encoder."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import make_trace

from aad_core.schema import ChatRequest, Message
from aad_core.workspace import Workspace
from aad_plugins.classifier import FILE, ClassifierTrainer
from aad_plugins.classifier_encoder import ENCODER_FILE, TunedEncoder, unsupported

INTENTS = {
    "card_arrival": "where is my new card it has not arrived",
    "exchange_rate": "what exchange rate do you use for euro dollars",
    "pin_blocked": "my pin got blocked after wrong tries",
}
FILLER = "please today now quickly again thanks hello sir madam kindly".split()


def make_tiny_sentence_transformer(path: Path, *, seed: int = 0) -> Path:
    """A random 3-layer BERT (hidden 32) with a word-level tokenizer and mean pooling, saved as a
    sentence-transformers folder."""
    import torch
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    hf = path / "hf"
    hf.mkdir(parents=True, exist_ok=True)
    words = sorted({w for text in INTENTS.values() for w in text.split()} | set(FILLER) | {"a", "joke", "about", "cats"})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words, *map(str, range(300))])}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(hf)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(hf)
    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.models import Normalize, Pooling, Transformer
    transformer = Transformer(str(hf), max_seq_length=32)
    dim = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    st = SentenceTransformer(modules=[transformer, Pooling(dim(), "mean"), Normalize()], device="cpu")
    st.save(str(path / "st"))
    return path / "st"


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sentence_transformer(tmp_path_factory.mktemp("tiny-st"))


def _load(path: Path):  # noqa: ANN202
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")


def _label_traces(n_per: int, offset: int = 0) -> list:
    return [make_trace(f"{text} {FILLER[(i + offset) % len(FILLER)]} {i + offset}", label)
            for i in range(n_per) for label, text in INTENTS.items()]


def test_the_split_forward_pass_matches_the_model(tiny_st: Path) -> None:
    st = _load(tiny_st)
    assert unsupported(st) is None
    encoder = TunedEncoder(st, 2)
    assert encoder.start == 1 and len(encoder.top) == 2
    texts = ["where is my card", "my pin got blocked after wrong tries please", "hello"]
    ours = encoder.upper(encoder.lower(texts)).detach().numpy()
    theirs = st.encode(texts, normalize_embeddings=True)
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.abs(encoder.encode(texts) - theirs).max() < 1e-5


def test_frozen_layers_never_drop_out_even_on_a_model_left_in_training_mode(tiny_st: Path) -> None:
    """A shared model someone left in train mode (the ONNX exporter once did) must not make the frozen
    layers' states random: the encoder puts them in eval mode, so two passes agree exactly."""
    import torch

    st = _load(tiny_st)
    st.train()
    for module in st[0].auto_model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5  # the tiny model's own dropout may be 0: make a left-on dropout visible
    encoder = TunedEncoder(st, 2)
    texts = ["where is my card", "my pin got blocked after wrong tries please"]
    first, second = encoder.lower(texts), encoder.lower(texts)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not st[0].auto_model.training


def test_tuning_lowers_the_loss_and_round_trips_through_safetensors(tiny_st: Path, tmp_path: Path) -> None:
    st = _load(tiny_st)
    traces = _label_traces(8)
    texts = [t.request.last_user_message() for t in traces]
    y = np.array([list(INTENTS).index(t.answer_text()) for t in traces])
    encoder = TunedEncoder(st, 2)
    states = dict(zip(texts, encoder.lower(texts)))
    before = encoder.vectors([[t] for t in texts], states)
    metrics = encoder.fine_tune(states, [[t] for t in texts], y, epochs=4, lr=1e-3, classes_per_batch=3,
                                per_class=4, temperature=0.1, seed=0)
    assert metrics["tuned"] and metrics["steps"] == 10 and metrics["loss_last"] < metrics["loss_first"]
    after = encoder.vectors([[t] for t in texts], states)
    assert not np.allclose(before, after)
    # the frozen layers are untouched: a fresh encoder still reproduces the model
    assert np.abs(TunedEncoder(st, 2).encode(texts[:3]) - st.encode(texts[:3], normalize_embeddings=True)).max() < 1e-5
    encoder.save(tmp_path / ENCODER_FILE)
    again = TunedEncoder(st, 2)
    again.load(tmp_path / ENCODER_FILE)
    assert np.abs(again.encode(texts) - after).max() < 1e-5
    # the same seed tunes the same way
    twin = TunedEncoder(st, 2)
    twin.fine_tune(states, [[t] for t in texts], y, epochs=4, lr=1e-3, classes_per_batch=3, per_class=4,
                   temperature=0.1, seed=0)
    assert np.abs(twin.vectors([[t] for t in texts], states) - after).max() < 1e-5
    # too little to contrast: not tuned, and says why
    assert not TunedEncoder(st, 2).fine_tune(states, [[texts[0]], [texts[1]]], np.array([0, 1]), epochs=1, lr=1e-3,
                                             classes_per_batch=2, per_class=2, temperature=0.1, seed=0)["tuned"]


@pytest.fixture
def tuned_ws(workspace: Workspace, tiny_st: Path) -> Workspace:
    from aad_core.models.embedding import clear_caches

    clear_caches()
    workspace.config.embed.embedder = "minilm"
    workspace.config.set_component_param("embedder", "minilm", "model", str(tiny_st))
    workspace.config.set_component_param("embedder", "minilm", "backend", "torch")
    yield workspace
    clear_caches()


@pytest.mark.parametrize("calibration_encoder", ["shared", "cross-fitted"])
def test_the_classifier_trains_and_serves_on_a_tuned_encoder(tuned_ws: Workspace, tmp_path: Path,
                                                             calibration_encoder: str) -> None:
    trainer = ClassifierTrainer(workspace=tuned_ws, tune_epochs=4, tune_lr=1e-3, tune_classes_per_batch=3,
                                calibration_encoder=calibration_encoder, fit_calibration_part=False)
    metrics = trainer.train(_label_traces(12), _label_traces(3, offset=100), tmp_path / "spec", show_progress=False)
    assert metrics["encoder"] == "tuned" and metrics["tuning"]["tuned"] and metrics["n_eval"] == 9
    cal = metrics["calibration"]
    assert len(cal["confidence"]) == len(cal["agreement"]) == 36
    assert ("cross-fitted" in cal["source"]) == (calibration_encoder == "cross-fitted")
    folder = tmp_path / "spec"
    assert (folder / ENCODER_FILE).exists()
    with zipfile.ZipFile(folder / FILE) as z:
        assert all(name.endswith(".npy") for name in z.namelist())
    with np.load(folder / FILE, allow_pickle=False) as saved:
        assert str(saved["encoder"]) == "tuned" and saved["knn_x"].shape == (36, 32)
    with open(folder / ENCODER_FILE, "rb") as f:  # safetensors: a JSON header, then raw tensors
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"]["start"] == "1" and any(k.startswith("2.") for k in header)
    requests = [t.request for t in _label_traces(2, offset=50)]
    first = trainer.load_predictor(folder)
    assert first._encoder is None  # loaded on the first request
    gens = first.generate(requests, max_new_tokens=4)
    again = ClassifierTrainer(workspace=tuned_ws).load_predictor(folder).generate(requests, max_new_tokens=4)
    assert [(g.text, round(g.confidence, 5)) for g in gens] == [(g.text, round(g.confidence, 5)) for g in again]
    assert all(0 < g.confidence <= 1 for g in gens)


def test_frozen_and_untunable_embedders_use_the_router_vectors(tuned_ws: Workspace, tmp_path: Path) -> None:
    metrics = ClassifierTrainer(workspace=tuned_ws, encoder="frozen").train(_label_traces(6), [], tmp_path / "f",
                                                                            show_progress=False)
    assert metrics["encoder"] == "frozen" and "tuning" not in metrics and not (tmp_path / "f" / ENCODER_FILE).exists()
    # too few requests to tune on two halves: the router's vectors, and the reason
    tiny = [make_trace(f"{text} {w}", label) for label, text in INTENTS.items() for w in FILLER[:1]]
    metrics = ClassifierTrainer(workspace=tuned_ws, calibration_encoder="cross-fitted").train(
        tiny, [], tmp_path / "t", show_progress=False)
    assert metrics["encoder"] == "frozen" and "not tuned" in metrics["encoder_note"]
    predictor = ClassifierTrainer(workspace=tuned_ws).load_predictor(tmp_path / "t")
    request = ChatRequest(messages=[Message(role="user", content="my pin got blocked")])
    assert predictor.generate([request], max_new_tokens=4)[0].text in INTENTS


def test_the_untuned_embedders_heads_are_mixed_in_at_frozen_weight(tuned_ws: Workspace, tmp_path: Path) -> None:
    from aad_core.models.embedding import embed_requests

    kwargs = {"workspace": tuned_ws, "tune_epochs": 4, "tune_lr": 1e-3, "tune_classes_per_batch": 3}
    metrics = ClassifierTrainer(frozen_weight=0.4, **kwargs).train(_label_traces(12), [], tmp_path / "mix",
                                                                   show_progress=False)
    assert metrics["encoder"] == "tuned" and metrics["frozen_weight"] == 0.4
    with np.load(tmp_path / "mix" / FILE, allow_pickle=False) as saved:
        assert saved["frozen_knn_x"].shape == saved["knn_x"].shape and float(saved["frozen_weight"]) == 0.4
    requests = [t.request for t in _label_traces(2, offset=50)]
    mixed = ClassifierTrainer(**kwargs).load_predictor(tmp_path / "mix")
    tuned_only = mixed.head.probs(mixed.features(requests))
    frozen_head, weight = mixed.frozen
    frozen_only = frozen_head.probs(embed_requests(requests, mixed.config))
    assert np.allclose(mixed.predict_proba(requests), 0.6 * tuned_only + 0.4 * frozen_only, atol=1e-6)
    assert not np.allclose(tuned_only, frozen_only, atol=1e-3)  # the two heads disagree: the mix matters
    # the gate's calibration pairs are those of the mix: the same number of calls, confidences in (0, 1]
    cal = metrics["calibration"]
    assert len(cal["confidence"]) == 36 and all(0 < c <= 1 for c in cal["confidence"])
    # frozen_weight = 0: the tuned encoder's heads alone, nothing else saved
    ClassifierTrainer(frozen_weight=0.0, **kwargs).train(_label_traces(12), [], tmp_path / "alone", show_progress=False)
    with np.load(tmp_path / "alone" / FILE, allow_pickle=False) as saved:
        assert "frozen_coef" not in saved.files
    assert ClassifierTrainer(**kwargs).load_predictor(tmp_path / "alone").frozen is None


def test_a_part_every_request_shares_is_left_out_of_the_classifiers_view(tuned_ws: Workspace, tmp_path: Path) -> None:
    from aad_plugins.classifier import _constant_parts

    traces = _label_traces(6)
    requests = [t.request for t in traces]
    assert _constant_parts(requests, ["system", "tools", "last_user"], 1000) == ["system", "tools"]
    # a system prompt that varies tells answers apart: kept
    varied = [make_trace("same words", "a", system=f"prompt {i}").request for i in range(3)]
    assert _constant_parts(varied, ["system", "last_user"], 1000) == ["last_user"]
    assert _constant_parts(requests[:1], ["system", "last_user"], 1000) == []  # never every part
    metrics = ClassifierTrainer(workspace=tuned_ws, encoder="frozen").train(traces, [], tmp_path / "v",
                                                                            show_progress=False)
    assert "system" not in metrics["view"] and "last_user" in metrics["view"]
    with np.load(tmp_path / "v" / FILE, allow_pickle=False) as saved:
        assert "system" not in [str(v) for v in saved["view"]]
    # served with the view it was trained on, whatever the request's system prompt
    predictor = ClassifierTrainer(workspace=tuned_ws).load_predictor(tmp_path / "v")
    other = ChatRequest(messages=[Message(role="system", content="a completely different prompt"),
                                  Message(role="user", content=traces[0].request.last_user_message())])
    assert np.allclose(predictor.predict_proba([other]), predictor.predict_proba([traces[0].request]), atol=1e-6)

"""The shared embedding API: views, caching, the router's per-request path, and the real MiniLM."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from _fake_embedder import FakeEmbedder, register_fake_embedder
from aad_core.config import AADSettings
from aad_core.models.embedding import clear_caches, embed_part_lists, embed_requests, embed_texts, get_embedder, trace_view, view_parts
from aad_core.schema import ChatRequest, Message

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}},
         {"type": "function", "function": {"name": "book_hotel", "parameters": {}}}]


def _req(user: str, system: str = "You are a helpful assistant.", tools=None) -> ChatRequest:
    return ChatRequest(messages=[Message(role="system", content=system), Message(role="user", content="first"),
                                 Message(role="assistant", content="ok"), Message(role="user", content=user)],
                       tools=tools)


@pytest.fixture
def fake_config() -> AADSettings:
    register_fake_embedder()
    cfg = AADSettings()
    cfg.embed.embedder = "fake"
    yield cfg
    clear_caches()


def test_trace_view_parts_order_and_truncation() -> None:
    req = _req("What is the weather in Paris?", system="S" * 50, tools=TOOLS)
    text = trace_view(req, ["system", "tools", "last_user"], 20)
    assert text.split("\n") == ["S" * 20, "tools: get_weather, book_hotel"[:20], "What is the weather "]
    assert trace_view(req, ["last_user", "system"], 1000).startswith("What is the weather in Paris?\n")
    assert trace_view(req, ["all_user"], 1000) == "first\nWhat is the weather in Paris?"
    assert trace_view(req, ["answer"], 1000, answer="sunny") == "sunny"
    # A part the request lacks is left out, not embedded as an empty string.
    assert [p for p, _ in view_parts(_req("hi"), ["system", "tools", "last_user"], 100)] == ["system", "last_user"]
    with pytest.raises(ValueError, match="'view' parameter of trace_view"):
        trace_view(req, ["sytem"], 100)


def test_embed_texts_cache_means_reruns_do_not_reembed(fake_config, tmp_path) -> None:
    emb = get_embedder(fake_config)
    texts = ["alpha beta", "gamma delta", "alpha beta", "epsilon"]
    first = embed_texts(texts, emb, cache_dir=tmp_path)
    assert first.shape == (4, 64) and first.dtype == np.float32
    assert FakeEmbedder.calls == [3]  # the repeated text is embedded once
    assert (tmp_path / "embeddings.sqlite").exists()
    again = embed_texts(texts + ["new text"], emb, cache_dir=tmp_path)
    assert FakeEmbedder.calls == [3, 1]  # only the new text
    np.testing.assert_allclose(again[:4], first, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(again, axis=1), 1.0, atol=1e-5)


def test_get_embedder_is_cached_per_name_and_model(fake_config) -> None:
    fake_config.set_component_param("embedder", "fake", "batch_size", 16)
    a = get_embedder(fake_config)
    assert get_embedder(fake_config) is a
    assert a.batch_size == 16  # [embedder.fake] batch_size
    fake_config.set_component_param("embedder", "fake", "model", "other")
    b = get_embedder(fake_config)
    assert b is not a and b.model == "other"


def test_embed_requests_fast_path_matches_batch_path(fake_config, tmp_path) -> None:
    reqs = [_req(f"question number {i} about weather", tools=TOOLS) for i in range(5)]
    one_by_one = np.vstack([embed_requests([r], fake_config) for r in reqs])
    batch = embed_requests(reqs, fake_config, cache_dir=tmp_path)
    np.testing.assert_allclose(one_by_one, batch, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    # The shared system prompt and tool names were embedded once in the per-process cache.
    n_before = sum(FakeEmbedder.calls)
    embed_requests([_req("a brand new question", tools=TOOLS)], fake_config)
    assert sum(FakeEmbedder.calls) - n_before == 1


def test_parts_are_averaged_so_the_user_message_counts(fake_config) -> None:
    long_system = "You classify banking intents. " * 100
    a, b = embed_requests([_req("lost my card", system=long_system), _req("exchange rate today", system=long_system)],
                          fake_config)
    assert float(a @ b) < 0.9
    combined, per_part = embed_part_lists([[("system", "x y"), ("last_user", "z")]], get_embedder(fake_config))
    assert set(per_part) == {"system", "last_user"}
    expected = per_part["system"][0] + per_part["last_user"][0]
    np.testing.assert_allclose(combined[0], expected / np.linalg.norm(expected), atol=1e-6)


def test_importing_the_embedding_api_stays_light() -> None:
    code = ("import sys, aad_core.models.embedding, aad_core.pipeline.cluster, aad_core.pipeline.curate, aad_core.demo.datasets; "
            "bad = [m for m in ('torch', 'sentence_transformers', 'transformers', 'sklearn') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.real_model
def test_real_minilm_embeds_offline_and_separates_meanings() -> None:
    from aad_plugins.minilm import PACKAGED_MODEL_ID, MiniLMEmbedder

    emb = MiniLMEmbedder(batch_size=5)
    assert not hasattr(emb, "model_")  # lazy: nothing loaded before the first embed
    texts = ["How do I reset my card PIN?", "I forgot the PIN of my card, how can I change it?",
             "Write a SQL query listing all authors.", "What's the weather in Berlin tomorrow?"] * 3
    batch = emb.embed(texts)  # 3 batches of texts sorted by token count
    small = emb.embed(texts[:4])  # one batch: the order must come back as given
    assert batch.shape == (12, 384) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(small, batch[:4], atol=1e-4)
    sims = batch[:4] @ batch[:4].T
    assert sims[0, 1] > 0.6 and sims[0, 1] > sims[0, 2] + 0.3 and sims[0, 1] > sims[0, 3] + 0.3
    assert emb.model_id == PACKAGED_MODEL_ID

    clear_caches()
    cfg = AADSettings()
    long_system = "You are the intent classifier of a bank. Answer with one label. " * 40
    v = embed_requests([_req("I lost my card", system=long_system), _req("my card was stolen", system=long_system),
                        _req("what is the euro exchange rate", system=long_system)], cfg)
    # With a ~2,500-character system prompt the user message still decides the neighbours.
    assert v[0] @ v[1] > v[0] @ v[2]
    clear_caches()


@pytest.mark.real_model
def test_real_minilm_onnx_backend_matches_torch_and_exports_once(tmp_path, monkeypatch) -> None:
    from aad_plugins.minilm import MiniLMEmbedder

    monkeypatch.setenv("AAD_CACHE_DIR", str(tmp_path))
    texts = ["How do I reset my card PIN?", "Write a SQL query listing all authors who published in 2020.",
             "tools: get_weather, send_email", "x"]
    torch_emb, onnx_emb = MiniLMEmbedder(backend="torch"), MiniLMEmbedder(backend="onnx")
    vt, vo = torch_emb.embed(texts), onnx_emb.embed(texts)
    assert (torch_emb.backend_, onnx_emb.backend_) == ("torch", "onnx")
    assert float(np.min(np.sum(vt * vo, axis=1))) > 0.9999
    # The export leaves the shared model as it found it: in eval mode, its dropout off (the tuned
    # classifier's frozen layers read it; in train mode a first run in a fresh cache drew other answers).
    bert = onnx_emb.model_[0].auto_model
    assert not bert.training and not any(m.training for m in bert.modules())
    exported = list(tmp_path.glob("embedders/*/model.onnx"))
    assert len(exported) == 1
    mtime = exported[0].stat().st_mtime_ns
    again = MiniLMEmbedder(backend="auto")  # reuses the export
    np.testing.assert_allclose(again.embed(texts[:1]), vo[:1], atol=1e-5)
    assert again.backend_ == "onnx" and exported[0].stat().st_mtime_ns == mtime


def test_minilm_rejects_an_unknown_backend() -> None:
    from aad_plugins.minilm import MiniLMEmbedder

    with pytest.raises(ValueError, match="'backend' parameter of MiniLMEmbedder must be one of"):
        MiniLMEmbedder(backend="tensorrt").embed(["x"])

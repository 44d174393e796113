"""[route] specialist_backend = "openai" (issue 16, "served by vLLM at scale"): LoRA specialists answered by an
OpenAI-compatible endpoint serving many adapters on one base, asked with model=<specialist name>; aad serve as such
an endpoint; and 'aad export vllm'. Tiny random students; the endpoint is aad's own server on 127.0.0.1 (an
ephemeral port) or an httpx mock transport: no other network."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from _chat_stub import running_app  # noqa: E402
from test_router import TEACHER_ANSWER, engine_for, escalations, make_router  # noqa: E402
from test_specialist_speed import SYSTEM, TOOLS, _adapter, peaked_student  # noqa: E402, F401  (module fixture)

from aad_core.schema import ChatRequest, Message, Specialist  # noqa: E402
from aad_core.serving.engine import RoutingEngine  # noqa: E402
from aad_core.serving.openai_backend import (  # noqa: E402
    OpenAISpecialists, SpecialistEndpointError, endpoint_messages, generation_from_completion, remote_unfit)
from aad_core.serving.server import create_app  # noqa: E402
from aad_core.serving.specialists import SpecialistPool  # noqa: E402
from aad_core.workspace import Workspace  # noqa: E402

MAX_NEW = 12


def _promoted(ws: Workspace, student: Path, folder: Path, *, name: str = "cards", cluster_id: int = 0) -> Specialist:
    """A promoted LoRA specialist (a random adapter of rank 4) on ``student``."""
    from aad_core.specialists import SpecialistRegistry

    registry = SpecialistRegistry(ws)
    spec = registry.save(cluster_id=cluster_id, label=name, name=name, adapter_dir=_adapter(student, folder, 3),
                         base_model=str(student), hyperparameters={"trainer": "qlora", "max_length": 384})
    return registry.set_promoted(spec.name, spec.version, True, "test")


def _card_request(**params: Any) -> ChatRequest:
    return ChatRequest(messages=[Message(role="system", content=SYSTEM),
                                 Message(role="user", content="my card has not arrived")], params=params)


def _use_endpoint(ws: Workspace, monkeypatch: pytest.MonkeyPatch, url: str, timeout_s: float = 20.0) -> None:
    """[route] specialist_backend = "openai" at ``url`` (through the environment, as a deployment might)."""
    monkeypatch.setenv("AAD_ROUTE__SPECIALIST_BACKEND", "openai")
    monkeypatch.setenv("AAD_ROUTE__SPECIALIST_BASE_URL", url)
    monkeypatch.setenv("AAD_ROUTE__SPECIALIST_TIMEOUT_S", str(timeout_s))
    ws.__dict__.pop("config", None)


@contextlib.contextmanager
def _running(app: Any) -> Iterator[str]:
    """``app`` on 127.0.0.1 (:func:`running_app`); yields its /v1 base URL."""
    with running_app(app) as url:
        yield f"{url}/v1"


def _free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- through aad's own endpoint --------------------------------------------------------------------
def test_the_openai_backend_answers_through_aads_endpoint_with_the_confidence(
        workspace: Workspace, peaked_student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _promoted(workspace, peaked_student, tmp_path / "adapter")
    pool = SpecialistPool(workspace, [spec], runtime_options={"warmup": False, "batch_window_ms": 0})
    request = _card_request(max_tokens=MAX_NEW)
    reference = pool.generate("cards", [request], max_new_tokens=MAX_NEW)[0]  # in-process, the same adapter
    assert reference.text  # a non-empty answer: the "text" check passes, so the confidence decides below
    server_engine = RoutingEngine(workspace, router=make_router(workspace), specialists=pool, record=False)
    with _running(create_app(workspace, engine=server_engine, capture=False)) as url:
        _use_endpoint(workspace, monkeypatch, url)
        gate = {"confidence_threshold": reference.mean_logprob - 1.0, "confidence_signal": "mean_logprob"}
        engine = engine_for(workspace, None, output_kind="text", confidence=gate)  # backend from [route]
        backend = engine.specialists
        assert isinstance(backend, OpenAISpecialists) and backend.remote == ["cards"] and backend.base_url == url

        decision, outcome = engine.attempt(request)
        assert decision.target == "specialist" and outcome is not None and outcome.ok, decision.reason
        assert outcome.text == reference.text
        assert outcome.mean_logprob == pytest.approx(reference.mean_logprob, abs=1e-6)
        assert outcome.usage.completion_tokens == reference.n_tokens

        # The confidence reaches the risk-coverage gate: a threshold above it escalates, naming the value.
        engine._cluster_info[0]["confidence_threshold"] = reference.mean_logprob + 0.5
        decision, outcome = engine.attempt(request)
        assert decision.escalated and decision.reason.startswith("escalated: low confidence: mean token log-prob")

        # Tools the template renders itself travel as tools: the endpoint renders the prompt aad renders.
        with_tools = ChatRequest(messages=request.messages, tools=TOOLS)
        remote = backend.generate("cards", [with_tools], max_new_tokens=MAX_NEW)[0]
        local = pool.generate("cards", [with_tools], max_new_tokens=MAX_NEW)[0]
        assert remote.text == local.text and remote.mean_logprob == pytest.approx(local.mean_logprob, abs=1e-6)
        assert backend.prompt_too_long("cards", with_tools) == ""  # measured with the base's tokenizer

        # aad serve answers a specialist's name directly, as vLLM answers an adapter's name.
        body = {"model": "cards", "messages": [m.model_dump(exclude_none=True) for m in request.messages],
                "max_tokens": MAX_NEW, "logprobs": True}
        data = httpx.post(f"{url}/chat/completions", json=body, timeout=30).json()
        assert data["model"] == "cards" and data["choices"][0]["message"]["content"] == reference.text
        logprobs = data["choices"][0]["logprobs"]
        assert logprobs["aad_mean_logprob"] == pytest.approx(reference.mean_logprob, abs=1e-6)
        assert logprobs["aad_completion_tokens"] == reference.n_tokens
        assert data["aad_route"]["specialist"] == "cards"
        plain = httpx.post(f"{url}/chat/completions", json={**body, "logprobs": False}, timeout=30).json()
        assert plain["choices"][0]["logprobs"] is None
        models = [m["id"] for m in httpx.get(f"{url}/models", timeout=30).json()["data"]]
        assert models == ["aad-routed", "cards"]
        engine.close()
    server_engine.close()


def test_a_dead_or_hanging_endpoint_sends_the_request_to_the_teacher(
        workspace: Workspace, peaked_student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _promoted(workspace, peaked_student, tmp_path / "adapter")
    port = _free_port()
    _use_endpoint(workspace, monkeypatch, f"http://127.0.0.1:{port}/v1")
    engine = engine_for(workspace, None, output_kind="text")
    answer = engine.answer(_card_request(max_tokens=MAX_NEW))
    assert answer.message.content == TEACHER_ANSWER and answer.decision.escalated
    assert "endpoint unreachable" in answer.decision.reason and f"127.0.0.1:{port}" in answer.decision.reason
    engine.flush()
    (trace,) = escalations(workspace)
    assert trace.metadata["aad_escalation"]["reason"].startswith("exception: SpecialistEndpointError: endpoint")
    engine.close()

    # A server that accepts the connection and never answers: the HTTP timeout, then the teacher.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        _use_endpoint(workspace, monkeypatch, f"http://127.0.0.1:{silent.getsockname()[1]}/v1", timeout_s=0.3)
        engine = engine_for(workspace, None, output_kind="text")
        started = time.perf_counter()
        answer = engine.answer(_card_request(max_tokens=MAX_NEW))
        assert time.perf_counter() - started < 10
    assert answer.message.content == TEACHER_ANSWER
    assert "endpoint timeout" in answer.decision.reason and "within 0.3 s" in answer.decision.reason
    engine.close()


# -- the wire format (a vLLM-shaped endpoint, mocked) ----------------------------------------------
def _fake_lora(folder: Path, *, hints: bool = False) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    if hints:
        (folder / "answer_hints.npz").write_bytes(b"")
    return folder


def _vllm_completion(tokens: list[tuple[str, float]], finish: str = "stop", content: str = "card_arrival") -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "cards",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish,
                         "logprobs": {"content": [{"token": t, "logprob": lp, "bytes": None, "top_logprobs": []}
                                                  for t, lp in tokens]}}],
            "usage": {"prompt_tokens": 30, "completion_tokens": len(tokens), "total_tokens": 30 + len(tokens)}}


def test_requests_and_answers_on_the_wire_as_vllm_speaks_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = Specialist(name="cards", cluster_id=0, version=1, base_model="no-such-base",
                      path=str(_fake_lora(tmp_path / "a")))
    seen: list[tuple[dict, str | None]] = []
    replies: list[httpx.Response] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((json.loads(request.content), request.headers.get("authorization")))
        return replies.pop(0)

    monkeypatch.setenv("AAD_SPECIALIST_API_KEY", "sk-spec")
    backend = OpenAISpecialists(None, [spec], base_url="http://vllm.test/v1/", transport=httpx.MockTransport(handler))
    call = Message.model_validate({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]})
    request = ChatRequest(messages=[Message(role="system", content="Answer briefly."),
                                    Message(role="user", content="weather in Oslo?"), call,
                                    Message(role="tool", content="sunny", tool_call_id="c1"),
                                    Message(role="user", content="and my card?")], tools=TOOLS)

    # vLLM includes the end-of-turn token in logprobs.content; aad's mean leaves it out.
    tokens = [("card", -0.1), ("_arrival", -0.3), ("<|im_end|>", -2.0)]
    replies.append(httpx.Response(200, json=_vllm_completion(tokens)))
    gen = backend.generate("cards", [request], max_new_tokens=7)[0]
    assert gen.text == "card_arrival" and gen.mean_logprob == pytest.approx(-0.2) and gen.n_tokens == 2
    sent, auth = seen[-1]
    assert auth == "Bearer sk-spec" and sent["model"] == "cards" and sent["temperature"] == 0
    assert sent["max_tokens"] == 7 and sent["logprobs"] is True and sent["stream"] is False
    # No tokenizer for this base here: laid out as for a template without tools, as aad trained on it.
    assert "tools" not in sent and "You may call these tools" in sent["messages"][0]["content"]
    assert sent["messages"][2] == {"role": "assistant", "content": '<tool_call>{"name": "get_weather", "arguments": '
                                   '{"city": "Oslo"}}</tool_call>'}
    assert sent["messages"][3]["role"] == "tool" and sent["messages"][3]["content"] == "sunny"

    replies.append(httpx.Response(200, json=_vllm_completion([("card", -0.1), ("_arr", -0.5)], finish="length")))
    assert backend.generate("cards", [request], max_new_tokens=2)[0].mean_logprob == pytest.approx(-0.3)

    no_logprobs = _vllm_completion([])
    replies.append(httpx.Response(200, json=no_logprobs))
    with pytest.raises(SpecialistEndpointError, match="without token log-probs"):
        backend.generate("cards", [request], max_new_tokens=7)
    replies.append(httpx.Response(404, json={"error": {"message": "The model `cards` does not exist."}}))
    with pytest.raises(SpecialistEndpointError, match="HTTP 404 for model 'cards'"):
        backend.generate("cards", [request], max_new_tokens=7)
    replies.append(httpx.Response(200, text="<html>gateway</html>"))
    with pytest.raises(SpecialistEndpointError, match="endpoint answer unreadable"):
        backend.generate("cards", [request], max_new_tokens=7)
    # aad serve's own form: the mean comes as is.
    own = {"choices": [{"message": {"content": " x "}, "finish_reason": "stop",
                        "logprobs": {"content": None, "aad_mean_logprob": -0.25, "aad_completion_tokens": 3}}]}
    gen = generation_from_completion(own, latency_ms=1.0)
    assert (gen.text, gen.mean_logprob, gen.n_tokens) == ("x", -0.25, 3)


def test_tools_the_template_renders_are_sent_as_tools(peaked_student: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(peaked_student)  # its template renders tools and tool calls
    call = Message.model_validate({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]})
    request = ChatRequest(messages=[Message(role="user", content="weather in Oslo?"), call], tools=TOOLS)
    messages, tools = endpoint_messages(request, tokenizer)
    assert tools == TOOLS
    assert messages[1]["tool_calls"] == [{"id": "c1", "type": "function",
                                          "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]


def test_classifiers_and_hinted_adapters_stay_local(tmp_path: Path) -> None:
    classifier = Specialist(name="intent", cluster_id=1, version=1, base_model="x", path=str(tmp_path),
                            kind="classifier")
    hinted = Specialist(name="hinted", cluster_id=2, version=1, base_model="x",
                        path=str(_fake_lora(tmp_path / "h", hints=True)))
    plain = Specialist(name="cards", cluster_id=0, version=1, base_model="x", path=str(_fake_lora(tmp_path / "p")))
    assert "without the generative path" in remote_unfit(classifier) and "answer hints" in remote_unfit(hinted)
    assert remote_unfit(plain) == ""
    backend = OpenAISpecialists(None, [classifier, hinted, plain], base_url="http://127.0.0.1:1/v1")
    assert backend.remote == ["cards"] and set(backend.local_reasons) == {"intent", "hinted"}
    with pytest.raises(ValueError, match="The 'base_url' parameter of OpenAISpecialists must be an http"):
        OpenAISpecialists(None, [plain], base_url="127.0.0.1:8001")


def test_the_openai_backend_needs_a_base_url(tmp_path: Path) -> None:
    from aad_core.config import load_config
    from aad_core.errors import ConfigError

    path = tmp_path / "aad.toml"
    path.write_text('[route]\nspecialist_backend = "openai"\n')
    with pytest.raises(ConfigError, match="The 'specialist_base_url' parameter of \\[route\\]"):
        load_config(path)
    path.write_text('[route]\nspecialist_backend = "openai"\nspecialist_base_url = "http://127.0.0.1:8001/v1"\n')
    route = load_config(path).route
    assert (route.specialist_backend, route.specialist_timeout_s) == ("openai", 10.0)


# -- aad export vllm -------------------------------------------------------------------------------
def test_export_vllm_writes_adapters_peft_loads_and_the_serve_command(
        workspace: Workspace, peaked_student: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from aad_core.cli import app
    from aad_core.specialists import SpecialistRegistry

    _promoted(workspace, peaked_student, tmp_path / "adapter")
    registry = SpecialistRegistry(workspace)
    (tmp_path / "clf").mkdir()
    (tmp_path / "clf" / "classifier.npz").write_bytes(b"")
    clf = registry.save(cluster_id=1, label="intent", name="intent", adapter_dir=tmp_path / "clf", base_model="minilm",
                        kind="classifier", trainer="classifier")
    registry.set_promoted(clf.name, clf.version, True, "test")
    out = tmp_path / "vllm"
    runner = CliRunner()
    result = runner.invoke(app, ["export", "vllm", str(out), "-w", str(workspace.root), "--port", "8011"])
    assert result.exit_code == 0, result.output
    assert "stays local" in result.output and 'specialist_backend = "openai"' in result.output

    base = str(Path(peaked_student).resolve())
    config = json.loads((out / "cards" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == base and config["r"] == 4
    assert sorted(p.name for p in (out / "cards").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not (out / "intent").exists()
    base_model = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base_model, out / "cards")
    assert model.peft_config["default"].r == 4 and any("lora_B" in n for n, _ in model.named_parameters())

    serve = (out / "serve.sh").read_text()
    assert serve.startswith("#!/bin/sh") and (out / "serve.sh").stat().st_mode & 0o111
    assert f"exec vllm serve {base} \\" in serve and "--max-lora-rank 8" in serve and "--enable-lora" in serve
    assert 'cards="$HERE/cards"' in serve and '"$@"' in serve and "intent" not in serve
    readme = (out / "README.md").read_text()
    assert f"--lora-modules \\\n    cards={out.resolve()}/cards" in readme and "--dtype bfloat16" in readme
    assert 'specialist_base_url = "http://127.0.0.1:8011/v1"' in readme and "AAD_SPECIALIST_API_KEY" in readme
    assert "| intent | classifier | kind 'classifier'" in readme

    data = json.loads(runner.invoke(app, ["export", "vllm", str(out), "-w", str(workspace.root), "--json"]).stdout)
    assert data["max_lora_rank"] == 8 and [a["name"] for a in data["adapters"]] == ["cards"]
    assert data["command"].startswith(f"vllm serve {base} --enable-lora --max-lora-rank 8 --max-loras 1")

    empty = Workspace.init(tmp_path / "empty")
    failed = runner.invoke(app, ["export", "vllm", str(tmp_path / "none"), "-w", str(empty.root)])
    assert failed.exit_code == 1 and "nothing to export" in failed.output and "aad distill" in failed.output

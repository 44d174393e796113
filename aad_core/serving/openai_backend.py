"""LoRA specialists answered by an OpenAI-compatible endpoint (``[route] specialist_backend = "openai"``).

vLLM serves many LoRA adapters on one base model (``vllm serve BASE --enable-lora --lora-modules
name=path ...``; ``aad export vllm`` writes the adapters and the command) and answers
``POST {base_url}/chat/completions`` with ``model=<adapter name>``; so does ``aad serve`` for a
promoted specialist's name. :class:`OpenAISpecialists` is a
:class:`~aad_core.serving.specialists.SpecialistBackend` that sends each LoRA specialist's requests
there:

- the messages laid out as the specialist's chat template got them in training
  (:func:`aad_core.models.chat_format.template_messages`: tools in the system message and tool calls
  as ``<tool_call>`` text when the template has no place for them), so that the endpoint, applying
  the same template, renders the same prompt; tools the template renders itself are sent as ``tools``
  with ``tool_choice: "none"`` (the engine parses the calls from the text, as it does locally);
- ``temperature: 0``, ``max_tokens``, ``logprobs: true``: the confidence signal of the risk-coverage
  gate, the mean token log-prob of the answer (end-of-turn token excluded, as aad's runtime counts
  it), is computed from ``choices[0].logprobs``.

Classifiers answer without the generative path, and adapters with answer hints need aad's runtime
(:func:`remote_unfit` says why): both stay in-process (a :class:`SpecialistPool`). An unreachable
endpoint, a timeout, an HTTP error or an answer without log-probs raises
:class:`SpecialistEndpointError`; the routing engine sends the request to the teacher with that
reason, so the endpoint never breaks the teacher path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError, param_error
from aad_core.schema import ChatRequest, Specialist
from aad_core.serving.specialists import GenerationLike, SpecialistBackend, SpecialistPool, trained_max_length

if TYPE_CHECKING:
    from aad_core.models.runtime import Generation
    from aad_core.workspace import Workspace

log = logging.getLogger(__name__)

#: The environment variable holding the endpoint's API key (sent as a bearer token; unset = none).
SPECIALIST_KEY_ENV = "AAD_SPECIALIST_API_KEY"
#: End-of-turn tokens as endpoints spell them in ``logprobs.content`` (when the tokenizer is not known).
_END_TOKEN = re.compile(r"<\|(im_end|endoftext|eot_id|end)\|>|</s>|<eos>|<end_of_turn>")
_FIX = ("Check [route] specialist_base_url and that the endpoint serves the adapters ('aad export vllm' writes "
        "the command).")


class SpecialistEndpointError(AADError):
    """The specialist endpoint failed: unreachable, too slow, an HTTP error or an unreadable answer. Its
    message (one line, without the hint) is the escalation's reason."""

    def __str__(self) -> str:
        return self.message


def remote_unfit(spec: Specialist) -> str:
    """Why an OpenAI-compatible endpoint cannot answer as ``spec`` does in aad's runtime ("" = it can):
    such a specialist stays in-process, and ``aad export vllm`` lists it as staying local."""
    if spec.kind != "lora":
        return f"kind {spec.kind!r}: it answers without the generative path, in-process after routing"
    from aad_core.models.answer_bank import HINTS_FILE

    folder = Path(spec.path)
    if (folder / HINTS_FILE).exists():
        return ("answer hints: aad's runtime adds the answers of the nearest training requests to its prompts "
                "(and may pick among candidate labels), which an OpenAI endpoint cannot")
    try:
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"no readable adapter_config.json ({type(err).__name__})"
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        return f"peft_type {config.get('peft_type')!r}: vLLM serves LoRA adapters only"
    if config.get("use_dora"):
        return "a DoRA adapter: vLLM serves plain LoRA adapters only"
    if config.get("modules_to_save"):
        return f"modules_to_save {config['modules_to_save']}: vLLM loads the LoRA matrices only"
    if not (folder / "adapter_model.safetensors").exists():
        return "no adapter_model.safetensors"
    return ""


def endpoint_messages(request: ChatRequest, tokenizer: Any | None
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """``request``'s messages (and the tools its template renders) in the OpenAI wire format, laid out as the
    specialist's chat template (``tokenizer``'s; None = a template without tools) got them in training."""
    from aad_core.models.chat_format import template_messages

    messages, tools = template_messages(tokenizer, request)
    for message in messages:
        if message.get("tool_calls"):  # templates take dict arguments; the wire takes JSON strings
            message["tool_calls"] = [
                {"id": call.get("id") or f"call_{i}", "type": "function",
                 "function": {"name": call["function"]["name"], "arguments": _json_text(call["function"]["arguments"])}}
                for i, call in enumerate(message["tool_calls"])]
    return messages, tools


def _json_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def generation_from_completion(data: dict[str, Any], *, latency_ms: float,
                               end_tokens: frozenset[str] = frozenset()) -> Generation:
    """A :class:`~aad_core.models.runtime.Generation` from an OpenAI chat completion with logprobs: the text,
    and the mean log-prob of the answer's tokens without the end-of-turn token (``end_tokens``, else the usual
    spellings), as aad's runtime counts it. ``aad serve`` reports the mean itself (``aad_mean_logprob``).
    Raises :class:`SpecialistEndpointError` when the completion holds no log-probs."""
    from aad_core.models.runtime import Generation

    choice = data["choices"][0]
    text = str((choice.get("message") or {}).get("content") or "").strip()
    logprobs = choice.get("logprobs") or {}
    usage = data.get("usage") or {}
    if logprobs.get("aad_mean_logprob") is not None:
        n = int(logprobs.get("aad_completion_tokens") or usage.get("completion_tokens") or 0)
        return Generation(text=text, mean_logprob=float(logprobs["aad_mean_logprob"]), n_tokens=n,
                          latency_ms=latency_ms)
    entries = [e for e in logprobs.get("content") or [] if isinstance(e, dict) and e.get("logprob") is not None]
    if not entries:
        raise SpecialistEndpointError(
            "endpoint answer without token log-probs (the confidence signal): the endpoint ignored 'logprobs'",
            hint="Serve the specialists with vLLM (it returns logprobs on request) or 'aad serve'.")
    values = [float(e["logprob"]) for e in entries]
    last = str(entries[-1].get("token") or "")
    ended = choice.get("finish_reason") == "stop" and (last in end_tokens or bool(_END_TOKEN.fullmatch(last)))
    # aad's runtime leaves the end-of-turn token out of the mean (an answer of it alone: its log-prob)
    answer = values[:-1] if ended else values
    mean = sum(answer) / len(answer) if answer else values[0]
    return Generation(text=text, mean_logprob=mean, n_tokens=len(answer), latency_ms=latency_ms)


class OpenAISpecialists:
    """The promoted specialists, the LoRA ones answered by an OpenAI-compatible endpoint (vLLM with
    ``--enable-lora``, or ``aad serve``) as ``model=<specialist name>``; those :func:`remote_unfit` rejects
    (classifiers, adapters with answer hints) by an in-process :class:`SpecialistPool`.

    Parameters
    ----------
    ws : Workspace or None
        The workspace (the in-process specialists' settings).
    specialists : sequence of Specialist
        The promoted specialists.
    base_url : str
        The endpoint's OpenAI-compatible base URL, e.g. ``http://127.0.0.1:8001/v1``.
    api_key : str or None
        Bearer token (None = ``$AAD_SPECIALIST_API_KEY``; unset = no Authorization header).
    timeout_s : float
        HTTP timeout of one request (connect and read).
    transport : httpx transport or None
        For tests (``httpx.MockTransport``).
    """

    def __init__(self, ws: Workspace | None, specialists: Sequence[Specialist], *, base_url: str,
                 api_key: str | None = None, timeout_s: float = 10.0, transport: Any = None) -> None:
        if not isinstance(base_url, str) or not re.match(r"https?://[^/\s]+", base_url):
            raise param_error("base_url", "OpenAISpecialists", "an http:// or https:// URL such as "
                              "'http://127.0.0.1:8001/v1'", base_url)
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise param_error("timeout_s", "OpenAISpecialists", "a number of seconds > 0", timeout_s)
        self.ws = ws
        self.specialists = {s.name: s for s in specialists}
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(SPECIALIST_KEY_ENV) or None
        self.timeout_s = float(timeout_s)
        self.transport = transport
        #: The specialists answered in-process, with why (name -> reason).
        self.local_reasons = {s.name: why for s in specialists if (why := remote_unfit(s))}
        self.local = SpecialistPool(ws, [s for s in specialists if s.name in self.local_reasons])
        self._client: Any = None
        self._tokenizers: dict[str, Any] = {}  # base model -> its tokenizer (None: could not be loaded)
        self._lock = threading.Lock()
        self._count_lock = threading.Lock()

    @classmethod
    def from_config(cls, ws: Workspace, specialists: Sequence[Specialist]) -> OpenAISpecialists:
        """The backend ``[route] specialist_base_url`` / ``specialist_timeout_s`` describe."""
        route = ws.config.route
        if not route.specialist_base_url:
            raise AADError("[route] specialist_backend = \"openai\" needs [route] specialist_base_url.",
                           hint="Set it to the endpoint's base URL, e.g. 'http://127.0.0.1:8001/v1' "
                           "('aad export vllm' prints the lines).")
        return cls(ws, specialists, base_url=route.specialist_base_url, timeout_s=route.specialist_timeout_s)

    @property
    def remote(self) -> list[str]:
        """The specialists the endpoint answers."""
        return [name for name in self.specialists if name not in self.local_reasons]

    def _spec(self, name: str) -> Specialist:
        spec = self.specialists.get(name)
        if spec is None:
            raise AADError(f"No promoted specialist named {name!r}.", hint="Run 'aad specialists' to list them.")
        return spec

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import httpx

                self._client = httpx.Client(timeout=self.timeout_s, transport=self.transport)
            return self._client

    def tokenizer(self, spec: Specialist) -> Any | None:
        """The tokenizer of ``spec``'s base model (its chat template and token count), loaded once; None when it
        cannot be loaded here (then tools are folded into the system message and prompts are not measured)."""
        with self._lock:
            if spec.base_model not in self._tokenizers:
                self._tokenizers[spec.base_model] = _load_tokenizer(spec.base_model)
            return self._tokenizers[spec.base_model]

    # -- SpecialistBackend --------------------------------------------------------------------
    def generate(self, name: str, requests: list[ChatRequest], *, max_new_tokens: int) -> list[GenerationLike]:
        spec = self._spec(name)
        if name in self.local_reasons:
            return self.local.generate(name, requests, max_new_tokens=max_new_tokens)
        return [self._ask(spec, request, max_new_tokens) for request in requests]

    def prompt_too_long(self, name: str, request: ChatRequest) -> str:
        """Why ``request`` is too long for the specialist ("" when it fits, or when it cannot be measured here)."""
        spec = self._spec(name)
        if name in self.local_reasons:
            return self.local.prompt_too_long(name, request)
        limit = trained_max_length(spec)
        tok = self.tokenizer(spec) if limit is not None else None
        if tok is None:
            return ""
        from aad_core.models.chat_format import prompt_text

        with self._count_lock:  # a fast tokenizer is not safe to share between threads
            n = len(tok(prompt_text(tok, request), add_special_tokens=False)["input_ids"])
        return f"prompt {n} tokens > specialist max_length {limit}" if n > limit else ""

    def preload(self) -> None:
        """Load the in-process specialists and the endpoint specialists' tokenizers now."""
        self.local.preload()
        for name in self.remote:
            self.tokenizer(self.specialists[name])

    # -- one request --------------------------------------------------------------------------
    def _ask(self, spec: Specialist, request: ChatRequest, max_new_tokens: int) -> Generation:
        import httpx

        tok = self.tokenizer(spec)
        messages, tools = endpoint_messages(request, tok)
        body: dict[str, Any] = {"model": spec.name, "messages": messages, "temperature": 0,
                                "max_tokens": max_new_tokens, "logprobs": True, "top_logprobs": 0, "stream": False}
        if tools:  # the template renders them; the calls are parsed from the text, as in-process
            body["tools"], body["tool_choice"] = tools, "none"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        url = f"{self.base_url}/chat/completions"
        started = time.perf_counter()
        try:
            resp = self.client().post(url, json=body, headers=headers)
        except httpx.TimeoutException as err:
            raise SpecialistEndpointError(f"endpoint timeout: {url} did not answer within {self.timeout_s:g} s "
                                          f"({type(err).__name__})", hint=_FIX) from None
        except httpx.HTTPError as err:
            raise SpecialistEndpointError(f"endpoint unreachable: {url}: {type(err).__name__}: {err}",
                                          hint=_FIX) from None
        latency = (time.perf_counter() - started) * 1000
        if resp.status_code >= 400:
            raise SpecialistEndpointError(f"endpoint error: {url} answered HTTP {resp.status_code} for model "
                                          f"{spec.name!r}: {resp.text[:200]}", hint=_FIX)
        try:
            return generation_from_completion(resp.json(), latency_ms=latency, end_tokens=_end_tokens(tok))
        except SpecialistEndpointError:
            raise
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            raise SpecialistEndpointError(f"endpoint answer unreadable: {type(err).__name__}: {err}: "
                                          f"{resp.text[:200]}", hint=_FIX) from None


def specialist_backend(ws: Workspace, specialists: Sequence[Specialist]) -> SpecialistBackend:
    """The backend ``[route] specialist_backend`` names for ``specialists``: ``"local"``, a :class:`SpecialistPool`
    (aad's runtime, in-process); ``"openai"``, an :class:`OpenAISpecialists`."""
    if ws.config.route.specialist_backend == "openai":
        return OpenAISpecialists.from_config(ws, specialists)
    return SpecialistPool(ws, specialists)


def _load_tokenizer(base_model: str) -> Any | None:
    try:
        from transformers import AutoTokenizer

        from aad_core.models.quiet import quiet_loading
        from aad_core.models.students import resolve_student

        with quiet_loading():
            return AutoTokenizer.from_pretrained(resolve_student(base_model), trust_remote_code=False)
    except Exception as err:  # the endpoint can still answer: tools folded, prompts not measured
        log.warning("specialist endpoint: could not load the tokenizer of %s (%s: %s); tools are sent in the "
                    "system message and prompt lengths are not checked", base_model, type(err).__name__, err)
        return None


def _end_tokens(tokenizer: Any | None) -> frozenset[str]:
    if tokenizer is None:
        return frozenset()
    return frozenset(str(t) for t in [tokenizer.eos_token, *getattr(tokenizer, "all_special_tokens", [])] if t)

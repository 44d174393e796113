"""The data model shared by every stage: traces in the OpenAI chat format, clusters, specialists,
routing decisions.

A :class:`Trace` is one call of the agent to its teacher LLM. Whatever captured it (LangChain,
LlamaIndex, an OpenAI JSONL file), it is stored in the same shape, so later stages never care
where it came from.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
import uuid
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _new_id() -> str:
    return str(uuid.uuid4())


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class FunctionCall(_Model):
    name: str
    #: JSON-encoded arguments, as the OpenAI API sends them.
    arguments: str = "{}"

    def parsed_arguments(self) -> Any:
        """The arguments decoded from JSON (``{}`` for an empty string)."""
        return json.loads(self.arguments) if self.arguments.strip() else {}


class ToolCall(_Model):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    """One chat message in the OpenAI chat-completions format."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    role: Role
    #: Text, or a list of content parts (``{"type": "text", "text": ...}``), or None for an
    #: assistant message that only calls tools.
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text content, with content parts joined by newlines."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(str(p.get("text", "")) for p in self.content if isinstance(p, dict))


class ChatRequest(_Model):
    """What the agent sent: messages, bound tools (OpenAI ``tools`` schema) and parameters."""

    messages: list[Message]
    tools: list[dict[str, Any]] | None = None
    #: Invocation parameters other than messages/tools: model, temperature, max_tokens, stop, ...
    params: dict[str, Any] = Field(default_factory=dict)

    def tool_names(self) -> list[str]:
        names = []
        for tool in self.tools or []:
            fn = tool.get("function", tool)
            if isinstance(fn, dict) and fn.get("name"):
                names.append(str(fn["name"]))
        return names

    def system_prompt(self) -> str:
        return "\n".join(m.text() for m in self.messages if m.role in ("system", "developer"))

    def last_user_message(self) -> str:
        for m in reversed(self.messages):
            if m.role == "user":
                return m.text()
        return ""


class Usage(_Model):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TopLogprob(_Model):
    token: str
    logprob: float


class TokenLogprob(_Model):
    """The teacher's log-prob of one answer token, with its top-k alternatives when known."""

    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


#: Longest ``Trace.session_id`` / ``Trace.user_id`` accepted (an id chosen by the application, not free text).
MAX_IDENTITY_CHARS = 256


def check_identity(value: Any, name: str = "session_id") -> str | None:
    """``value`` as a session or user id: a string (a whole number is taken as its text) of at most
    :data:`MAX_IDENTITY_CHARS` characters without control characters; None or blank -> None. Raises
    ValueError naming the field otherwise."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        what = "conversation" if name == "session_id" else "end user"
        raise ValueError(f"Trace.{name} must be a string (the application's id of the {what}). "
                         f"Got {type(value).__name__} instead.")
    value = value.strip()
    if not value:
        return None
    if len(value) > MAX_IDENTITY_CHARS:
        raise ValueError(f"Trace.{name} must be at most {MAX_IDENTITY_CHARS} characters. Got {len(value)} "
                         f"({value[:40]!r}...); use a shorter id, e.g. a hash of it.")
    bad = next((c for c in value if unicodedata.category(c) in ("Cc", "Cs")), None)
    if bad is not None:
        raise ValueError(f"Trace.{name} must not contain control characters. Got {value[:80]!r} (with "
                         f"{bad!r}); remove them from the id.")
    return value


class Trace(_Model):
    """One recorded LLM call. ``id`` is the idempotency key of the store."""

    id: str = Field(default_factory=_new_id)
    created_at: datetime = Field(default_factory=_now)
    #: What captured it: "langchain", "llamaindex", "openai-chat", "openai-ft", "aad", "router", ...
    source: str = "unknown"
    #: The agent node / sub-task tag, when the user gave one (``metadata={"aad_task": ...}``).
    task: str | None = None
    run_id: str | None = None
    parent_run_id: str | None = None
    #: The conversation (thread) the call belongs to, as the application names it: LangChain metadata
    #: ``session_id`` / ``thread_id`` / ``conversation_id``, ``session_id`` of an ingested record.
    session_id: str | None = None
    #: The application's end user: metadata ``user_id``, OpenAI's ``user`` parameter. Redacted on capture: an
    #: id holding personal data (an e-mail address) becomes a keyed pseudonym, ``<EMAIL_ADDRESS>-`` and 12 hex
    #: digits, the same for the same id in one workspace (the ``presidio`` redactor; ``session_id`` too).
    user_id: str | None = None
    model: str | None = None
    request: ChatRequest
    response: Message | None = None
    usage: Usage | None = None
    latency_ms: float | None = None
    #: Recorded cost of the call in USD, when known.
    cost: float | None = None
    teacher_logprobs: list[TokenLogprob] | None = None
    status: Literal["ok", "error"] = "ok"
    error: str | None = None
    redacted: bool = False
    feedback: dict[str, Any] | None = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("session_id", "user_id", mode="before")
    @classmethod
    def _identity(cls, value: Any, info: ValidationInfo) -> str | None:
        return check_identity(value, info.field_name or "session_id")

    def answer_text(self) -> str:
        return self.response.text() if self.response else ""


class Cluster(_Model):
    """A task cluster found in the traces (S3)."""

    id: int
    label: str
    keywords: list[str] = Field(default_factory=list)
    size: int
    #: Mean squared distance of the members' (unit-normalised) embeddings to the centroid: the
    #: seed paper's sigma^2.
    variance: float
    mean_similarity: float
    routine: bool
    share_calls: float = 0.0
    share_tokens: float = 0.0
    share_cost: float = 0.0
    centroid: list[float] = Field(default_factory=list)
    #: Dominant task tag among the members, when traces carry one.
    task: str | None = None
    #: The task's output kind (aad_core.formats.kinds) and its distillability estimate with the figures
    #: it is made of (aad_core.pipeline.distillability); None for topic clusters and older files.
    answer_kind: str | None = None
    estimate: dict[str, Any] | None = None


class Specialist(_Model):
    """A trained specialist for one cluster (a LoRA adapter, a classifier, ...), as recorded in its manifest."""

    name: str
    cluster_id: int
    version: int
    base_model: str
    path: str
    #: The specialist kind (the trainer's ``kind``): "lora" (manifests written before kinds existed), "classifier", ...
    kind: str = "lora"
    #: The trainer component that trained it (and serves it, for kinds other than "lora"); None = unknown.
    trainer: str | None = None
    promoted: bool = False
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=_now)
    aad_version: str = ""


class RoutingDecision(_Model):
    """Why a request went where it went."""

    #: Who answers: the specialist, a middle tier of the cascade (``[route] tiers``), or the teacher.
    target: Literal["specialist", "tier", "teacher"]
    cluster_id: int | None = None
    specialist: str | None = None
    similarity: float | None = None
    threshold: float | None = None
    reason: str
    #: True when a specialist answered but a check failed and the teacher answered instead.
    escalated: bool = False
    latency_ms: float | None = None
    #: The tier that answered, set by the routing engine: "specialist", a middle tier's name, or "teacher".
    tier: str | None = None


# -- request identity (curation, clustering and routing share it) ---------------------------------


def request_key(trace: Trace) -> str:
    """sha256 of the request's messages and tools (what makes two calls exact duplicates)."""
    payload = {
        "messages": [m.model_dump(mode="json", exclude_none=True) for m in trace.request.messages],
        "tools": trace.request.tools or [],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def context_key(trace: Trace) -> str:
    """sha256 of the system prompt and tool names: calls sharing it come from the same agent node."""
    ctx = trace.request.system_prompt() + "\x00" + "\x00".join(trace.request.tool_names())
    return hashlib.sha256(ctx.encode()).hexdigest()


def node_key(trace: Trace | ChatRequest) -> str:
    """sha256 of the system prompt: calls sharing it come from the same agent node (whatever tools
    each call binds). Takes a trace or a bare request."""
    request = trace.request if hasattr(trace, "request") else trace
    return hashlib.sha256(request.system_prompt().encode()).hexdigest()


#: Metadata keys of the run tree, written by the LangChain and LlamaIndex handlers: the root run of the
#: pipeline invocation the call belongs to (shared by all its calls), and the runs from that root down to the
#: call's parent, ``[{"run_id": ..., "name": ...}, ...]``.
ROOT_RUN_METADATA_KEY = "aad_root_run_id"
RUN_PATH_METADATA_KEY = "aad_run_path"


def root_run_id(trace: Trace) -> str:
    """The id of the root run of the trace's pipeline invocation (``metadata["aad_root_run_id"]``); a call
    recorded without one is its own root (its run id, else its trace id)."""
    root = trace.metadata.get(ROOT_RUN_METADATA_KEY) if isinstance(trace.metadata, dict) else None
    return str(root) if isinstance(root, str) and root else (trace.run_id or trace.id)


def run_path(trace: Trace) -> list[dict[str, str]]:
    """The runs above the call, root first (``metadata["aad_run_path"]``): ``[{"run_id", "name"}, ...]``;
    entries that are not of that shape are skipped."""
    path = trace.metadata.get(RUN_PATH_METADATA_KEY) if isinstance(trace.metadata, dict) else None
    if not isinstance(path, list):
        return []
    return [{"run_id": str(p["run_id"]), "name": str(p.get("name") or "")}
            for p in path if isinstance(p, dict) and isinstance(p.get("run_id"), str) and p["run_id"]]


#: ``Trace.source`` values whose response is a specialist's answer, not the teacher's.
SPECIALIST_SOURCES = frozenset({"specialist"})
#: Metadata key of a middle tier's call of the cascade (its name): such an answer is never training data.
TIER_METADATA_KEY = "aad_tier"


def is_specialist_answer(trace: Trace) -> bool:
    """The trace's response came from a specialist, not the teacher: its source is a specialist one,
    it carries the tag ``specialist``, or its routing record (``metadata["aad_route"]``, as ``aad serve``
    answers carry it) says a specialist answered. Such a trace is never training data: a specialist
    must not learn from its own answers. A middle tier's answer of the cascade (target ``"tier"``, or
    ``metadata["aad_tier"]``) counts as one too: only the teacher's answers are training targets."""
    meta = trace.metadata if isinstance(trace.metadata, dict) else {}
    route = meta.get("aad_route")
    return (trace.source in SPECIALIST_SOURCES or "specialist" in trace.tags or bool(meta.get(TIER_METADATA_KEY))
            or (isinstance(route, dict) and route.get("target") in ("specialist", "tier")))


#: ``Trace.source`` of a trace made by ``aad augment``: a teacher-answered paraphrase of a training call.
AUGMENTED_SOURCE = "augmented"
#: Metadata key of an augmented trace: ``{"original_id": ..., "check": ..., "prompt": ...}``.
AUGMENT_METADATA_KEY = "aad_augmented"


def augmented_from(trace: Trace) -> str | None:
    """The id of the recorded call an augmented trace paraphrases (``""`` when its link is missing); None
    for any other trace. Such a trace is training data only: the cluster stage never holds it out."""
    if trace.source != AUGMENTED_SOURCE:
        return None
    meta = trace.metadata.get(AUGMENT_METADATA_KEY) if isinstance(trace.metadata, dict) else None
    original = meta.get("original_id") if isinstance(meta, dict) else None
    return str(original) if original else ""

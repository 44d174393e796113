"""Cascade tiers: the specialist, then middle tiers, then the teacher; each tier escalates to the next.

A *middle tier* is any model between the distilled specialist and the teacher: an OpenAI-compatible
endpoint (``[[route.tiers]]`` in aad.toml, :class:`OpenAITier`), a LangChain chat model
(``aad_langchain.LangChainTier``) or a function (:class:`FunctionTier`). When the specialist does not
answer (the router chose the teacher, or the specialist's answer failed a check), the middle tiers
are tried in order; the first whose answer passes its gate answers the user, and the teacher answers
only when every tier declined. A tier's gate:

- ``tasks`` (optional): the tier only sees requests of these tasks (task tags, cluster labels or
  cluster ids; a request of a teacher-only agent node counts as the tasks of that node's clusters);
- the task's output validators, the same the specialist's answers pass (:func:`validate_output` with the
  cluster's calibrated output kind: JSON, SQL, tool calls, labels; a bound tool's schema; ``response_format``);
- ``min_mean_logprob`` (optional): the answer's mean token log-prob must reach it (an answer without
  log-probs fails it);
- ``timeout_s``: a slower tier is skipped.

Who answered is the decision's ``tier`` (``"specialist"``, the tier's name or ``"teacher"``, target
``"tier"`` for a middle tier), in ``aad_route`` and the serving counters (``aad monitor``). A middle
tier's answer is never recorded as a trace and never becomes training data
(:func:`aad_core.schema.is_specialist_answer`); the teacher's answer after rejected tiers is an
escalation trace whose ``metadata["aad_escalation"]["tiers"]`` lists each tier's rejected answer.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aad_core.errors import AADError
from aad_core.schema import TIER_METADATA_KEY, ChatRequest, Message, RoutingDecision, Usage

if TYPE_CHECKING:
    from aad_core.config import RouteConfig, TierConfig
    from aad_core.serving.engine import RoutingEngine
    from aad_core.serving.routed_call import SpecialistOutcome

__all__ = ["TIER_METADATA_KEY", "Cascade", "FunctionTier", "OpenAITier", "Tier", "TierOutcome", "TierReply", "as_tier",
           "mean_logprob_of", "tiers_from_config"]

log = logging.getLogger(__name__)

#: Seconds a middle tier may take by default.
DEFAULT_TIER_TIMEOUT_S = 30.0
#: Parameters of the user's request not forwarded to a middle tier's endpoint.
_NOT_FORWARDED = ("model", "stream", "stream_options", "aad")


@dataclass
class TierReply:
    """What a middle tier's model returned (before any check)."""

    message: Message
    #: Mean token log-prob of the answer, when the model reports log-probs.
    mean_logprob: float | None = None
    usage: Usage | None = None
    #: The model name the tier reports (default: the tier's name).
    model: str | None = None


@dataclass
class TierOutcome:
    """One middle tier's attempt at a request: ``ok`` with the checked ``message``, or why not."""

    tier: str
    ok: bool
    reason: str = ""
    message: Message | None = None
    text: str = ""
    mean_logprob: float | None = None
    usage: Usage | None = None
    model: str | None = None
    latency_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The attempt without the message object: what escalation traces record per tier."""
        return {"tier": self.tier, "ok": self.ok, "reason": self.reason, "output": self.text,
                "mean_logprob": self.mean_logprob, "model": self.model, "latency_ms": round(self.latency_ms, 3)}


def _check_name(name: Any, owner: str) -> str:
    from aad_core.config import RESERVED_TIER_NAMES

    if not isinstance(name, str) or not name.strip() or name in RESERVED_TIER_NAMES:
        raise ValueError(f"The 'name' parameter of {owner} must be a non-empty name other than "
                         f"{' and '.join(map(repr, RESERVED_TIER_NAMES))}. Got {name!r} instead.")
    return name


class Tier:
    """A middle tier of the cascade. Subclasses implement :meth:`generate`.

    Parameters
    ----------
    name : str
        Shown in ``aad_route["tier"]``, the serving counters and ``aad monitor``.
    tasks : sequence of str or int, or None
        The tasks it may answer (task tags, cluster labels or cluster ids); None = every task.
    min_mean_logprob : float or None
        Confidence gate on the answer's mean token log-prob (None = validators only).
    timeout_s : float
        A slower answer goes on to the next tier.
    """

    def __init__(self, name: str, *, tasks: Sequence[str | int] | None = None, min_mean_logprob: float | None = None,
                 timeout_s: float = DEFAULT_TIER_TIMEOUT_S) -> None:
        owner = type(self).__name__
        self.name = _check_name(name, owner)
        if tasks is not None and (isinstance(tasks, (str, bytes)) or not list(tasks)):
            raise ValueError(f"The 'tasks' parameter of {owner} must be a non-empty list of task tags, cluster "
                             f"labels or cluster ids, or None. Got {tasks!r} instead.")
        self.tasks: tuple[str, ...] | None = None if tasks is None else tuple(str(t) for t in tasks)
        if min_mean_logprob is not None and (not isinstance(min_mean_logprob, (int, float)) or min_mean_logprob > 0):
            raise ValueError(f"The 'min_mean_logprob' parameter of {owner} must be a number <= 0 or None. "
                             f"Got {min_mean_logprob!r} instead.")
        self.min_mean_logprob = None if min_mean_logprob is None else float(min_mean_logprob)
        if not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
            raise ValueError(f"The 'timeout_s' parameter of {owner} must be a number of seconds > 0. "
                             f"Got {timeout_s!r} instead.")
        self.timeout_s = float(timeout_s)

    def serves(self, task_keys: Iterable[str]) -> bool:
        """Whether the tier may answer a request of these tasks (always, without ``tasks``)."""
        return self.tasks is None or bool(set(self.tasks) & set(task_keys))

    def generate(self, request: ChatRequest) -> TierReply:
        """The tier's answer to ``request`` (may raise: the cascade then goes on to the next tier)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, tasks={self.tasks!r})"


def reply_of(result: Any) -> TierReply:
    """A :class:`TierReply` from a tier function's result: a TierReply, a Message, an OpenAI chat
    completion dict (log-probs read from ``choices[0].logprobs``) or a string."""
    from aad_core.serving.routed_call import teacher_result

    if isinstance(result, TierReply):
        return result
    message, usage, model = teacher_result(result)
    logprobs = None
    if isinstance(result, dict) and result.get("choices"):
        logprobs = (result["choices"][0] or {}).get("logprobs")
    return TierReply(message, mean_logprob_of(logprobs), usage, model)


class FunctionTier(Tier):
    """A middle tier answered by ``fn(request)`` (a Message, an OpenAI completion dict, a string or a
    :class:`TierReply`): tests, stubs and custom clients."""

    def __init__(self, name: str, fn: Callable[[ChatRequest], Any], **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        if not callable(fn):
            raise ValueError(f"The 'fn' parameter of FunctionTier must be callable. Got {fn!r} instead.")
        self.fn = fn

    def generate(self, request: ChatRequest) -> TierReply:
        return reply_of(self.fn(request))


def mean_logprob_of(logprobs: Any) -> float | None:
    """The mean token log-prob of OpenAI-style log-probs: ``{"content": [{"logprob": ...}, ...]}``, a list
    of such entries, or a list of numbers. None when there are none."""
    if isinstance(logprobs, dict):
        logprobs = logprobs.get("content")
    if not isinstance(logprobs, list) or not logprobs:
        return None
    values = []
    for item in logprobs:
        value = item.get("logprob") if isinstance(item, dict) else item
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values.append(float(value))
    return sum(values) / len(values) if values else None


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpenAITier(Tier):
    """A middle tier behind an OpenAI-compatible ``{base_url}/chat/completions`` (vLLM, llama.cpp,
    Ollama, a hosted mid-size model). Standard library HTTP; a loopback URL bypasses proxies.

    Parameters
    ----------
    base_url : str
        e.g. ``http://127.0.0.1:8001/v1``.
    model : str or None
        Model name sent (None = the request's own ``model``).
    api_key : str or None
        Bearer token (None = none).
    """

    def __init__(self, name: str, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"The 'base_url' parameter of OpenAITier must be an http:// or https:// URL. "
                             f"Got {base_url!r} instead.")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key = api_key
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(self.base_url) else []
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def from_config(cls, cfg: TierConfig) -> OpenAITier:
        """The tier of a ``[[route.tiers]]`` entry; the key is read from ``api_key_env`` now (a variable that is
        not set sends no key, with a warning: the endpoint's refusal then sends requests on to the teacher)."""
        key = None
        if cfg.api_key_env:
            key = os.environ.get(cfg.api_key_env)
            if not key:
                log.warning("[[route.tiers]] %r: the environment variable %s (api_key_env) is not set; its requests "
                            "carry no API key", cfg.name, cfg.api_key_env)
        return cls(cfg.name, cfg.base_url, model=cfg.model, api_key=key, tasks=cfg.tasks,
                   min_mean_logprob=cfg.min_mean_logprob, timeout_s=cfg.timeout_s)

    def payload(self, request: ChatRequest) -> dict[str, Any]:
        """The chat-completion body sent for ``request``."""
        body: dict[str, Any] = {k: v for k, v in request.params.items() if k not in _NOT_FORWARDED}
        body["model"] = self.model or request.params.get("model") or self.name
        body["messages"] = [m.model_dump(mode="json", exclude_none=True) for m in request.messages]
        if request.tools:
            body["tools"] = request.tools
        if self.min_mean_logprob is not None:
            body["logprobs"] = True
        body["stream"] = False
        return body

    def generate(self, request: ChatRequest) -> TierReply:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(self.payload(request)).encode("utf-8")
        req = urllib.request.Request(f"{self.base_url}/chat/completions", data=data, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout_s) as resp:
                body = json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")[:200]
            raise AADError(f"the tier {self.name!r} at {self.base_url} answered HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise AADError(f"the tier {self.name!r} at {self.base_url} could not be reached: {err}") from None
        reply = reply_of(body)
        if not reply.model:
            reply.model = self.model or self.name
        return reply


def as_tier(obj: Any) -> Tier:
    """A :class:`Tier` from a Tier, a :class:`~aad_core.config.TierConfig` or its dict form."""
    from aad_core.config import TierConfig

    if isinstance(obj, Tier):
        return obj
    if isinstance(obj, dict):
        obj = TierConfig.model_validate(obj)
    if isinstance(obj, TierConfig):
        return OpenAITier.from_config(obj)
    raise ValueError("The 'tiers' parameter must list Tier objects, [[route.tiers]] tables (dicts) or TierConfig "
                     f"objects. Got {obj!r} instead.")


def tiers_from_config(route: RouteConfig) -> list[Tier]:
    """The middle tiers of ``[route] tiers``, in order."""
    return [OpenAITier.from_config(t) for t in route.tiers]


def _unique(tiers: Sequence[Tier]) -> list[Tier]:
    names = [t.name for t in tiers]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise ValueError(f"The 'tiers' parameter must name each tier once. Got {twice!r} twice instead.")
    return list(tiers)


class Cascade:
    """Tries the middle tiers of one :class:`~aad_core.serving.engine.RoutingEngine` in order.

    The task of a request (for ``tasks``) and its output kind (for the validators) come from the
    workspace: the decision's cluster (``clusters.json``: task tag and label; ``router.json``: output
    kind), or, for a request of a teacher-only agent node (no cluster), that node's clusters.
    """

    def __init__(self, engine: RoutingEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()
        self._tasks: dict[int, set[str]] | None = None
        self._nodes: dict[str, list[int]] | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="aad-tier")

    # -- what the workspace says about a request ---------------------------------------------------
    def _load(self) -> None:
        from aad_core.artifacts import ClusterState, RouterState

        tasks: dict[int, set[str]] = {}
        try:
            state = ClusterState.load_optional(self.engine.ws)
            for c in state.clusters if state else []:
                tasks[c.id] = {str(c.id), *(str(v) for v in (c.task, c.label) if v)}
        except Exception as err:  # a missing or old clusters.json: tasks match by cluster id only
            log.warning("cascade: could not read the task clusters: %s", err)
        nodes: dict[str, list[int]] = {}
        try:
            router = RouterState.load_optional(self.engine.ws)
            for key, node in (router.teacher_nodes if router else {}).items():
                nodes[key] = [int(c) for c in (node or {}).get("clusters", [])]
        except Exception as err:
            log.warning("cascade: could not read the router state: %s", err)
        with self._lock:
            self._tasks, self._nodes = tasks, nodes

    def clusters_of(self, request: ChatRequest, decision: RoutingDecision) -> list[int]:
        """The decision's cluster, else the clusters of the request's teacher-only agent node."""
        if decision.cluster_id is not None:
            return [int(decision.cluster_id)]
        if self._nodes is None:
            self._load()
        from aad_core.schema import node_key

        return list((self._nodes or {}).get(node_key(request), []))

    def task_keys(self, clusters: Sequence[int]) -> set[str]:
        """Every name a tier's ``tasks`` may use for these clusters: ids, task tags, labels."""
        if self._tasks is None:
            self._load()
        known = self._tasks or {}
        return {key for cid in clusters for key in known.get(cid, {str(cid)})}

    def output_kind(self, clusters: Sequence[int]) -> str:
        for cid in clusters:
            kind = self.engine.cluster_info(cid).get("output_kind")
            if kind:
                return str(kind)
        return "text"

    def reload(self) -> None:
        """Read the clusters and the router state again on the next request."""
        with self._lock:
            self._tasks = self._nodes = None

    # -- the tiers -------------------------------------------------------------------------------
    def run(self, request: ChatRequest, decision: RoutingDecision, tiers: Sequence[Tier]) -> list[TierOutcome]:
        """Each tier's attempt, in order, up to the first that answered (its outcome last, ``ok``).
        A tier restricted to other tasks is skipped without an outcome. Never raises."""
        outcomes: list[TierOutcome] = []
        if not tiers:
            return outcomes
        try:
            clusters = self.clusters_of(request, decision)
            keys, kind = self.task_keys(clusters), self.output_kind(clusters)
        except Exception as err:  # the workspace's state must never break the user's call
            log.warning("cascade: could not tell the request's task: %s", err)
            keys, kind = set(), "text"
        for tier in tiers:
            if not tier.serves(keys):
                continue
            outcome = self.attempt(tier, request, kind)
            outcomes.append(outcome)
            if outcome.ok:
                break
        return outcomes

    def attempt(self, tier: Tier, request: ChatRequest, output_kind: str = "text") -> TierOutcome:
        """Ask one tier and run its gate: the output validators of ``output_kind``, then its
        ``min_mean_logprob``. Never raises."""
        from aad_core.formats.tool_calls import ToolCallParseError, parse_tool_calls
        from aad_core.formats.validators import validate_output

        start = time.perf_counter()
        try:
            future = self._executor.submit(tier.generate, request)
        except RuntimeError as err:  # shut down
            return TierOutcome(tier.name, False, f"exception: {err}")
        try:
            reply = future.result(timeout=tier.timeout_s)
            latency = (time.perf_counter() - start) * 1000
            message = reply.message
            text = message.text()
        except concurrent.futures.TimeoutError:
            future.cancel()
            return TierOutcome(tier.name, False, f"timeout: the tier took longer than {tier.timeout_s:g} s",
                               latency_ms=(time.perf_counter() - start) * 1000)
        except Exception as err:  # a tier must never break the user's call: the next tier answers
            log.warning("cascade tier %s raised: %s", tier.name, err)
            return TierOutcome(tier.name, False, f"exception: {type(err).__name__}: {err}",
                               latency_ms=(time.perf_counter() - start) * 1000)
        out = TierOutcome(tier.name, False, text=text, mean_logprob=reply.mean_logprob, usage=reply.usage,
                          model=reply.model or tier.name, latency_ms=latency)
        calls = list(message.tool_calls or [])
        content = text
        if not calls and request.tools:
            try:
                content, calls = parse_tool_calls(text)
            except ToolCallParseError as err:
                out.reason = f"validator tool_calls: {err}"
                return out
        if calls and not out.text:
            out.text = json.dumps([{"name": c.function.name, "arguments": c.function.arguments} for c in calls])
        check = validate_output(request, content, calls, output_kind=output_kind)
        if not check.ok:
            out.reason = f"validator {check.check}: {check.reason}"
            return out
        if tier.min_mean_logprob is not None:
            if reply.mean_logprob is None:
                out.reason = (f"low confidence: the tier reported no mean token log-prob to compare with its "
                              f"min_mean_logprob {tier.min_mean_logprob:g}")
                return out
            if reply.mean_logprob < tier.min_mean_logprob:
                out.reason = (f"low confidence: mean token log-prob {reply.mean_logprob:.3f} < the tier's "
                              f"min_mean_logprob {tier.min_mean_logprob:g}")
                return out
        out.ok = True
        out.message = Message(role="assistant", content=content if (content or not calls) else None,
                              tool_calls=calls or None)
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def decided(decision: RoutingDecision, outcome: SpecialistOutcome | None,
            tier_outcomes: Sequence[TierOutcome]) -> RoutingDecision:
    """The decision with the tier that answers: ``"specialist"``, a middle tier (target ``"tier"``, the reason
    says why the tiers before it did not) or ``"teacher"`` (the reason lists the tiers that declined)."""
    if outcome is not None and outcome.ok:
        return decision.model_copy(update={"tier": "specialist"})
    rejected = "; ".join(f"tier {o.tier}: {o.reason}" for o in tier_outcomes if not o.ok)
    last = tier_outcomes[-1] if tier_outcomes else None
    if last is not None and last.ok:
        why = decision.reason + (f"; {rejected}" if rejected else "")
        return decision.model_copy(update={"target": "tier", "tier": last.tier,
                                           "reason": f"tier {last.tier} answered ({why})"})
    reason = decision.reason + (f"; then {rejected}" if rejected else "")
    return decision.model_copy(update={"tier": "teacher", "reason": reason})


def normalise_tiers(tiers: Iterable[Any]) -> list[Tier]:
    """``tiers`` as :class:`Tier` objects (see :func:`as_tier`), each name once."""
    return _unique([as_tier(t) for t in tiers])

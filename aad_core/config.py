"""Workspace configuration: ``aad.toml``, overridden by ``AAD_*`` environment variables.

The core sections (``[capture]``, ``[embed]``, ``[cluster]``, ``[select]``, ``[train]``, ``[eval]``,
``[route]``, ``[teacher]``) hold the core's own settings: which component each stage uses, the stage's
settings and shared context such as ``[train] student``. Nested keys use ``__`` in the environment:
``AAD_SELECT__FRACTION=0.5`` overrides ``[select] fraction``. Every field has help text and the
models validate across fields, so a bad value fails at load time with the file, the key and a fix.

A component's own parameters live in its table, ``[<kind>.<name>]`` at the top level (e.g.
``[trainer.qlora] lora_r = 8``, ``[scorer.kl-uncertainty]``), or in ``AAD_<KIND>__<NAME>__<KEY>``
(hyphens in the name written as underscores, e.g. ``AAD_TRAINER__QLORA__LORA_R=8``). They are kept
as written, with where each was set, and checked against the component's signature when it is built
(:mod:`aad_core.plugins.params`).
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
import types
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from aad_core.errors import ConfigError, param_error
from aad_core.plugins.params import CHOSEN_BY, component_key, toml_value
from aad_core.plugins.registry import KINDS

log = logging.getLogger(__name__)

CONFIG_FILE = "aad.toml"
ENV_PREFIX = "AAD_"

_QLORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "lr_scheduler",
               "warmup_ratio", "group_by_length", "batch_size", "gradient_accumulation", "epochs", "max_steps",
               "quantization", "distill_alpha", "temperature", "early_stopping_patience", "answer_hints",
               "answer_candidates", "hint_embedder")
#: Keys that moved from a core section into a default component's table: (section, key) -> (kind, name, key).
MOVED: dict[tuple[str, str], tuple[str, str, str]] = {
    **{("train", key): ("trainer", "qlora", key) for key in _QLORA_KEYS},
    ("select", "uncertainty_weight"): ("scorer", "kl-uncertainty", "uncertainty_weight"),
    ("select", "batch_size"): ("scorer", "kl-uncertainty", "batch_size"),
    ("cluster", "n_init"): ("clusterer", "kmeans", "n_init"),
    ("embed", "model"): ("embedder", "minilm", "model"),
    ("embed", "batch_size"): ("embedder", "minilm", "batch_size"),
    ("embed", "backend"): ("embedder", "minilm", "backend"),
    ("eval", "sql_database"): ("evaluator", "sql", "database"),
    ("eval", "sql_timeout_s"): ("evaluator", "sql", "timeout_s"),
    ("eval", "json_schema"): ("evaluator", "json", "schema"),
    ("eval", "semantic_threshold"): ("evaluator", "semantic", "threshold"),
}


#: Keys that no longer exist, and why: an older aad.toml or AAD_* variable that sets one still loads (warned, ignored).
RETIRED: dict[tuple[str, str], str] = {
    ("route", "confidence_quantile"): "the confidence threshold is now the one the risk-coverage gate of 'aad eval' "
    "chooses ([eval] target_agreement)",
    ("route", "confidence_samples"): "the confidence threshold is now chosen on the held-out calibration calls "
    "'aad eval' already answers ([eval] test_fraction)",
}


def _drop_retired(data: dict[str, Any], where: Any) -> None:
    """Remove retired keys from ``data`` (the raw sections), with a warning naming each one."""
    for (section, key), why in RETIRED.items():
        values = data.get(section)
        if isinstance(values, dict) and key in values:
            values.pop(key)
            log.warning("%s: [%s] %s is no longer used and is ignored: %s.", where(section, key), section, key, why)


def _is_number(annotation: Any) -> bool:
    """Whether a field holds an int or float (optionally None)."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return any(a in (int, float) for a in get_args(annotation))
    return False


def _no_boolean_number(value: Any, annotation: Any) -> Any:
    # pydantic reads true as 1: "seed = true" or "max_heldout = true" would be taken silently
    if isinstance(value, bool) and _is_number(annotation):
        raise ValueError(f"a number, not {str(value).lower()}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        return _no_boolean_number(value, field.annotation if field else None)


class CaptureConfig(_Section):
    enabled: bool = Field(
        True, description="Record LLM calls at all. AAD_CAPTURE=0 (or off/false) turns capture off in a process "
        "without touching aad.toml: handlers and writers then record nothing."
    )
    sample_rate: float = Field(
        1.0, ge=0, le=1, description="Share of calls recorded, decided per trace id (a hash, not a coin: the same id "
        "is always kept or always dropped, in every process)."
    )
    redact: bool = Field(True, description="Remove PII before a trace is written (S2).")
    redactor: str = Field("presidio", description="Redactor component name (its parameters: [redactor.<name>]).")
    queue_size: int = Field(
        10_000, ge=1, description="Bound of the background write queue: traces held in memory until they are redacted."
    )
    full_policy: Literal["block", "spool"] = Field(
        "spool", description="When the queue is full: 'block' waits up to block_timeout_s for room first; then (and "
        "at once with 'spool') the trace is counted and logged as lost. It is never redacted on the caller's thread "
        "nor written unredacted."
    )
    block_timeout_s: float = Field(0.5, ge=0, description="How long 'block' waits for room in the queue.")
    batch_size: int = Field(256, ge=1, description="Traces written per transaction.")
    write_timeout_s: float = Field(
        5.0, gt=0, description="How long one batch waits for a locked trace store before it is spooled to .aad/spool/."
    )
    retry_interval_s: float = Field(
        5.0, gt=0, description="How often the writer retries loading spooled traces into the store after a failure."
    )
    linger_s: float = Field(
        0.05, ge=0, description="How long the background writer waits to fill a batch before writing it."
    )
    wal: bool = Field(
        True, description="Write-ahead log: submitted traces are appended every wal_flush_ms, encrypted (AES-GCM, a "
        "per-workspace key in .aad/wal/key), to .aad/wal/ before they are redacted, so a process killed hard "
        "loses only the last interval's traces; the next writer stores the rest. A segment is deleted as soon "
        "as its traces are stored. false: traces wait for redaction in memory only."
    )
    wal_flush_ms: int = Field(
        50, ge=1, le=1000, description="How often the write-ahead log appends (and fsyncs) the submitted traces: "
        "at most this long, plus the time to write, between submit() and the trace being safe from kill -9."
    )


class StoreConfig(_Section):
    url: str | None = Field(
        None, description="Where the traces are stored. None = the workspace's SQLite file (.aad/traces.db); "
        "'sqlite:///path/traces.db' another SQLite file; 'postgresql://user:pass@host:5432/db' a PostgreSQL "
        "database shared by many processes and hosts (pip install 'aad[postgres]'). AAD_STORE__URL overrides it."
    )


class EmbedConfig(_Section):
    embedder: str = Field("minilm", description="Embedder component name (its parameters: [embedder.<name>]).")
    view: list[Literal["system", "tools", "last_user", "all_user", "answer"]] = Field(
        default_factory=lambda: ["system", "tools", "last_user"],
        description="Which parts of a trace are embedded. Agent nodes share long system prompts, so "
        "the default pairs the system prompt and bound tool names with the last user message.",
    )
    max_chars_per_part: int = Field(1000, ge=16, description="Each view part is cut to this many characters.")


class ClusterConfig(_Section):
    unit: Literal["task", "topic"] = Field(
        "task",
        description="What a specialist is for. 'task' (default): one per agent node (system prompt) and answer "
        "space (tool calls, JSON, SQL, text); a node splits only where its answers show distinct sub-tasks, and "
        "the calls of nodes smaller than min_size pool by answer space. Every task with min_size calls and a "
        "distillability estimate >= min_estimate is a candidate; the gate of 'aad eval' decides. 'topic': the "
        "clusterer's embedding clusters, routine when their variance is below variance_threshold (the seed "
        "paper's S3; one intent node of 150 intents became 16 topic clusters that each trained on too few calls).",
    )
    min_estimate: float = Field(
        0.2, ge=0, le=1,
        description="unit='task': a task whose distillability estimate (aad_core/pipeline/distillability.py) is "
        "below this stays with the teacher without training. Measured on the demo: labels 0.97, JSON extraction "
        "0.89, single function calls 0.6, text-to-SQL over seven schemas 0.1, multi-step plans 0.05.",
    )
    clusterer: str = Field("kmeans", description="Clusterer component name (its parameters: [clusterer.<name>]).")
    k: int | None = Field(None, ge=1, description="Number of clusters; None = chosen by silhouette over [k_min, k_max].")
    k_min: int = Field(2, ge=2, description="Smallest K tried when k is None.")
    k_max: int = Field(16, ge=2, description="Largest K tried when k is None.")
    variance_threshold: float = Field(
        0.35,
        gt=0,
        description="unit='topic' only. tau: a cluster is routine when its variance (mean squared distance of its unit "
        "embeddings to their mean) is below this. Measured with all-MiniLM-L6-v2 and the default view "
        "(benchmarks/cluster_quality.py data): one text-to-SQL node 0.20-0.25, one intent-classification "
        "node over 77 intents 0.32, a single intent 0.14; function calling with different tools per call "
        "0.55; a generic 'helpful assistant' node with unrelated requests 0.42; unrelated texts without a "
        "system prompt 0.90. 0.35 keeps the narrow nodes and leaves the open-ended ones to the teacher.",
    )
    min_size: int = Field(
        30, ge=1, description="A routine cluster needs at least this many traces: fewer cannot train and evaluate a specialist."
    )
    split_by_node: bool = Field(
        True,
        description="After clustering, split a broad cluster (variance >= tau) that mixes agent nodes (distinct "
        "system prompts): every node with at least min_size calls in it becomes its own cluster; the other "
        "members join the nearest part. Calls of different nodes are different tasks by construction, and "
        "merging two tasks costs more than splitting one: a mixed cluster is never routine, its parts may be. "
        "Measured on benchmarks/cluster_quality.py: silhouette alone merges the 600 text-to-SQL calls into the "
        "function-calling cluster (purity 0.980); split, 1.000. Narrow clusters (variance < tau) stay whole, so "
        "one task run by many nodes (say, one system prompt per tenant) keeps one specialist; nodes smaller than "
        "min_size are never split off, as they could not become routine on their own.",
    )
    near_duplicate_threshold: float = Field(
        0.98, gt=0, le=1, description="Cosine similarity at or above which two traces count as near-duplicates."
    )
    heldout_fraction: float = Field(0.2, gt=0, lt=1, description="Share of each cluster kept out of training for evaluation.")
    min_match_similarity: float = Field(
        0.8, ge=-1, le=1,
        description="Re-clustering keeps a cluster's id when its new centroid matches an old one (Hungarian "
        "assignment on cosine) with at least this similarity; otherwise it gets a fresh id.",
    )

    @model_validator(mode="after")
    def _k_range(self) -> ClusterConfig:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must not exceed k_max ({self.k_max}).")
        return self


class SelectConfig(_Section):
    scorer: str = Field("kl-uncertainty", description="Divergence scorer component name (its parameters: [scorer.<name>]).")
    selector: str = Field(
        "random", description="Selector component name: 'random', 'top', 'diverse' or 'stratified' (its parameters: "
        "[selector.<name>]). 'random' because none of the others was at least as good at every budget in "
        "benchmarks/selection_vs_random.py (Banking77, 30 % of the pool: top 0.58x, diverse 0.88x, stratified 0.88x "
        "the samples random needs)."
    )
    fraction: float = Field(0.3, gt=0, le=1, description="Share of each cluster's training split kept (the paper's 30 %).")


class TrainConfig(_Section):
    student: str = Field(
        "smollm2-135m", description="Student: a known name (aad models list), a hub id or a local path. Shared by "
        "the scorer, the trainer, evaluation and serving."
    )
    trainer: str | list[str] = Field(
        "auto", description="The specialist kind(s) trained per task: a trainer component name, a list tried in "
        "order (the first whose kind fits the task is trained), or 'auto' = the cheapest kind that fits first: "
        "'classifier' for closed answer sets, else 'qlora' (their parameters: [trainer.<name>])."
    )
    max_length: int = Field(
        384, ge=16, description="Prompt + answer tokens kept per sample when scoring and training (the prompt is cut "
        "from the left)."
    )


class EvalConfig(_Section):
    parity: float = Field(
        0.95, gt=0, le=1, description="The report's parity figure: the share of the teacher's score a specialist's "
        "score is compared with (promotion follows the risk-coverage gate: target_agreement, min_coverage)."
    )
    target_agreement: float = Field(
        0.95, gt=0, le=1, description="Risk-coverage gate: a specialist serves only requests whose confidence clears "
        "a threshold, chosen on the calibration part of the held-out calls as the largest served share whose "
        "agreement with the teacher has a one-sided Clopper-Pearson lower bound (level gate_alpha) >= this; it is "
        "promoted unless, on the test part, that share's agreement is significantly below this (one-sided binomial "
        "test at level gate_alpha)."
    )
    min_coverage: float = Field(
        0.2, ge=0, le=1, description="Risk-coverage gate: promote only when the threshold serves at least this share "
        "of the test part's calls."
    )
    gate_alpha: float = Field(
        0.05, gt=0, lt=1, description="Risk-coverage gate: 1 - the confidence level of the lower bound on agreement "
        "(0.05 = 95 %; a lower bound of 0.95 then needs at least 59 agreeing calibration calls)."
    )
    test_fraction: float = Field(
        0.5, gt=0, lt=1, description="Share of each cluster's held-out calls (by a seeded hash of the trace id) kept "
        "as the gate's test part; the rest calibrate the threshold and are the only held-out calls training sees "
        "(early stopping, vote weights)."
    )
    max_new_tokens: int = Field(128, ge=1, description="Generation budget per held-out answer.")
    max_heldout: int | None = Field(200, ge=1, description="Held-out samples a LoRA specialist is evaluated on per cluster "
                                        "(None = all): the cap bounds generation time. A classifier specialist answers "
                                        "every held-out call (milliseconds each).")
    teacher_price_per_mtok: float = Field(10.0, ge=0, description="Teacher price in USD per 1M tokens (blended).")
    hardware_price_per_hour: float = Field(0.10, ge=0, description="Price of the specialist's hardware in USD per hour.")
    evaluator: str = Field(
        "auto",
        description="Evaluator for every cluster: 'auto' (chosen from the traces: tool calls -> 'tool-calls', JSON -> "
        "'json', SQL -> 'sql', short labels -> 'classification', else 'semantic') or a registered evaluator name "
        "(their parameters: [evaluator.<name>]).",
    )
    cluster_evaluators: dict[str, str] = Field(
        default_factory=dict,
        description="Per-cluster override of 'evaluator': keys are cluster ids or task tags, e.g. {\"3\" = \"json\"}.",
    )
    latency_samples: int = Field(
        4, ge=0, description="Held-out requests the specialist also answers one at a time, for its single-request "
        "latency p50/p95 (0 = report only the latency amortised over batches)."
    )


#: Names a middle tier of the cascade cannot take: they name the first and the last tier.
RESERVED_TIER_NAMES = ("specialist", "teacher")


def _tier_error(message: str) -> Any:
    from pydantic_core import PydanticCustomError

    return PydanticCustomError("route_tier", "{message}", {"message": message})


class TierConfig(BaseModel):
    """One middle tier of the cascade (``[[route.tiers]]``): an OpenAI-compatible endpoint tried after the
    specialist and before the teacher (:mod:`aad_core.serving.cascade`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(description="The tier's name, as the serving log, 'aad monitor' and aad_route['tier'] show it.")
    base_url: str = Field(description="The endpoint's OpenAI-compatible base URL, e.g. 'http://127.0.0.1:8001/v1'.")
    model: str | None = Field(None, description="Model name sent to the endpoint (None = the request's own).")
    api_key_env: str | None = Field(None, description="Name of the environment variable holding the endpoint's "
                                    "API key (sent as a bearer token; None = no key).")
    tasks: list[str] | None = Field(None, description="Tasks this tier may answer: task tags, cluster labels or "
                                    "cluster ids (None = every task).")
    min_mean_logprob: float | None = Field(None, description="Confidence gate: an answer whose mean token log-prob "
                                           "is below this goes on to the next tier (logprobs are requested; an "
                                           "answer without them fails the gate). None = validators only.")
    timeout_s: float = Field(30.0, description="A tier slower than this goes on to the next tier.")

    @model_validator(mode="before")
    @classmethod
    def _check_entry(cls, data: Any) -> Any:
        """Messages that name the tier, the key and the value (TOML hands over plain values)."""
        if isinstance(data, TierConfig):
            return data
        if not isinstance(data, dict):
            raise _tier_error(f"Each [[route.tiers]] entry must be a table with a name and a base_url. "
                              f"Got {data!r} instead.")
        name = data.get("name")
        who = f"[[route.tiers]] {name!r}" if isinstance(name, str) else "[[route.tiers]]"
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(cls.model_fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _tier_error(f"The parameters of {who} must be among {', '.join(cls.model_fields)}. "
                              f"Got {unknown[0]!r} instead{hint}.")

        def bad(key: str, must: str) -> Any:
            return _tier_error(f"The {key!r} parameter of {who} must be {must}. Got {data.get(key)!r} instead.")

        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise bad("name", "a name of letters, digits, '_', '.' or '-'")
        if name in RESERVED_TIER_NAMES:
            raise bad("name", f"other than {' and '.join(map(repr, RESERVED_TIER_NAMES))} (the first and last tiers)")
        url = data.get("base_url")
        if not isinstance(url, str) or not re.match(r"https?://[^/\s]+", url):
            raise bad("base_url", "an http:// or https:// URL such as 'http://127.0.0.1:8001/v1'")
        for key in ("model", "api_key_env"):
            if data.get(key) is not None and (not isinstance(data[key], str) or not data[key].strip()):
                raise bad(key, "a non-empty string")
        tasks = data.get("tasks")
        if tasks is not None and (not isinstance(tasks, list) or not tasks
                                  or not all(isinstance(t, (str, int)) and not isinstance(t, bool) for t in tasks)):
            raise bad("tasks", "a non-empty list of task tags, cluster labels or cluster ids, e.g. [\"intent\"]")
        cut = data.get("min_mean_logprob")
        if cut is not None and (isinstance(cut, bool) or not isinstance(cut, (int, float)) or cut > 0):
            raise bad("min_mean_logprob", "a number <= 0 (a mean token log-prob)")
        timeout = data.get("timeout_s", 30.0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise bad("timeout_s", "a number of seconds > 0")
        return {**data, "tasks": [str(t) for t in tasks] if tasks is not None else None}


class RouteConfig(_Section):
    router: str = Field("centroid", description="Router component name (its parameters: [router.<name>]).")
    threshold_quantile: float = Field(
        0.02, ge=0, lt=1, description="Per-cluster threshold = this quantile of the cluster's own held-out similarities."
    )
    min_confidence: float | None = Field(
        None, le=0, description="Escalate a specialist's answer when its mean token log-prob is below this: a manual "
        "cut-off for specialists whose gate signal is the log-prob (LoRA). Specialists with a probability signal "
        "(the classifier) keep their gate threshold. None = the threshold the risk-coverage gate of 'aad eval' chose."
    )
    timeout_s: float = Field(30.0, gt=0, description="A specialist slower than this escalates to the teacher.")
    default_threshold: float = Field(
        0.6, ge=-1, le=1, description="Similarity threshold of a cluster before 'aad route --calibrate' has run."
    )
    max_calibration_samples: int = Field(
        300, ge=10, description="Training-split traces per cluster embedded to calibrate its threshold."
    )
    max_new_tokens: int = Field(256, ge=1, description="Generation budget of a specialist answer (a request's max_tokens wins).")
    prefix_cache: int = Field(
        8, ge=0, description="LoRA specialists: key/value caches of shared prompt prefixes (an agent node's system "
        "prompt and tools, as the chat template renders them) kept per runtime, least recently used dropped first; "
        "a request starting with a cached prefix encodes only the rest, with the same answer. 0 = off."
    )
    batch_window_ms: float = Field(
        5.0, ge=0, description="LoRA specialists: how long a request waits for concurrent requests to the same "
        "specialist to join one batched forward pass (requests arriving while a batch runs join the next one). "
        "0 = no micro-batching."
    )
    fast_path: Literal["int8", "int4", "merged", "none"] = Field(
        "int8", description="LoRA specialists on CPU: each adapter answers from a private copy of the base student "
        "with only that adapter merged into its weights; 'int8' also stores that copy's Linear weights as int8 (weight-"
        "only, per output channel, bfloat16 matmul inputs): about 3x faster per token; 'int4' also keeps int4 codes "
        "(groups of 32 inputs; not the output layer) for decoding passes: about 12 % faster again, the demo's extraction "
        "answers equal, but 4 of 32 labels of a weakly trained label adapter (int8: 31); measure yours with "
        "benchmarks/specialist_latency.py --fast-path int4; 'merged' keeps float32 weights (the "
        "unmerged answers exactly, without the LoRA detour); 'none' = the shared PEFT model. 'aad eval' scores "
        "specialists through the same path, so the gate judges what is served. Ignored on a GPU."
    )
    bf16_from_rows: int = Field(
        16, ge=0, description="LoRA specialists with fast_path 'int8' or 'int4': matmuls of at least this many rows (a prompt's "
        "encoding, wide batches) use a bfloat16 copy of the weights kept beside the int8 one: the int8 kernel reads "
        "every weight again for each row, oneDNN's bfloat16 kernel reuses it (on 2 cores, 34 rows: 2x faster; the "
        "output layer 3x). Costs 2 bytes per parameter per adapter (270 MB for SmolLM2-135M). Measured on the demo's "
        "extraction specialist: 48 of 48 answers identical, concurrency 8 at 4.5 instead of 3.4 requests/s "
        "(docs/routing.md). 0 = int8 only."
    )
    prompt_lookup_tokens: int = Field(
        10, ge=0, description="LoRA specialists: prompt-lookup (n-gram speculative) decoding of a single request: up "
        "to this many tokens that followed the answer's last n-gram earlier in the prompt or answer are drafted and "
        "checked in one forward pass; the model's greedy choice decides, so the answer stays its own. Pays off when "
        "answers copy the request (extracted values, tool arguments). 'aad eval' uses it too. 0 = off."
    )
    parallel_batches: int = Field(
        1, ge=1, le=64, description="LoRA specialists on CPU (their fast copies): micro-batches that decode at once, "
        "the cores split between them (torch.set_num_threads in the decoding thread, restored after: it also sets "
        "the default of threads started meanwhile, hence off by default in a library that runs inside an agent). A "
        "small student gains little from two threads per forward pass and much from two passes at once: concurrent "
        "requests that miss a running batch start their own instead of waiting for it. 2 suits 'aad serve' on a "
        "2-core machine. 1 = one batch at a time."
    )
    specialist_backend: Literal["local", "openai"] = Field(
        "local", description="Who answers the LoRA specialists: 'local' = aad's in-process runtime (prefix_cache, "
        "batch_window_ms, fast_path); 'openai' = an OpenAI-compatible endpoint serving every adapter on one base "
        "(vLLM with --enable-lora: 'aad export vllm' writes the adapters and the command), asked with "
        "model=<specialist name>, temperature 0 and logprobs at specialist_base_url, its API key in "
        "$AAD_SPECIALIST_API_KEY. Classifiers and adapters with answer hints stay local. An endpoint error or "
        "timeout sends the request to the teacher."
    )
    specialist_base_url: str | None = Field(
        None, description="specialist_backend = 'openai': the endpoint's OpenAI-compatible base URL, e.g. "
        "'http://127.0.0.1:8001/v1'."
    )
    specialist_timeout_s: float = Field(
        10.0, gt=0, description="specialist_backend = 'openai': HTTP timeout of one specialist request (connect and "
        "read); a slower endpoint escalates to the teacher ([route] timeout_s still bounds the whole answer)."
    )

    @model_validator(mode="after")
    def _specialist_endpoint(self) -> RouteConfig:
        url = self.specialist_base_url
        if self.specialist_backend == "openai" and (url is None or not re.match(r"https?://[^/\s]+", url)):
            from pydantic_core import PydanticCustomError  # the message as is (no "Value error, " prefix)

            err = param_error("specialist_base_url", "[route] when specialist_backend = \"openai\"",
                              "an http:// or https:// URL such as 'http://127.0.0.1:8001/v1'", url)
            raise PydanticCustomError("route_specialist_endpoint", "{message}", {"message": str(err)})
        return self

    teacher_node_min_calls: int = Field(
        10, ge=0, description="An agent node (system prompt) with at least this many training calls, all in clusters "
        "without a promoted specialist, is sent to the teacher without embedding its requests: the decision costs "
        "microseconds instead of a MiniLM pass over a long prompt. A wrong guess only costs a teacher call that a "
        "specialist might have taken (0 = always embed).",
    )
    record_escalations: bool = Field(
        True, description="Store each escalation (teacher answer + reason) as a trace with source 'router'."
    )
    shadow_rate: float = Field(
        0.05, ge=0, le=1, description="Shadow evaluation: the share of specialist-served requests (chosen by a hash "
        "of the request, so the same request always is or is not shadowed) that the teacher also answers in the "
        "background, never delaying the user's answer; the pair is scored by the task's evaluator and logged "
        "(.aad/state/shadow.jsonl, the teacher's answer as a trace with source 'shadow'). 0 = off."
    )
    shadow_budget_usd_per_day: float | None = Field(
        1.0, ge=0, description="Shadow evaluation: at most this many USD of teacher calls per UTC day, estimated "
        "from the tokens at [eval] teacher_price_per_mtok; later requests are not shadowed that day. None = no cap."
    )
    shadow_max_concurrency: int = Field(
        2, ge=1, description="Shadow evaluation: teacher calls in flight at once; a request arriving while all are "
        "busy is not shadowed (the queue never grows)."
    )
    shadow_min_pairs: int = Field(
        60, ge=1, description="Automatic demotion: a specialist is demoted when, over at least this many shadow pairs "
        "since its promotion (never fewer than the [eval] target_agreement bound needs: 59 at 0.95), the one-sided "
        "Clopper-Pearson lower bound (level [eval] gate_alpha) of its live agreement falls below [eval] target_agreement."
    )
    shadow_window: int = Field(
        300, ge=1, description="Automatic demotion: live agreement is measured over a specialist's most recent this "
        "many shadow pairs."
    )
    shadow_demote: bool = Field(
        True, description="Automatic demotion on: off = live agreement is only measured and shown ('aad monitor')."
    )
    retrain_min_new_traces: int = Field(
        200, ge=1, description="'aad distill --if-needed' retrains a task once at least this many new teacher traces "
        "(captured calls, escalations, shadow pairs; never specialist answers) were recorded for it since its "
        "specialist was last trained; drift or live disagreement with the teacher also retrains it."
    )
    tiers: list[TierConfig] = Field(
        default_factory=list, description="Cascade tiers between the specialist and the teacher, tried in order: "
        "[[route.tiers]] tables with name, base_url (an OpenAI-compatible endpoint), model, api_key_env, tasks, "
        "min_mean_logprob, timeout_s. A tier's answer must pass the task's output validators (and its confidence "
        "gate); otherwise the next tier answers. Its answers are never training data. Empty = specialist, then teacher."
    )

    @model_validator(mode="after")
    def _unique_tier_names(self) -> RouteConfig:
        names = [t.name for t in self.tiers]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice is not None:
            raise _tier_error(f"The 'name' parameter of [[route.tiers]] must be unique. Got {twice!r} twice instead.")
        return self


#: Where ``[teacher]`` reads its API key when ``api_key_env`` is not set (the variable 'aad serve' reads too).
TEACHER_KEY_ENV = "AAD_TEACHER_API_KEY"


def _teacher_error(message: str) -> Any:
    from pydantic_core import PydanticCustomError

    return PydanticCustomError("teacher", "{message}", {"message": message})


class TeacherConfig(_Section):
    """A live teacher that aad itself calls (``aad augment``, ``aad prompt-search``, and ``aad serve`` when it
    is given no ``--teacher-url``): an OpenAI-compatible endpoint. In Python a callable or a LangChain chat
    model may be passed instead (:mod:`aad_core.pipeline.augment`)."""

    base_url: str | None = Field(
        None, description="The teacher's OpenAI-compatible base URL, e.g. 'https://api.openai.com/v1' or "
        "'http://127.0.0.1:8001/v1'. None = no live teacher ('aad augment' and 'aad prompt-search' need one; "
        "'aad serve' uses it, with model, api_key_env and timeout_s, when it is given no --teacher-url)."
    )
    model: str | None = Field(
        None, description="Model name sent to the teacher. None = the model recorded on each trace (the teacher the "
        "agent used)."
    )
    api_key_env: str | None = Field(
        None, description=f"Name of the environment variable holding the teacher's API key (a bearer token). None = "
        f"${TEACHER_KEY_ENV} when it is set (as 'aad serve'), else no key."
    )
    timeout_s: float = Field(120.0, gt=0, description="A teacher call slower than this fails (and is counted as failed).")
    max_concurrency: int = Field(4, ge=1, le=64, description="Teacher calls in flight at once.")

    @model_validator(mode="after")
    def _check_endpoint(self) -> TeacherConfig:
        url = self.base_url
        if url is not None and not re.match(r"https?://[^/\s]+", url):
            raise _teacher_error(f"The 'base_url' parameter of [teacher] must be an http:// or https:// URL such "
                                 f"as 'http://127.0.0.1:8001/v1'. Got {url!r} instead.")
        for key in ("model", "api_key_env"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise _teacher_error(f"The {key!r} parameter of [teacher] must be a non-empty string. "
                                     f"Got {value!r} instead.")
            if value is not None and url is None:
                raise _teacher_error(f"{key} is set but base_url is not: set base_url (the teacher's "
                                     "OpenAI-compatible URL) too, or remove the section.")
        return self


#: The parameters of the components of one kind, by component name: ``{"qlora": {"lora_r": 8}}``.
ComponentTables = dict[str, dict[str, Any]]


def _tables_field(kind: str) -> Any:
    return Field(default_factory=dict, description=f"[{kind}.<name>] tables: parameters of {kind} components, by name.")


def _from_env(table: Any) -> bool:
    return isinstance(table, dict) and bool(table) and all(isinstance(v, _Sourced) and v.env for v in table.values())


@dataclass(frozen=True)
class _Sourced:
    """A component parameter on its way from a settings source, with where it was set."""

    value: Any
    source: str  # "path:line" or the environment variable's name
    env: bool


class AADSettings(BaseSettings):
    """All settings of one workspace: the core sections, then one ``[<kind>.<name>]`` table per component."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid")

    seed: int = Field(0, ge=0, lt=2**32, description="Seed for every random step (splits, clustering, selection, "
                      "training); 0 to 2**32 - 1, as numpy and torch take it.")
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    route: RouteConfig = Field(default_factory=RouteConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)

    redactor: ComponentTables = _tables_field("redactor")
    embedder: ComponentTables = _tables_field("embedder")
    clusterer: ComponentTables = _tables_field("clusterer")
    scorer: ComponentTables = _tables_field("scorer")
    selector: ComponentTables = _tables_field("selector")
    trainer: ComponentTables = _tables_field("trainer")
    evaluator: ComponentTables = _tables_field("evaluator")
    router: ComponentTables = _tables_field("router")

    @field_validator("seed", mode="before")
    @classmethod
    def _seed_is_not_a_boolean(cls, value: Any) -> Any:
        return _no_boolean_number(value, int)

    #: (kind, component_key(name), key) -> where the value was set ("path:line" or "AAD_...").
    _param_sources: dict[tuple[str, str, str], str] = PrivateAttr(default_factory=dict)
    #: The aad.toml this config was loaded from (None = defaults + environment).
    _path: Path | None = PrivateAttr(default=None)
    #: The aad.toml a subclass reads (see :func:`load_config`).
    toml_path: ClassVar[Path | None] = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings, _CoreEnvSource(settings_cls), _ComponentEnvSource(settings_cls)]
        if settings_cls.toml_path is not None:
            sources.append(_TomlSource(settings_cls, settings_cls.toml_path))
        return tuple(sources)

    @model_validator(mode="after")
    def _unwrap_component_tables(self) -> AADSettings:
        """Merge each component's table from the file and the environment (the environment wins); keep the sources."""
        for kind in KINDS:
            tables = getattr(self, kind)
            merged: dict[str, tuple[str, dict[str, Any]]] = {}  # component_key -> (name as written, params)
            # tables from aad.toml (or code) first, so that their spelling of the name is kept
            for written, table in sorted(tables.items(), key=lambda item: _from_env(item[1])):
                if not isinstance(table, dict):
                    raise ValueError(f"[{kind}.{written}] must be a table of parameters. Got {table!r} instead.")
                ckey = component_key(written)
                display, params = merged.get(ckey, (written, {}))
                for key, value in sorted(table.items(), key=lambda kv: _from_env({kv[0]: kv[1]})):
                    if isinstance(value, _Sourced):
                        if value.env:  # AAD_* keys match the table's keys case-insensitively
                            key = next((k for k in params if k.lower() == key), key)
                        self._param_sources[(kind, ckey, key)] = value.source
                        value = value.value
                    params[key] = value
                merged[ckey] = (display, params)
            tables.clear()
            tables.update(dict(merged.values()))
        return self

    # -- component tables ---------------------------------------------------------------------
    def component_table(self, kind: str, name: str) -> dict[str, Any]:
        """The parameters set for the component ``name`` of ``kind`` (its table and AAD_<KIND>__<NAME>__* variables)."""
        want = component_key(name)
        return {k: v for written, table in self._tables(kind).items() if component_key(written) == want
                for k, v in table.items()}

    def param_source(self, kind: str, name: str, key: str) -> str | None:
        """Where a component parameter was set: ``"path:line"``, the ``AAD_*`` variable's name, or None (in code)."""
        return self._param_sources.get((kind, component_key(name), key))

    def set_component_param(self, kind: str, name: str, key: str, value: Any, *, source: str | None = None) -> None:
        """Set ``[<kind>.<name>] key = value`` in memory (aad.toml is not changed)."""
        tables = self._tables(kind)
        written = next((w for w in tables if component_key(w) == component_key(name)), name)
        tables.setdefault(written, {})[key] = value
        if source is None:
            self._param_sources.pop((kind, component_key(name), key), None)
        else:
            self._param_sources[(kind, component_key(name), key)] = source

    @property
    def path(self) -> Path | None:
        """The aad.toml this config was loaded from (relative paths in component tables are relative to its folder)."""
        return self._path

    def _tables(self, kind: str) -> ComponentTables:
        if kind not in KINDS:
            raise ValueError(f"The 'kind' parameter must be one of {KINDS}. Got {kind!r} instead.")
        tables = self.__dict__.get(kind)
        if tables is None:  # a config built with model_construct(...) of an older field set
            tables = self.__dict__[kind] = {}
        return tables


# -- settings sources --------------------------------------------------------------------------

#: ``AAD_CAPTURE``: the capture on/off switch ([capture] enabled), a plain word rather than a section.
CAPTURE_SWITCH_ENV = "AAD_CAPTURE"
_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


class _CoreEnvSource(EnvSettingsSource):
    """``AAD_<SECTION>__<KEY>`` for the core sections; component tables are read by :class:`_ComponentEnvSource`."""

    def _load_env_vars(self) -> Any:
        env = dict(super()._load_env_vars())
        # AAD_CAPTURE would be read as the whole [capture] section: it is the switch, [capture] enabled.
        self._capture_switch = next(((k, env.pop(k)) for k in list(env) if k.upper() == CAPTURE_SWITCH_ENV), None)
        return env

    def __call__(self) -> dict[str, Any]:
        data = {k: v for k, v in super().__call__().items() if k not in KINDS}
        switch = getattr(self, "_capture_switch", None)
        if switch is not None and switch[1] is not None and switch[1].strip():
            word = switch[1].strip().lower()
            if word not in _ON + _OFF:
                raise ConfigError(
                    f"environment variable {_env_set(CAPTURE_SWITCH_ENV) or CAPTURE_SWITCH_ENV}={switch[1]!r}: "
                    f"capture is switched with one of {', '.join(_ON)} (on) or {', '.join(_OFF)} (off).",
                    hint=f"e.g. {CAPTURE_SWITCH_ENV}=0 records nothing; unset it to follow [capture] enabled.",
                )
            section = data.get("capture")
            data["capture"] = {**(section if isinstance(section, dict) else {}), "enabled": word in _ON}
        _drop_retired(data, lambda section, key: _env_set(env_var(section, key)) or env_var(section, key))
        for (section, key), (kind, name, new_key) in MOVED.items():
            values = data.get(section)
            if isinstance(values, dict) and key in values:
                var = _env_set(env_var(section, key)) or env_var(section, key)
                _moved_warning(var, section, key, kind, name, new_key, env_var(kind, name, new_key))
                table = data.setdefault(kind, {}).setdefault(name, {})
                table.setdefault(new_key, _Sourced(values.pop(key), var, env=True))
        return data


def _moved_warning(where: str, section: str, key: str, kind: str, name: str, new_key: str, instead: str) -> None:
    log.warning("%s: [%s] %s moved to [%s.%s] %s; read from its old place for now (%s).",
                where, section, key, kind, name, new_key, instead)


class _ComponentEnvSource(PydanticBaseSettingsSource):
    """``AAD_<KIND>__<NAME>__<KEY>=value``: a string, decoded against the component's signature when it is built."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for var, value in os.environ.items():
            upper = var.upper()
            for kind in KINDS:
                head = f"{ENV_PREFIX}{kind.upper()}"
                if upper != head and not upper.startswith(head + "__"):
                    continue
                parts = upper[len(head) + 2:].split("__") if upper != head else []
                if len(parts) != 2 or not all(parts):
                    raise ConfigError(
                        f"The environment variable {var} does not name a component parameter: they are written "
                        f"{head}__<NAME>__<KEY>, with '-' in the name as '_'.",
                        hint=f"e.g. {ENV_PREFIX}TRAINER__QLORA__LORA_R=8 sets [trainer.qlora] lora_r; unset {var}.",
                    )
                name, key = (p.lower() for p in parts)
                out.setdefault(kind, {}).setdefault(name, {})[key] = _Sourced(value, var, env=True)
        return out


class _TomlSource(PydanticBaseSettingsSource):
    """``aad.toml``: the core sections as they are; component tables with the line of every key."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        text = self.path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
        lines = toml_key_lines(text)
        _drop_retired(data, lambda section, key: f"{self.path}:{lines.get((section, key), '?')}")
        # Keys an older `aad init` wrote into the core sections go to their component's table (a key
        # also set in the table keeps the table's value).
        for (section, key), (kind, name, new_key) in MOVED.items():
            values = data.get(section)
            if isinstance(values, dict) and key in values:
                where = f"{self.path}:{lines.get((section, key), '?')}"
                _moved_warning(where, section, key, kind, name, new_key, f"write it under [{kind}.{name}]")
                table = data.setdefault(kind, {}).setdefault(name, {})
                if isinstance(table, dict) and new_key not in table:
                    table[new_key] = values.pop(key)
                    lines[(kind, name, new_key)] = lines.get((section, key), "?")
                else:
                    values.pop(key)
        for kind in KINDS:
            if kind not in data:
                continue
            for name, table in data[kind].items():
                if not isinstance(table, dict):
                    line = lines.get((kind, name))
                    example = CHOSEN_BY[kind]
                    raise ConfigError(
                        f"{self.path}{f':{line}' if line else ''}: [{kind}] {name} = {table!r}: a {kind}'s parameters "
                        f"go in the table of that {kind}, [{kind}.<name>], not in [{kind}] itself.",
                        hint=f"e.g. [{kind}.my-{kind}] {name} = {toml_value(table)}, "
                        f"with [{example[0]}] {example[1]} = \"my-{kind}\".",
                    )
                data[kind][name] = {
                    key: _Sourced(value, f"{self.path}:{lines.get((kind, name, key), '?')}", env=False)
                    for key, value in table.items()
                }
        return data


# -- locating keys in aad.toml -----------------------------------------------------------------

_BARE_OR_QUOTED = r'(?:[A-Za-z0-9_-]+|"[^"]*"|\'[^\']*\')'
_HEADER_RE = re.compile(rf"^\s*\[\[?\s*({_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*)\s*\]\]?\s*(?:#.*)?$")
_KEY_RE = re.compile(rf"^\s*({_BARE_OR_QUOTED}(?:\s*\.\s*{_BARE_OR_QUOTED})*)\s*=")


def _dotted(text: str) -> tuple[str, ...]:
    return tuple(a or b or c for a, b, c in re.findall(r'"([^"]*)"|\'([^\']*)\'|([A-Za-z0-9_-]+)', text))


def toml_key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Best-effort line number of every table and key of a TOML text, by its full dotted path."""
    out: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER_RE.match(line)
        if header:
            table = _dotted(header.group(1))
            for i in range(1, len(table) + 1):
                out.setdefault(table[:i], number)
            continue
        key = _KEY_RE.match(line)
        if key:
            path = table + _dotted(key.group(1))
            for i in range(len(table) + 1, len(path) + 1):
                out.setdefault(path[:i], number)
    return out


def _array_table_line(text: str, path: tuple[str, ...], index: int) -> int | None:
    """The line of the ``index``-th ``[[a.b]]`` header of ``path`` in a TOML text (None when not written so)."""
    seen = 0
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER_RE.match(line)
        if header and line.strip().startswith("[[") and _dotted(header.group(1)) == path:
            if seen == index:
                return number
            seen += 1
    return None


def env_var(*path: str) -> str:
    """The environment variable of a key: ``env_var("select", "fraction") == "AAD_SELECT__FRACTION"``."""
    return ENV_PREFIX + "__".join(component_key(p).upper() for p in path)


def _env_set(name: str) -> str | None:
    """The environment variable named ``name`` (any case), as written, when it is set."""
    return next((var for var in os.environ if var.upper() == name), None)


def load_config(path: Path | None) -> AADSettings:
    """Load ``aad.toml`` at ``path`` (or defaults + environment when None)."""
    cls: type[AADSettings] = AADSettings
    text = ""
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            tomllib.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"No config file at {path}.", hint="Run 'aad init' to create a workspace.") from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}", hint="Fix the syntax at the line shown.") from None

        class _FromFile(AADSettings):
            toml_path = path

        cls = _FromFile
    try:
        settings = cls()
    except ValidationError as err:
        raise _config_error(err, path, text) from None
    if path is not None:
        settings._path = path.resolve()
    return settings


def _config_error(err: ValidationError, path: Path | None, text: str) -> ConfigError:
    lines = toml_key_lines(text) if text else {}
    problems, moved, env_keys = [], [], []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        var = _env_set(env_var(*loc)) if loc else None
        line = lines.get(loc) if text else None
        if line is None and text and len(loc) > 2 and loc[2].isdigit():  # an entry of an array of tables
            line = _array_table_line(text, loc[:2], int(loc[2]))
        where = f"environment variable {var}" if var else f"{path}:{line}" if line else str(path or "environment")
        env_keys.append(var or env_var(*loc))
        if e["type"] == "extra_forbidden" and loc[:2] in MOVED and len(loc) == 2:
            kind, name, key = MOVED[loc[:2]]
            instead = f"set {env_var(kind, name, key)} instead" if var else f"write it under [{kind}.{name}]"
            moved.append(f"{where}: [{loc[0]}] {loc[1]} moved to [{kind}.{name}] {key}: {instead}.")
            continue
        problem = (f"{where}: [{'.'.join(loc)}] {e['msg']} (got {e.get('input')!r})" if e["type"] == "extra_forbidden"
                   else f"{where}: {_must_be(loc, e)}")
        if e["type"] == "extra_forbidden" and len(loc) == 2:
            problem += _extra_key_hint(loc[0], loc[1])
        elif e["type"] == "extra_forbidden" and len(loc) == 1:
            close = difflib.get_close_matches(loc[0], list(AADSettings.model_fields), n=1)
            sections = ", ".join(AADSettings.model_fields)
            problem += f"; did you mean [{close[0]}]?" if close else f"; the sections are {sections}"
        problems.append(problem)
    if moved:
        return ConfigError(
            "Settings of the default components moved into the components' own tables:\n  "
            + "\n  ".join(moved + problems),
            hint="Move each key to the table shown (a fresh 'aad init OTHER_DIR' writes every table with its help); "
            "'aad config' shows every key.",
        )
    return ConfigError(
        "Invalid aad configuration:\n  " + "\n  ".join(problems),
        hint=f"Edit {path or CONFIG_FILE} (or unset {env_keys[0]}); 'aad config' shows every key with its help.",
    )


def _is_table(key: str) -> bool:
    """Whether top-level ``key`` of aad.toml is a table ([capture], [trainer.qlora]) rather than a value (seed)."""
    field = AADSettings.model_fields.get(key)
    annotation = field.annotation if field else None
    return not (isinstance(annotation, type) and issubclass(annotation, (bool, int, float, str)))


def _must_be(loc: tuple[str, ...], error: Any) -> str:
    """One pydantic error as "The 'x' parameter of [section] must be ... Got ... instead."."""
    owner = f"[{'.'.join(loc[:-1])}]" if len(loc) > 1 else "aad.toml"
    msg = str(error["msg"])
    own = msg.removeprefix("Value error, ")
    if own.startswith("The '"):  # a validator's own message of that form: it says what it got
        return f"[{'.'.join(loc)}] {own}"
    if len(loc) == 1 and _is_table(loc[0]):  # a whole section's own check
        got = error.get("input")
        return f"[{loc[0]}] {own}" + ("" if isinstance(got, dict) else f" (got {got!r})")
    if msg.startswith("Input should be "):
        msg = "must be " + msg.removeprefix("Input should be ")
    elif own != msg:  # a field validator's "Value error, <what it must be>"
        msg = "must be " + own
    else:
        msg = f"is invalid: {msg}"
    return f"The '{loc[-1]}' parameter of {owner} {msg}. Got {error.get('input')!r} instead."


def _extra_key_hint(section: str, key: str) -> str:
    field = AADSettings.model_fields.get(section)
    factory = field.default_factory if field else None
    known = list(type(factory()).model_fields) if factory and factory is not dict else []  # type: ignore[call-arg]
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    kinds = [kind for kind, (sec, _) in CHOSEN_BY.items() if sec == section]
    if kinds:
        tables = " or ".join(f"[{k}.<name>]" for k in kinds)
        return f"; a component's own parameters go in its table, {tables}"
    return ""


def default_config_toml() -> str:
    """The text ``aad init`` writes: every core key at its default with its help as a comment, each section
    followed by the tables of the components it picks (their parameters at their defaults, with their help)."""
    from aad_core.plugins.params import component_tables_toml

    settings = AADSettings.model_construct()
    out = [f"# aad workspace configuration. Environment variables {ENV_PREFIX}<SECTION>__<KEY> override it;",
           f"# a component's parameters: [<kind>.<name>] tables, or {ENV_PREFIX}<KIND>__<NAME>__<KEY>.", ""]
    seed_help = AADSettings.model_fields["seed"].description
    out += [f"# {seed_help}", f"seed = {settings.seed}", ""]
    for name, field in AADSettings.model_fields.items():
        if name == "seed" or name in KINDS:
            continue
        section = field.default_factory()  # type: ignore[misc,call-arg]
        out.append(f"[{name}]")
        for key, f in type(section).model_fields.items():
            value = getattr(section, key)
            if value is None or (isinstance(value, list) and not value):  # an empty list: [[section.key]] may follow
                out.append(f"# {f.description}\n# {key} =")
                continue
            out.append(f"# {f.description}\n{key} = {toml_value(value)}")
        out.append("")
        for kind in (k for k, (sec, _) in CHOSEN_BY.items() if sec == name):
            out += component_tables_toml(settings, kind)
    return "\n".join(out)

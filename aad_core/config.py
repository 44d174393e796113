"""Workspace configuration: ``aad.toml``, overridden by ``AAD_*`` environment variables.

Nested keys use ``__`` in the environment: ``AAD_SELECT__FRACTION=0.5`` overrides
``[select] fraction``. Every field has help text (``aad config --help`` style) and the models
validate across fields, so a bad value fails at load time with the file, the key and a fix.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from aad_core.errors import ConfigError

CONFIG_FILE = "aad.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CaptureConfig(_Section):
    redact: bool = Field(True, description="Remove PII before a trace is written (S2).")
    redactor: str = Field("presidio", description="Redactor component name.")
    queue_size: int = Field(10_000, ge=1, description="Bound of the background write queue.")
    full_policy: Literal["block", "spool"] = Field(
        "spool", description="When the queue is full: block the caller briefly, then spool; or spool at once."
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


class EmbedConfig(_Section):
    embedder: str = Field("minilm", description="Embedder component name.")
    model: str | None = Field(
        None, description="sentence-transformers model name or path; None = the packaged all-MiniLM-L6-v2."
    )
    view: list[Literal["system", "tools", "last_user", "all_user", "answer"]] = Field(
        default_factory=lambda: ["system", "tools", "last_user"],
        description="Which parts of a trace are embedded. Agent nodes share long system prompts, so "
        "the default pairs the system prompt and bound tool names with the last user message.",
    )
    max_chars_per_part: int = Field(1000, ge=16, description="Each view part is cut to this many characters.")
    batch_size: int = Field(32, ge=1, description="Texts per embedding batch (32 measured fastest for MiniLM on CPU).")
    backend: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="Inference backend of embedders that have several: 'onnx' = ONNX Runtime (exported once into "
        "the user cache; ~3x faster per single request on CPU, which the router needs), 'torch' = PyTorch, "
        "'auto' = onnx on CPU when onnxruntime is installed, else torch.",
    )


class ClusterConfig(_Section):
    clusterer: str = Field("kmeans", description="Clusterer component name.")
    k: int | None = Field(None, ge=1, description="Number of clusters; None = chosen by silhouette over [k_min, k_max].")
    k_min: int = Field(2, ge=2, description="Smallest K tried when k is None.")
    k_max: int = Field(16, ge=2, description="Largest K tried when k is None.")
    variance_threshold: float = Field(
        0.35,
        gt=0,
        description="tau: a cluster is routine when its variance (mean squared distance of its unit "
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
    n_init: int = Field(10, ge=1, description="K-Means restarts (scikit-learn n_init), passed explicitly.")
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
    scorer: str = Field("kl-uncertainty", description="Divergence scorer component name.")
    selector: str = Field("top", description="Selector component name: 'top', 'random' or 'diverse'.")
    fraction: float = Field(0.3, gt=0, le=1, description="Share of each cluster's training split kept (the paper's 30 %).")
    uncertainty_weight: float = Field(1.0, ge=0, description="lambda in score = KL + lambda * student entropy.")
    batch_size: int = Field(8, ge=1, description="Samples per scoring forward pass.")


class TrainConfig(_Section):
    student: str = Field("smollm2-135m", description="Student: a known name (aad models list), a hub id or a local path.")
    trainer: str = Field("qlora", description="Trainer component name.")
    lora_r: int = Field(16, ge=1, description="LoRA rank r.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha.")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Modules that get adapters: a list of module names, or 'all-linear' (peft: every linear "
        "layer but the output head, as in the QLoRA paper, which found it needed to match full fine-tuning). "
        "Measured on the demo's intent and ticket nodes with SmolLM2-135M, 30 steps: held-out 0.875 / 0.875 vs "
        "0.56 / 0.50 with ['q_proj', 'v_proj'] (an earlier run, same workspace and settings), at ~1.35x the time "
        "per step.",
    )
    learning_rate: float = Field(2e-4, gt=0, description="AdamW learning rate.")
    lr_scheduler: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="Learning rate after the warm-up: a 'cosine' or 'linear' decay towards zero at the "
        "last step, or 'constant' (as in the QLoRA paper). Measured on Banking77 (1,000 samples, SmolLM2-135M, 3 epochs "
        "at lr 1e-3): cosine 78.0 % vs constant 70.3 % test accuracy (benchmarks/distill_banking77.py).",
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps over which the learning rate rises linearly from 0.")
    group_by_length: bool = Field(
        True, description="Batch samples of similar length together (as transformers' group_by_length): less "
        "padding, faster steps on CPU; the batches are still shuffled."
    )
    batch_size: int = Field(16, ge=1, description="Micro-batch size.")
    gradient_accumulation: int = Field(4, ge=1, description="Micro-batches per optimizer step (16 x 4 = 64).")
    epochs: float = Field(1.0, gt=0, description="Passes over the selected samples.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    max_length: int = Field(384, ge=16, description="Prompt + answer tokens kept per sample (the prompt is cut from the left).")
    quantization: Literal["auto", "4bit", "none"] = Field(
        "auto", description="'auto' = 4-bit NF4 QLoRA on CUDA, fp32 LoRA on CPU."
    )
    distill_alpha: float = Field(0.5, ge=0, le=1, description="alpha in alpha*CE + (1-alpha)*T^2*KL when teacher distributions exist.")
    temperature: float = Field(2.0, gt=0, description="Soft-target temperature T.")
    early_stopping_patience: int = Field(2, ge=0, description="Evaluations without held-out improvement before stopping; 0 = off.")
    answer_hints: int = Field(
        0, ge=0, description="For clusters whose answers form a closed label set (the 'classification' rule): add "
        "to every prompt the N distinct answers of the nearest training requests (by hint_embedder), in training "
        "and at serving time; 0 = off. Measured on Banking77 (1,000 samples, 77 labels, SmolLM2-135M): see "
        "docs/specialists.md.",
    )
    answer_candidates: int = Field(
        0, ge=0, description="For clusters whose answers form a closed label set: the specialist answers with the "
        "best of the N distinct labels of the nearest training requests, scored by its log-prob plus a weighted "
        "vote of the 10 nearest requests (weight fitted on the held-out split), instead of decoding freely; "
        "0 = off. Measured on Banking77: see docs/specialists.md.",
    )
    hint_embedder: str = Field("minilm", description="Embedder component that finds the nearest training requests for answer hints.")


class EvalConfig(_Section):
    parity: float = Field(0.95, gt=0, le=1, description="Promote a specialist when its score reaches this share of the teacher's.")
    max_new_tokens: int = Field(128, ge=1, description="Generation budget per held-out answer.")
    max_heldout: int | None = Field(200, ge=1, description="Held-out samples evaluated per cluster (None = all).")
    teacher_price_per_mtok: float = Field(10.0, ge=0, description="Teacher price in USD per 1M tokens (blended).")
    hardware_price_per_hour: float = Field(0.10, ge=0, description="Price of the specialist's hardware in USD per hour.")
    sql_database: str | None = Field(None, description="SQLite file for SQL execution accuracy (opened read-only).")
    sql_timeout_s: float = Field(5.0, gt=0, description="Each SQL query of the 'sql' evaluator is stopped after this many seconds.")
    evaluator: str = Field(
        "auto",
        description="Evaluator for every cluster: 'auto' (chosen from the traces: tool calls -> 'tool-calls', JSON -> "
        "'json', SQL -> 'sql', short labels -> 'classification', else 'semantic') or a registered evaluator name.",
    )
    cluster_evaluators: dict[str, str] = Field(
        default_factory=dict,
        description="Per-cluster override of 'evaluator': keys are cluster ids or task tags, e.g. {\"3\" = \"json\"}.",
    )
    json_schema: str | None = Field(None, description="JSON Schema file; the 'json' evaluator then also reports schema validity.")
    latency_samples: int = Field(
        4, ge=0, description="Held-out requests the specialist also answers one at a time, for its single-request "
        "latency p50/p95 (0 = report only the latency amortised over batches)."
    )
    semantic_threshold: float = Field(
        0.8, gt=0, le=1, description="Cosine at or above which the 'semantic' evaluator counts two answers as agreeing."
    )


class RouteConfig(_Section):
    router: str = Field("centroid", description="Router component name.")
    threshold_quantile: float = Field(
        0.02, ge=0, lt=1, description="Per-cluster threshold = this quantile of the cluster's own held-out similarities."
    )
    min_confidence: float | None = Field(
        None, description="Escalate when the specialist's mean token log-prob is below this (None = calibrated)."
    )
    timeout_s: float = Field(30.0, gt=0, description="A specialist slower than this escalates to the teacher.")
    default_threshold: float = Field(
        0.6, ge=-1, le=1, description="Similarity threshold of a cluster before 'aad route --calibrate' has run."
    )
    max_calibration_samples: int = Field(
        300, ge=10, description="Training-split traces per cluster embedded to calibrate its threshold."
    )
    confidence_quantile: float = Field(
        0.05, ge=0, lt=1, description="Calibrated confidence cut-off = this quantile of the specialist's mean token "
        "log-prob over held-out requests.",
    )
    confidence_samples: int = Field(
        24, ge=0, description="Held-out requests per specialist generated to calibrate the confidence cut-off (0 = no gate)."
    )
    max_new_tokens: int = Field(256, ge=1, description="Generation budget of a specialist answer (a request's max_tokens wins).")
    teacher_node_min_calls: int = Field(
        10, ge=0, description="An agent node (system prompt) with at least this many training calls, all in clusters "
        "without a promoted specialist, is sent to the teacher without embedding its requests: the decision costs "
        "microseconds instead of a MiniLM pass over a long prompt. A wrong guess only costs a teacher call that a "
        "specialist might have taken (0 = always embed).",
    )
    record_escalations: bool = Field(
        True, description="Store each escalation (teacher answer + reason) as a trace with source 'router'."
    )


class AADSettings(BaseSettings):
    """All settings of one workspace."""

    model_config = SettingsConfigDict(env_prefix="AAD_", env_nested_delimiter="__", extra="forbid")

    seed: int = Field(0, description="Seed for every random step (splits, clustering, selection, training).")
    capture: CaptureConfig = Field(default_factory=CaptureConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    route: RouteConfig = Field(default_factory=RouteConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def _line_of(text: str, loc: tuple[Any, ...]) -> int | None:
    """Best-effort line number of a dotted key in a TOML text."""
    lines = text.splitlines()
    section, key = (str(loc[0]), str(loc[1])) if len(loc) >= 2 else (None, str(loc[0]) if loc else "")
    in_section = section is None
    for i, line in enumerate(lines, 1):
        stripped = line.strip()
        if stripped.startswith("["):
            in_section = section is not None and stripped.strip("[]").strip() == section
            continue
        if in_section and re.match(rf"{re.escape(key)}\s*=", stripped):
            return i
    return None


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
            model_config = SettingsConfigDict(**{**AADSettings.model_config, "toml_file": path})

        cls = _FromFile
    try:
        return cls()
    except ValidationError as err:
        problems = []
        for e in err.errors():
            loc = tuple(e["loc"])
            line = _line_of(text, loc) if text else None
            where = f"{path}:{line}" if line else str(path or "environment")
            key = ".".join(str(p) for p in loc)
            problems.append(f"{where}: [{key}] {e['msg']} (got {e.get('input')!r})")
        env_key = "AAD_" + "__".join(str(p).upper() for p in tuple(err.errors()[0]["loc"]))
        raise ConfigError(
            "Invalid aad configuration:\n  " + "\n  ".join(problems),
            hint=f"Edit {path or CONFIG_FILE} (or unset {env_key}); 'aad config' shows every key with its help.",
        ) from None


def default_config_toml() -> str:
    """The text ``aad init`` writes: every key at its default, with its help as a comment."""
    settings = AADSettings.model_construct()
    out = ["# aad workspace configuration. Environment variables AAD_<SECTION>__<KEY> override it.", ""]
    seed_help = AADSettings.model_fields["seed"].description
    out += [f"# {seed_help}", f"seed = {settings.seed}", ""]
    for name, field in AADSettings.model_fields.items():
        if name == "seed":
            continue
        section = field.default_factory()  # type: ignore[misc]
        out.append(f"[{name}]")
        for key, f in type(section).model_fields.items():
            value = getattr(section, key)
            if value is None:
                out.append(f"# {f.description}\n# {key} =")
                continue
            out.append(f"# {f.description}\n{key} = {_toml_value(value)}")
        out.append("")
    return "\n".join(out)


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)

"""Redactor ``presidio`` (S2): Microsoft Presidio's regex and checksum recognisers, no model download.

Detected values are pseudonymised consistently within a trace: the same e-mail address becomes
the same ``<EMAIL_ADDRESS_1>`` in the system, user, assistant and tool messages *and* inside the
JSON arguments of tool calls (string values are redacted and the JSON re-serialised, so the
arguments stay valid JSON and the trace stays usable as tool-calling training data).

Person names need a spaCy NER model: with ``spacy_model="auto"`` (the default) the redactor uses
``en_core_web_sm`` when it is importable (``pip install 'aad[pii-names]'``) and only the
pattern recognisers otherwise.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

from aad_core.plugins import Redactor, hookimpl
from aad_core.schema import Message, Trace

#: Entities found by pattern/checksum recognisers, without any NLP model. URL, DATE_TIME, UUID and
#: the US licence/passport/bank-number patterns are left out on purpose: they fire on ordinary task
#: content (dates in SQL, ids, 9-digit numbers) and would damage the training data.
DEFAULT_ENTITIES: tuple[str, ...] = (
    "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "CRYPTO", "MAC_ADDRESS",
)
_MAYBE_PII = re.compile(r"[0-9@]")  # every default pattern entity has a digit or an '@' (bar letter-only MACs)
_SPACY_DEFAULT = "en_core_web_sm"

_ENGINES: dict[tuple[str, str | None], tuple[Any, Any]] = {}
_ENGINES_LOCK = threading.Lock()


def _spacy_model_available(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _engines(language: str, spacy_model: str | None) -> tuple[Any, Any]:
    """(AnalyzerEngine, AnonymizerEngine), built once per process and configuration."""
    key = (language, spacy_model)
    with _ENGINES_LOCK:
        if key not in _ENGINES:
            os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")  # no suffix-list download
            from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
            from presidio_anonymizer import AnonymizerEngine

            if spacy_model is None:
                from presidio_analyzer.nlp_engine import NoOpNlpEngine

                nlp = NoOpNlpEngine(models=[{"lang_code": language, "model_name": "no_op"}])
            else:
                from presidio_analyzer.nlp_engine import NlpEngineProvider

                nlp = NlpEngineProvider(nlp_configuration={
                    "nlp_engine_name": "spacy", "models": [{"lang_code": language, "model_name": spacy_model}],
                }).create_engine()
            nlp.load()
            registry = RecognizerRegistry(supported_languages=[language])
            registry.load_predefined_recognizers(languages=[language], nlp_engine=nlp)
            analyzer = AnalyzerEngine(nlp_engine=nlp, registry=registry, supported_languages=[language])
            _ENGINES[key] = (analyzer, AnonymizerEngine())
        return _ENGINES[key]


class PresidioRedactor(Redactor):
    """Replace personal data in traces by consistent placeholders such as ``<EMAIL_ADDRESS_1>``.

    Parameters
    ----------
    entities:
        Presidio entity types to remove; None = :data:`DEFAULT_ENTITIES` (plus ``PERSON`` when
        a spaCy model is used).
    language:
        Language code given to the recognisers.
    score_threshold:
        Minimum recogniser confidence (0-1) for a match to be replaced.
    spacy_model:
        spaCy model for person names: "auto" (``en_core_web_sm`` if installed), a model
        package name, or None for pattern recognisers only.
    """

    def __init__(
        self,
        entities: Sequence[str] | None = None,
        language: str = "en",
        score_threshold: float = 0.3,
        spacy_model: str | None = "auto",
    ) -> None:
        self.entities = entities
        self.language = language
        self.score_threshold = score_threshold
        self.spacy_model = spacy_model

    # -- configuration -----------------------------------------------------------------------
    def _resolved_model(self) -> str | None:
        if self.spacy_model == "auto":
            return _SPACY_DEFAULT if _spacy_model_available(_SPACY_DEFAULT) else None
        return self.spacy_model

    def _setup(self) -> None:
        if hasattr(self, "analyzer_"):
            return
        if not 0 <= self.score_threshold <= 1:
            raise ValueError(
                f"The 'score_threshold' parameter of PresidioRedactor must be in [0, 1]. Got {self.score_threshold!r} instead."
            )
        model = self._resolved_model()
        if model is not None and not _spacy_model_available(model):
            from aad_core.errors import AADError

            raise AADError(
                f"The spaCy model {model!r} of PresidioRedactor is not installed.",
                hint="pip install 'aad[pii-names]', or set spacy_model=None for pattern recognisers only.",
            )
        entities = list(self.entities) if self.entities is not None else list(DEFAULT_ENTITIES)
        if model is not None and self.entities is None:
            entities.append("PERSON")
        self.analyzer_, self.anonymizer_ = _engines(self.language, model)
        supported = set(self.analyzer_.get_supported_entities(self.language))
        unknown = sorted(set(entities) - supported)
        if unknown:
            raise ValueError(
                f"The 'entities' parameter of PresidioRedactor must name supported entities "
                f"({', '.join(sorted(supported))}). Got unknown {unknown} instead."
            )
        self.entities_ = entities
        self.prefilter_ = "PERSON" not in entities and set(entities) <= set(DEFAULT_ENTITIES)

    # -- redaction ---------------------------------------------------------------------------
    def redact(self, traces: Sequence[Trace]) -> list[Trace]:
        self._setup()
        return [t if t.redacted else self._redact_trace(t) for t in traces]

    def redact_text(self, text: str, mapping: dict[tuple[str, str], str] | None = None) -> str:
        """Redact one string; ``mapping`` ((entity, value) -> placeholder) is shared to keep
        placeholders consistent across several strings."""
        self._setup()
        return self._text(text, {} if mapping is None else mapping)

    def _text(self, text: str, mapping: dict[tuple[str, str], str]) -> str:
        if not text or (self.prefilter_ and not _MAYBE_PII.search(text)):
            return text
        results = self.analyzer_.analyze(
            text=text, language=self.language, entities=self.entities_, score_threshold=self.score_threshold
        )
        if not results:
            return text
        from presidio_anonymizer.entities import OperatorConfig

        def placeholder(entity: str) -> Callable[[str], str]:
            def repl(value: str) -> str:
                key = (entity, value)
                if key not in mapping:
                    n = sum(1 for e, _ in mapping if e == entity) + 1
                    mapping[key] = f"<{entity}_{n}>"
                return mapping[key]

            return repl

        operators = {r.entity_type: OperatorConfig("custom", {"lambda": placeholder(r.entity_type)}) for r in results}
        return self.anonymizer_.anonymize(text=text, analyzer_results=results, operators=operators).text

    def _walk(self, node: Any, mapping: dict[tuple[str, str], str]) -> Any:
        """``node`` (JSON-like) with every string value redacted; keys are kept."""
        if isinstance(node, str):
            return self._text(node, mapping)
        if isinstance(node, list):
            return [self._walk(v, mapping) for v in node]
        if isinstance(node, dict):
            return {k: self._walk(v, mapping) for k, v in node.items()}
        return node

    def _json_args(self, arguments: str, mapping: dict[tuple[str, str], str]) -> str:
        try:
            obj = json.loads(arguments)
        except (ValueError, TypeError):
            return self._text(arguments, mapping)
        new = self._walk(obj, mapping)
        return json.dumps(new, ensure_ascii=False) if new != obj else arguments

    def _message(self, msg: Message, mapping: dict[tuple[str, str], str]) -> None:
        if isinstance(msg.content, str):
            msg.content = self._text(msg.content, mapping)
        elif isinstance(msg.content, list):
            for part in msg.content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    part["text"] = self._text(part["text"], mapping)
        for call in msg.tool_calls or []:
            call.function.arguments = self._json_args(call.function.arguments, mapping)

    def _redact_trace(self, trace: Trace) -> Trace:
        out = trace.model_copy(deep=True)
        mapping: dict[tuple[str, str], str] = {}
        for msg in out.request.messages:
            self._message(msg, mapping)
        answer_before = out.answer_text()
        if out.response is not None:
            self._message(out.response, mapping)
        if out.error:
            out.error = self._text(out.error, mapping)
        # Parameters (e.g. OpenAI's "user"), metadata and tags often carry user ids and e-mails.
        out.request.params = self._walk(out.request.params, mapping)
        out.tags = [self._text(t, mapping) for t in out.tags]
        meta = self._walk(dict(out.metadata), mapping)
        if out.teacher_logprobs and out.answer_text() != answer_before:
            # The tokens would spell the removed value out again.
            out.teacher_logprobs = None
            meta["teacher_logprobs_dropped"] = "pii in the answer"
        if mapping:
            counts: dict[str, int] = {}
            for entity, _ in mapping:
                counts[entity] = counts.get(entity, 0) + 1
            meta["redacted_entities"] = counts
        out.metadata = meta
        out.redacted = True
        return out


@hookimpl
def aad_register_redactors(register: Any) -> None:
    register(
        "presidio",
        PresidioRedactor,
        description="Presidio pattern/checksum recognisers (e-mail, phone, card, IBAN, IP, SSN, ...), "
        "consistent placeholders per trace; names with an optional spaCy model",
    )

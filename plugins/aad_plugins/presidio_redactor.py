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
#: Per entity, a cheap test that every match of its recognisers passes (a superset: a text that
#: fails it cannot hold that entity), so Presidio runs only the recognisers that can find something.
#: The phone recogniser (libphonenumber over eight regions) is most of the cost; it runs only on
#: texts with five digits close together.
_CANDIDATE = {
    "EMAIL_ADDRESS": re.compile(r"@"),
    "PHONE_NUMBER": re.compile(r"\d(?:\D{0,4}\d){4}"),
    "CREDIT_CARD": re.compile(r"\d(?:[ -]?\d){11}"),
    "IBAN_CODE": re.compile(r"[A-Za-z]{2}[0-9]{2}"),
    "IP_ADDRESS": re.compile(r"\d\.\d|:[0-9A-Fa-f:]|[0-9A-Fa-f]:"),
    "US_SSN": re.compile(r"\d(?:[ .\-]?\d){8}"),
    "CRYPTO": re.compile(r"(?:bc1|[13])[a-z0-9]{25}", re.IGNORECASE),
    "MAC_ADDRESS": re.compile(r"[0-9A-Fa-f]{2}[:-][0-9A-Fa-f]{2}[:-]|[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\."),
}
#: Analysis results are cached per text (system prompts, tool schemas and earlier turns repeat),
#: up to this many characters of text in all (the cache is emptied when it is full).
_CACHE_CHARS = 2_000_000
_SPACY_DEFAULT = "en_core_web_sm"
#: Keys of a tool's JSON schema whose string values are identifiers, not prose: kept as they are.
_SCHEMA_KEYS_KEPT = frozenset({"type", "name", "required", "$ref", "$schema", "format", "pattern", "strict"})
#: Card numbers of every current IIN range, as (first digits low, high, allowed lengths); Presidio's
#: own pattern misses Mastercard's 2-series (2221-2720), Mir (2200-2204), Maestro 56-69 and Troy.
_CARD_RANGES: tuple[tuple[int, int, frozenset[int]], ...] = (
    (4, 4, frozenset({13, 16, 19})),                 # Visa
    (51, 55, frozenset({16})), (2221, 2720, frozenset({16})),  # Mastercard
    (34, 34, frozenset({15})), (37, 37, frozenset({15})),  # American Express
    (300, 305, frozenset(range(14, 20))), (36, 36, frozenset(range(14, 20))), (38, 39, frozenset(range(14, 20))),  # Diners
    (6011, 6011, frozenset(range(16, 20))), (644, 649, frozenset(range(16, 20))), (65, 65, frozenset(range(16, 20))),
    (3528, 3589, frozenset(range(16, 20))),          # JCB
    (62, 62, frozenset(range(16, 20))),              # UnionPay
    (2200, 2204, frozenset(range(16, 20))),          # Mir
    (50, 50, frozenset(range(12, 20))), (56, 69, frozenset(range(12, 20))),  # Maestro
    (9792, 9792, frozenset({16})),                   # Troy
)

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
            registry.add_recognizer(_card_recognizer(language))
            analyzer = AnalyzerEngine(nlp_engine=nlp, registry=registry, supported_languages=[language])
            _ENGINES[key] = (analyzer, AnonymizerEngine())
        return _ENGINES[key]


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_number_ok(text: str) -> bool:
    """Whether ``text`` (digits with optional spaces or dashes) is a card number: an issuer range
    of :data:`_CARD_RANGES` with its length, and a valid Luhn check digit."""
    digits = re.sub(r"[ -]", "", text)
    if not digits.isdigit() or not 12 <= len(digits) <= 19 or not _luhn_ok(digits):
        return False
    for low, high, lengths in _CARD_RANGES:
        width = len(str(low))
        if low <= int(digits[:width]) <= high and len(digits) in lengths:
            return True
    return False


def _card_recognizer(language: str) -> Any:
    """A CREDIT_CARD recogniser for every current issuer range (Luhn-checked), beside Presidio's."""
    from presidio_analyzer import Pattern, PatternRecognizer

    class IinCardRecognizer(PatternRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return card_number_ok(pattern_text)

    return IinCardRecognizer(
        supported_entity="CREDIT_CARD", supported_language=language, name="IinCardRecognizer",
        patterns=[Pattern("card number of any issuer range", r"(?<![\d-])\d{4}(?:[ -]?\d{2,7}){1,4}(?![\d-])", 0.3)],
        context=["card", "credit", "debit", "visa", "mastercard", "amex", "maestro", "cc"],
    )


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

    # -- redaction ---------------------------------------------------------------------------
    def redact(self, traces: Sequence[Trace]) -> list[Trace]:
        self._setup()
        return [t if t.redacted else self._redact_trace(t) for t in traces]

    def redact_text(self, text: str, mapping: dict[tuple[str, str], str] | None = None) -> str:
        """Redact one string; ``mapping`` ((entity, value) -> placeholder) is shared to keep
        placeholders consistent across several strings."""
        self._setup()
        return self._text(text, {} if mapping is None else mapping)

    def _analyze(self, text: str) -> list[Any]:
        """Presidio's findings in ``text`` (cached per text), for the entities that can occur in it."""
        cache: dict[str, tuple[tuple[str, int, int, float], ...]] = self.__dict__.setdefault("cache_", {})
        found = cache.get(text)
        if found is None:
            entities = [e for e in self.entities_ if e not in _CANDIDATE or _CANDIDATE[e].search(text)]
            results = self.analyzer_.analyze(
                text=text, language=self.language, entities=entities, score_threshold=self.score_threshold
            ) if entities else []
            found = tuple((r.entity_type, r.start, r.end, r.score) for r in results)
            size = self.__dict__.get("cache_chars_", 0) + len(text)
            if size > _CACHE_CHARS:
                cache.clear()
                size = len(text)
            if size <= _CACHE_CHARS:
                cache[text] = found
                self.cache_chars_ = size
        if not found:
            return []
        from presidio_analyzer import RecognizerResult

        return [RecognizerResult(entity_type=e, start=a, end=b, score=sc) for e, a, b, sc in found]

    def _text(self, text: str, mapping: dict[tuple[str, str], str]) -> str:
        if not text:
            return text
        results = self._analyze(text)
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

    def _walk(self, node: Any, mapping: dict[tuple[str, str], str], keep: frozenset[str] = frozenset()) -> Any:
        """``node`` (JSON-like) with every string value redacted; keys are kept, and so are the
        string values of the keys in ``keep`` (identifiers such as a tool's name)."""
        if isinstance(node, str):
            return self._text(node, mapping)
        if isinstance(node, (list, tuple)):
            return [self._walk(v, mapping, keep) for v in node]
        if isinstance(node, dict):
            return {k: v if (k in keep and isinstance(v, str)) else self._walk(v, mapping, keep) for k, v in node.items()}
        return node

    def _json_args(self, arguments: str, mapping: dict[tuple[str, str], str]) -> str:
        try:
            obj = json.loads(arguments)
        except (ValueError, TypeError, RecursionError):  # not JSON, or nested too deep to parse: redact it as text
            return self._text(arguments, mapping)
        new = self._walk(obj, mapping)
        return json.dumps(new, ensure_ascii=False) if new != obj else arguments

    def _message(self, msg: Message, mapping: dict[tuple[str, str], str]) -> None:
        if isinstance(msg.content, str):
            msg.content = self._text(msg.content, mapping)
        elif isinstance(msg.content, list):
            msg.content = [self._part(part, mapping) for part in msg.content]
        if msg.name:
            msg.name = self._text(msg.name, mapping)
        for call in msg.tool_calls or []:
            call.function.arguments = self._json_args(call.function.arguments, mapping)
        # Every other field of the message: refusal, reasoning_content, audio transcripts, annotations, ...
        for key, value in list((msg.model_extra or {}).items()):
            setattr(msg, key, self._walk(value, mapping, _SCHEMA_KEYS_KEPT))

    def _part(self, part: Any, mapping: dict[tuple[str, str], str]) -> Any:
        """A content part with its strings redacted (its ``type`` and inline base64 data kept)."""
        if not isinstance(part, dict):
            return self._walk(part, mapping)
        out = {}
        for k, v in part.items():
            if k == "type" or (isinstance(v, str) and v.startswith("data:")):
                out[k] = v
            elif isinstance(v, dict):
                out[k] = {kk: vv if isinstance(vv, str) and vv.startswith("data:") else self._walk(vv, mapping)
                          for kk, vv in v.items()}
            else:
                out[k] = self._walk(v, mapping)
        return out

    def _redact_trace(self, trace: Trace) -> Trace:
        try:  # a deep copy through JSON: several times faster than copy.deepcopy
            out = Trace.model_validate_json(trace.model_dump_json())
        except (ValueError, RecursionError):  # e.g. a lone surrogate: not JSON-serialisable
            out = trace.model_copy(deep=True)
        mapping: dict[tuple[str, str], str] = {}
        for msg in out.request.messages:
            self._message(msg, mapping)
        # Tool descriptions and parameter descriptions, enums, defaults, examples (names kept).
        if out.request.tools:
            out.request.tools = self._walk(out.request.tools, mapping, _SCHEMA_KEYS_KEPT)
        answer_before = out.response.model_dump_json() if out.response is not None else ""
        if out.response is not None:
            self._message(out.response, mapping)
        answer_changed = out.response is not None and out.response.model_dump_json() != answer_before
        if out.error:
            out.error = self._text(out.error, mapping)
        # Parameters (e.g. OpenAI's "user"), metadata, tags and feedback often carry user ids and e-mails.
        out.request.params = self._walk(out.request.params, mapping)
        out.tags = [self._text(t, mapping) for t in out.tags]
        if out.feedback:
            out.feedback = self._walk(out.feedback, mapping)
        meta = self._walk(dict(out.metadata), mapping)
        if out.teacher_logprobs and (answer_changed or self._tokens_leak(out, mapping)):
            # The tokens would spell the removed value out again (in text or in tool-call arguments).
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

    def _tokens_leak(self, trace: Trace, mapping: dict[tuple[str, str], str]) -> bool:
        """Whether the answer's tokens, joined, contain personal data (a value redacted anywhere in
        the trace, or one the recognisers find in the joined text)."""
        joined = "".join(t.token for t in trace.teacher_logprobs or [])
        squeezed = re.sub(r"\s+", "", joined)
        for _, value in mapping:
            if value in joined or (len(value) > 3 and re.sub(r"\s+", "", value) in squeezed):
                return True
        return self._text(joined, {}) != joined


@hookimpl
def aad_register_redactors(register: Any) -> None:
    register(
        "presidio",
        PresidioRedactor,
        description="Presidio pattern/checksum recognisers (e-mail, phone, card, IBAN, IP, SSN, ...), "
        "consistent placeholders per trace; names with an optional spaCy model",
    )

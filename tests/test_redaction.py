"""S2: the default presidio redactor (real engine, no model download) and redaction on capture."""

from __future__ import annotations

import json
import sqlite3

import pytest

pytest.importorskip("presidio_analyzer")

from aad_core.plugins import create_component  # noqa: E402
from aad_core.schema import ChatRequest, FunctionCall, Message, TokenLogprob, ToolCall, Trace  # noqa: E402

EMAIL, PHONE, CARD = "jane.roe@example.com", "+1 415-555-0123", "4111 1111 1111 1111"


@pytest.fixture(scope="module")
def redactor():
    from aad_core.plugins import reset_plugin_manager

    r = create_component("redactor", "presidio", spacy_model=None)
    reset_plugin_manager()
    return r


def tool_call(args: dict, id_: str = "call_1") -> ToolCall:
    return ToolCall(id=id_, function=FunctionCall(name="send_receipt", arguments=json.dumps(args)))


def pii_trace() -> Trace:
    return Trace(
        source="test",
        request=ChatRequest(messages=[
            Message(role="system", content="You help customers. Never reveal card numbers."),
            Message(role="user", content=f"I'm {EMAIL}, phone {PHONE}. Charge card {CARD} and mail the receipt."),
            Message(role="assistant", tool_calls=[tool_call({"to": EMAIL, "copies": 2, "cc": ["bob@example.org"]})]),
            Message(role="tool", tool_call_id="call_1", content=f"receipt sent to {EMAIL}"),
        ]),
        response=Message(role="assistant", content=f"Done, the receipt went to {EMAIL}.",
                         tool_calls=[tool_call({"to": EMAIL}, "call_2")]),
        teacher_logprobs=[TokenLogprob(token="Done", logprob=-0.1)],
    )


def test_pii_is_replaced_with_consistent_placeholders(redactor):
    original = pii_trace()
    (out,) = redactor.redact([original])
    user = out.request.messages[1].text()
    assert EMAIL not in user and PHONE not in user and CARD not in user
    assert "<EMAIL_ADDRESS_1>" in user and "<PHONE_NUMBER_1>" in user and "<CREDIT_CARD_1>" in user
    # The same e-mail gets the same placeholder in the tool-call arguments, which stay valid JSON.
    args = out.request.messages[2].tool_calls[0].function.parsed_arguments()
    assert args == {"to": "<EMAIL_ADDRESS_1>", "copies": 2, "cc": ["<EMAIL_ADDRESS_2>"]}
    assert out.request.messages[3].content == "receipt sent to <EMAIL_ADDRESS_1>"
    assert out.answer_text() == "Done, the receipt went to <EMAIL_ADDRESS_1>."
    assert out.response.tool_calls[0].function.parsed_arguments() == {"to": "<EMAIL_ADDRESS_1>"}
    assert out.request.messages[0].content == original.request.messages[0].content  # no PII: unchanged
    assert out.redacted and out.metadata["redacted_entities"]["EMAIL_ADDRESS"] == 2
    assert out.teacher_logprobs is None  # the answer had PII: its tokens would leak it
    assert EMAIL not in out.model_dump_json()
    assert original.request.messages[1].text().count(EMAIL) == 1 and not original.redacted  # input untouched


@pytest.mark.parametrize("text,entity", [
    ("IBAN DE89370400440532013000 please", "IBAN_CODE"),
    ("server at 192.168.10.20 is down", "IP_ADDRESS"),
    ("my SSN is 536-22-1234", "US_SSN"),
])
def test_other_pattern_entities(redactor, text, entity):
    assert f"<{entity}_1>" in redactor.redact_text(text)


def test_params_metadata_and_tags_are_redacted_too(redactor):
    t = pii_trace()
    t.request.params = {"model": "gpt-x", "user": EMAIL, "temperature": 0.2}
    t.metadata = {"customer": {"email": EMAIL, "tier": 2}}
    t.tags = [f"owner:{EMAIL}", "prod"]
    (out,) = redactor.redact([t])
    assert out.request.params == {"model": "gpt-x", "user": "<EMAIL_ADDRESS_1>", "temperature": 0.2}
    assert out.metadata["customer"] == {"email": "<EMAIL_ADDRESS_1>", "tier": 2}
    assert out.tags == ["owner:<EMAIL_ADDRESS_1>", "prod"]


def test_keys_of_params_metadata_feedback_and_tool_arguments_are_redacted_but_declared_names_kept(redactor):
    tools = [{"type": "function", "function": {"name": "notify", "parameters": {
        "type": "object", "properties": {"recipient": {"type": "string"}, "channel": {"type": "string"}}}}}]
    t = Trace(request=ChatRequest(
        messages=[Message(role="user", content="notify them"),
                  Message(role="assistant", content=None,
                          tool_calls=[tool_call({"recipient": EMAIL, "channel": "mail", EMAIL: "primary"})])],
        tools=tools, params={"extra_headers": {EMAIL: "x"}}),
        response=Message(role="assistant", content="done"),
        metadata={"recipients": {EMAIL: "to"}}, feedback={"by": {EMAIL: 1}})
    (out,) = redactor.redact([t])
    assert EMAIL not in out.model_dump_json()
    args = json.loads(out.request.messages[1].tool_calls[0].function.arguments)
    assert args == {"recipient": "<EMAIL_ADDRESS_1>", "channel": "mail", "<EMAIL_ADDRESS_1>": "primary"}
    assert out.request.params == {"extra_headers": {"<EMAIL_ADDRESS_1>": "x"}}
    assert out.metadata["recipients"] == {"<EMAIL_ADDRESS_1>": "to"} and out.feedback == {"by": {"<EMAIL_ADDRESS_1>": 1}}


def test_text_that_starts_like_a_data_url_is_redacted_and_inline_base64_is_kept(redactor):
    image = "data:image/png;base64,iVBORw0KGgo="
    t = Trace(request=ChatRequest(messages=[Message(role="user", content=[
        {"type": "text", "text": f"data: please mail {EMAIL}"},
        {"type": "image_url", "image_url": {"url": image, "detail": f"from {EMAIL}"}}])]))
    (out,) = redactor.redact([t])
    text, picture = out.request.messages[0].content
    assert text["text"] == "data: please mail <EMAIL_ADDRESS_1>"
    assert picture["image_url"] == {"url": image, "detail": "from <EMAIL_ADDRESS_1>"}


def test_task_content_without_pii_is_left_alone(redactor):
    sql = "SELECT name, SUM(amount) FROM orders WHERE year = 2024 GROUP BY name LIMIT 10"
    t = Trace(request=ChatRequest(messages=[Message(role="user", content=sql)]),
              response=Message(role="assistant", content="42 rows"),
              teacher_logprobs=[TokenLogprob(token="42", logprob=-0.3)])
    (out,) = redactor.redact([t])
    assert out.request.messages[0].content == sql and out.teacher_logprobs == t.teacher_logprobs
    assert out.redacted and "redacted_entities" not in out.metadata


def test_content_parts_and_already_redacted(redactor):
    t = Trace(request=ChatRequest(messages=[Message(role="user", content=[{"type": "text", "text": f"hi {EMAIL}"}])]))
    (out,) = redactor.redact([t])
    assert out.request.messages[0].content[0]["text"] == "hi <EMAIL_ADDRESS_1>"
    assert redactor.redact([out])[0] is out


def test_bad_entity_parameter_is_explained():
    r = create_component("redactor", "presidio", entities=["EMAIL_ADDRESS", "SHOE_SIZE"], spacy_model=None)
    with pytest.raises(ValueError, match="'entities' parameter of PresidioRedactor"):
        r.redact([pii_trace()])


def test_captured_calls_are_redacted_before_anything_is_written(workspace):
    """End to end: LangChain handler with the default config; the raw values never reach the disk."""
    pytest.importorskip("langchain_core")
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    from aad_langchain import AADCallbackHandler

    answer = AIMessage(content="", tool_calls=[{"name": "send_receipt", "args": {"to": EMAIL}, "id": "c1"}])
    h = AADCallbackHandler(workspace=workspace)  # redact=True, redactor "presidio"
    GenericFakeChatModel(messages=iter([answer])).invoke(
        f"Mail {EMAIL} or call {PHONE}; card {CARD}", config={"callbacks": [h]})
    h.close(timeout=120)
    (t,) = list(h.writer.store.iter_traces())
    assert t.redacted
    assert t.request.messages[0].content == "Mail <EMAIL_ADDRESS_1> or call <PHONE_NUMBER_1>; card <CREDIT_CARD_1>"
    assert t.response.tool_calls[0].function.parsed_arguments() == {"to": "<EMAIL_ADDRESS_1>"}
    conn = sqlite3.connect(workspace.db_path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    on_disk = b"".join(p.read_bytes() for p in workspace.data_dir.rglob("*") if p.is_file())
    for raw in (EMAIL, PHONE, CARD):
        assert raw.encode() not in on_disk


def test_spooled_traces_are_redacted_too(workspace):
    """The spool is a write as well: with the store locked, the spool files hold no raw PII."""
    from aad_core.capture import CaptureWriter
    from aad_core.config import AADSettings

    w = CaptureWriter(workspace=workspace, config=AADSettings(capture={"write_timeout_s": 0.05, "retry_interval_s": 30}))
    held = sqlite3.connect(workspace.db_path, isolation_level=None)
    held.execute("BEGIN EXCLUSIVE")
    try:
        w.submit(pii_trace())
        assert w.flush(120)
        assert w.stats()["spooled"] == 1
        spooled = "".join(p.read_text(encoding="utf-8") for p in workspace.spool_dir.glob("*.jsonl"))
        assert "<EMAIL_ADDRESS_1>" in spooled and EMAIL not in spooled and CARD not in spooled
    finally:
        held.execute("ROLLBACK")
        held.close()
    assert w.flush(30)
    assert w.store.count() == 1 and EMAIL not in next(w.store.iter_traces()).model_dump_json()
    w.close()


def test_every_field_is_redacted_refusal_reasoning_tools_and_tool_call_logprobs(redactor):
    """Issue 15: refusal, reasoning_content, tool (parameter) descriptions and the log-probs of a
    tool-call answer were stored raw."""
    tools = [{"type": "function", "function": {
        "name": "send_sms", "description": f"Text the on-call phone {PHONE} or mail {EMAIL}",
        "parameters": {"type": "object", "required": ["to"], "properties": {
            "to": {"type": "string", "description": f"e.g. {PHONE}", "enum": [PHONE, "+1 212-555-0188"]}}}}}]
    t = Trace(
        request=ChatRequest(messages=[Message(role="user", content="text the on-call phone"),
                                      Message(role="assistant", content=None, refusal=f"I cannot call {PHONE}")],
                            tools=tools),
        response=Message(role="assistant", content=None, refusal=f"Not sending to {EMAIL}",
                         reasoning_content=f"The user {EMAIL} wants {PHONE}",
                         tool_calls=[tool_call({"to": PHONE})]),
        teacher_logprobs=[TokenLogprob(token=tok, logprob=-0.1)
                          for tok in ['{"', "to", '":"', "+", "1", " ", "415", "-", "555", "-", "0123", '"}']],
        feedback={"by": EMAIL},
    )
    (out,) = redactor.redact([t])
    dumped = out.model_dump_json()
    for raw in (EMAIL, PHONE, "212-555-0188", "0123"):
        assert raw not in dumped, raw
    fn = out.request.tools[0]["function"]
    assert fn["name"] == "send_sms" and fn["parameters"]["required"] == ["to"]  # identifiers kept
    assert fn["parameters"]["properties"]["to"]["type"] == "string"
    assert "<PHONE_NUMBER_1>" in fn["description"] and "<EMAIL_ADDRESS_1>" in fn["description"]
    assert out.response.reasoning_content == "The user <EMAIL_ADDRESS_1> wants <PHONE_NUMBER_1>"
    assert out.response.refusal == "Not sending to <EMAIL_ADDRESS_1>"
    assert out.request.messages[1].refusal == "I cannot call <PHONE_NUMBER_1>"
    assert out.teacher_logprobs is None and out.metadata["teacher_logprobs_dropped"]


def test_logprobs_whose_tokens_spell_pii_are_dropped_even_when_the_answer_text_has_none(redactor):
    t = Trace(request=ChatRequest(messages=[Message(role="user", content="q")]),
              response=Message(role="assistant", content="ok"),
              teacher_logprobs=[TokenLogprob(token=x, logprob=-0.1) for x in ["jane", ".roe", "@example", ".com"]])
    (out,) = redactor.redact([t])
    assert out.teacher_logprobs is None


def _luhn_ok(number: str) -> bool:
    digits = [int(c) for c in reversed(number)]
    return sum(d if i % 2 == 0 else (2 * d - 9 if d > 4 else 2 * d) for i, d in enumerate(digits)) % 10 == 0


def _luhn_complete(prefix: str, length: int) -> str:
    body = (prefix + "3141592653589793238")[: length - 1]
    return next(body + str(d) for d in range(10) if _luhn_ok(body + str(d)))


@pytest.mark.parametrize("prefix,length", [
    ("2221", 16), ("2500", 16), ("2720", 16),  # Mastercard 2-series: Presidio's own pattern misses it
    ("51", 16), ("4", 16), ("37", 15), ("6011", 16), ("3530", 16), ("62", 19), ("2200", 16), ("6759", 16),
])
def test_card_numbers_of_every_issuer_range(redactor, prefix, length):
    number = _luhn_complete(prefix, length)
    for shown in (number, " ".join(number[i:i + 4] for i in range(0, len(number), 4))):
        out = redactor.redact_text(f"Please charge my card {shown} now")
        assert shown not in out and "<CREDIT_CARD_1>" in out


def test_card_lookalikes_are_kept(redactor):
    from aad_plugins.presidio_redactor import card_number_ok

    bad_luhn = _luhn_complete("2221", 16)[:-1] + str((int(_luhn_complete("2221", 16)[-1]) + 1) % 10)
    assert not card_number_ok(bad_luhn) and not card_number_ok(_luhn_complete("2721", 16))
    for text in ("order 2024 0101 1200 shipped", "SELECT * FROM t WHERE year = 2024 LIMIT 100"):
        assert redactor.redact_text(text) == text


# -- street addresses (pattern recogniser, no model) and person names (spaCy model) --------------
@pytest.mark.parametrize("address", [
    "1777 Kramer Court",
    "42 Main St., Apt 4B, Springfield, IL 62704",
    "350 5th Ave, New York, NY 10118",
    "1600 Pennsylvania Avenue NW, Washington, DC 20500",
    "37406 Jacob Stream Suite 158\nRomeroborough, ME 37746",
    "9 Oak Blvd #12",
    "221B Baker Street",
    "10 Downing Street, London SW1A 2AA",
    "88 Old Mill Road, Portland, OR",
    "12 elm Lane",  # not a street name: lower case (kept)
])
def test_street_addresses_in_several_formats(redactor, address):
    text = f"Please ship the card to {address}. Thanks!"
    out = redactor.redact_text(text)
    if address == "12 elm Lane":
        assert out == text
        return
    assert out == "Please ship the card to <STREET_ADDRESS_1>. Thanks!", out


@pytest.mark.parametrize("text", [
    "I sent 20 euros to the park last week, where is it?",
    "I have 2 Visa cards and 1 Mastercard, can I add another?",
    "Top up of 50 GBP on 12 March failed",
    "Why did my transfer of 300 go to Western Union?",
])
def test_ordinary_sentences_with_numbers_are_not_addresses(redactor, text):
    assert redactor.redact_text(text) == text


def test_an_address_is_redacted_in_every_field_of_a_trace(redactor):
    addr = "17 Harbor View Drive, Apt 3"
    (out,) = redactor.redact([Trace(
        source="test",
        request=ChatRequest(messages=[Message(role="user", content=f"Deliver to {addr} please")],
                            params={"user": "x"}),
        response=Message(role="assistant", tool_calls=[tool_call({"address": addr})]),
        metadata={"shipping": addr},
    )])
    dumped = out.model_dump_json()
    assert "Harbor View" not in dumped and "17 Harbor" not in dumped
    assert out.response.tool_calls[0].function.parsed_arguments() == {"address": "<STREET_ADDRESS_1>"}


@pytest.fixture(scope="module")
def ner_redactor():
    from aad_plugins.presidio_redactor import _SPACY_AUTO, _spacy_model_available

    if not any(_spacy_model_available(m) for m in _SPACY_AUTO):
        pytest.skip("no spaCy English model installed (pip install 'aad[pii]')")
    r = create_component("redactor", "presidio")  # spacy_model="auto": the default install
    r.redact_text("warm-up")
    return r


@pytest.mark.real_model
def test_person_names_are_redacted_by_default(ner_redactor):
    assert "PERSON" in ner_redactor.entities_
    for text, name in [("Hi, this is Maria Garcia, my card was declined.", "Garcia"),
                       ("Please send the invoice to John Smith.", "Smith"),
                       ("My landlord Kevin O'Brien has not received the money.", "O'Brien")]:
        out = ner_redactor.redact_text(text)
        assert name not in out and "<PERSON_1>" in out, out


@pytest.mark.real_model
def test_a_name_found_once_is_removed_from_every_field_even_alone(ner_redactor):
    # A bare name in metadata or tool-call arguments is not recognisable on its own: once NER has
    # found it in the user's message, every other occurrence in the trace gets the same placeholder.
    (out,) = ner_redactor.redact([Trace(
        source="test",
        request=ChatRequest(messages=[Message(role="user", content="Hello, my name is Laura Jenkins and I need a refund.")]),
        response=Message(role="assistant", tool_calls=[tool_call({"customer": "Laura Jenkins", "last": "Jenkins"})]),
        metadata={"customer": "Laura Jenkins"}, tags=["Jenkins"],
    )])
    assert "Jenkins" not in out.model_dump_json()
    assert out.response.tool_calls[0].function.parsed_arguments() == {"customer": "<PERSON_1>", "last": "<PERSON_1>"}
    assert out.metadata["customer"] == "<PERSON_1>"


@pytest.mark.real_model
def test_payment_brands_are_not_names(ner_redactor):
    for text in ["Do you guys accept Visa or Mastercard?", "I swapped Russian Ruble for UK pounds."]:
        assert ner_redactor.redact_text(text) == text


@pytest.mark.real_model
@pytest.mark.parametrize("text, parts", [
    ("Please send the invoice to Payne, Carol.", ["Payne", "Carol"]),       # "Last, First": NER sees two ORGs
    ("Hi, this is Grant, Anne, I need help with my order.", ["Grant", "Anne"]),
    ("Signed: King, Alexandra", ["King", "Alexandra"]),                     # surname tagged a common noun
    ("My details: Connie Martinez. Please help.", ["Connie", "Martinez"]),  # NER says ORG
    ("Escalate to Leah D. Brown when stuck.", ["Leah", "Brown"]),
    ("Book a table under the name Dr. Whitney Scott.", ["Whitney", "Scott"]),
    ("Ask Mr. Thornton to call me back.", ["Thornton"]),
    ("Notify the owner (Isaiah Bean-Hughes)", ["Isaiah", "Bean", "Hughes"]),
])
def test_names_the_small_model_misses_are_found_by_the_name_recogniser(ner_redactor, text, parts):
    out = ner_redactor.redact_text(text)
    assert not [p for p in parts if p in out] and "<PERSON_1>" in out, out


@pytest.mark.real_model
@pytest.mark.parametrize("text", [
    "Which state code is Orlando International Airport in?",  # a place named after a given name
    "Thanks, Anne! Will the transfer arrive today?",           # "Thanks" is no surname
    "May I top up with Apple Pay?",                             # given names that are ordinary words
    "Where can I see my Bill Payment history?",
])
def test_the_name_recogniser_keeps_ordinary_words(ner_redactor, text):
    from aad_plugins.presidio_redactor import person_name_spans

    doc = ner_redactor.analyzer_.nlp_engine.process_text(text, "en").tokens
    names = [text[a:b] for a, b in person_name_spans(doc)]
    assert names in ([], ["Anne"]), names


@pytest.mark.real_model
def test_a_last_first_name_is_removed_from_every_field(ner_redactor):
    # "Price, John" in the user's message: both words go, wherever they are in the trace.
    (out,) = ner_redactor.redact([Trace(
        source="test",
        request=ChatRequest(messages=[Message(role="user", content="Refund the order of Price, John please.")]),
        response=Message(role="assistant", tool_calls=[tool_call({"surname": "Price", "given": "John"})]),
        metadata={"owner": "John Price"}, tags=["owner:Price"],
    )])
    dumped = out.model_dump_json()
    assert "Price" not in dumped and "John" not in dumped, dumped


def test_a_json_tool_result_is_redacted_value_by_value_and_stays_json(redactor):
    # In JSON text the address's line break is "\n" (two characters): redacted as a JSON string value
    # the address is whole again, with its city, state and ZIP code; keys are redacted too.
    address = "17 Harbor View Rd\nLake Brittany, FM 93527"
    content = json.dumps({"contact": address, "ana@example.org": "primary"})
    (out,) = redactor.redact([Trace(source="test", request=ChatRequest(messages=[
        Message(role="user", content=f"Ship to {address}"),
        Message(role="tool", tool_call_id="c1", content=content)]))])
    result = json.loads(out.request.messages[1].content)
    assert result == {"contact": "<STREET_ADDRESS_1>", "<EMAIL_ADDRESS_1>": "primary"}
    assert out.request.messages[0].content == "Ship to <STREET_ADDRESS_1>"
    plain = Message(role="tool", tool_call_id="c2", content="{not json, mail ana@example.org")
    (out,) = redactor.redact([Trace(source="test", request=ChatRequest(messages=[plain]))])
    assert out.request.messages[0].content == "{not json, mail <EMAIL_ADDRESS_1>"


# -- identity fields: keyed pseudonyms -------------------------------------------------------------
def identity_trace(user_id: str | None, session_id: str | None = None, *, text: str = "Where is my card?") -> Trace:
    return Trace(source="test", request=ChatRequest(messages=[Message(role="user", content=text)]),
                 response=Message(role="assistant", content="It ships today."), user_id=user_id, session_id=session_id)


def test_identity_ids_with_pii_become_keyed_stable_pseudonyms(workspace, tmp_path):
    """An e-mail user id is a pseudonym per user (not one placeholder for all): the same id gives the same
    pseudonym, two ids two; keyed by the workspace's 0600 key file, so another workspace's differ."""
    import hashlib
    import os
    import re

    from aad_core.workspace import PSEUDONYM_KEY_FILE, Workspace

    r = create_component("redactor", "presidio", spacy_model=None, workspace=workspace)
    other = "bob.stone@example.org"
    a, b, again, plain = r.redact([identity_trace(EMAIL, session_id=f"chat-{EMAIL}"), identity_trace(other),
                                   identity_trace(EMAIL, text=f"I am {EMAIL}"), identity_trace("u-7", "s-1")])
    assert re.fullmatch(r"<EMAIL_ADDRESS>-[0-9a-f]{12}", a.user_id)
    assert a.user_id == again.user_id and a.user_id != b.user_id  # one user, one pseudonym; two users, two
    assert re.fullmatch(r"<EMAIL_ADDRESS>-[0-9a-f]{12}", a.session_id) and a.session_id != a.user_id
    assert (plain.user_id, plain.session_id) == ("u-7", "s-1")  # no PII: unchanged
    assert again.request.messages[0].content == "I am <EMAIL_ADDRESS_1>"  # the message keeps its placeholder
    for t in (a, b, again):
        assert EMAIL not in t.model_dump_json() and other not in t.model_dump_json()
    assert hashlib.sha256(EMAIL.encode()).hexdigest()[:12] not in a.user_id  # keyed, not a plain hash
    key = workspace.data_dir / PSEUDONYM_KEY_FILE
    assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32

    # The same workspace given as a folder, by a new redactor: the same pseudonym (the key file is read back).
    by_path = create_component("redactor", "presidio", spacy_model=None, workspace=str(workspace.root))
    assert by_path.redact([identity_trace(EMAIL)])[0].user_id == a.user_id
    elsewhere = create_component("redactor", "presidio", spacy_model=None, workspace=Workspace.init(tmp_path / "o"))
    assert elsewhere.redact([identity_trace(EMAIL)])[0].user_id != a.user_id  # another key
    os.chmod(key, 0o644)  # a key file others can read is made private again
    assert create_component("redactor", "presidio", spacy_model=None, workspace=workspace).redact(
        [identity_trace(EMAIL)])[0].user_id == a.user_id
    assert key.stat().st_mode & 0o777 == 0o600


def test_an_unusable_key_file_never_lets_the_raw_id_through(workspace):
    from aad_core.workspace import PSEUDONYM_KEY_FILE

    (workspace.data_dir / PSEUDONYM_KEY_FILE).write_bytes(b"not a key")
    r = create_component("redactor", "presidio", spacy_model=None, workspace=workspace)
    (out,) = r.redact([identity_trace(EMAIL)])
    assert out.user_id == "<EMAIL_ADDRESS_1>" and EMAIL not in out.model_dump_json()  # the placeholder, as before
    # Repaired: the next try after the retry interval reads the key, and pseudonyms come back.
    (workspace.data_dir / PSEUDONYM_KEY_FILE).unlink()
    r._key_retry_at = 0.0
    (out,) = r.redact([identity_trace(EMAIL)])
    assert out.user_id.startswith("<EMAIL_ADDRESS>-") and EMAIL not in out.model_dump_json()


def test_pseudonyms_are_stable_across_capture_writers_and_no_raw_id_reaches_the_disk(workspace):
    """Two writers of one workspace, one after the other: the same e-mail user id is stored as the same
    pseudonym, another as another; the raw ids are nowhere under .aad/."""
    from aad_core.capture import CaptureWriter
    from aad_core.config import AADSettings

    config = AADSettings(redactor={"presidio": {"spacy_model": None}})
    other = "bob.stone@example.org"
    for user in (EMAIL, other):
        w = CaptureWriter(workspace=workspace, config=config)
        w.submit(identity_trace(user, session_id="s-1"))
        w.submit(identity_trace(EMAIL, session_id="s-2"))
        assert w.flush(120)
        w.close()
    with workspace.store() as store:
        traces = list(store.iter_traces())
    assert len(traces) == 4 and all(t.redacted for t in traces)
    by_session = {s: sorted({t.user_id for t in traces if t.session_id == s}) for s in ("s-1", "s-2")}
    assert len(by_session["s-2"]) == 1  # EMAIL through both writers: one pseudonym
    assert len(by_session["s-1"]) == 2 and by_session["s-2"][0] in by_session["s-1"]
    assert all(u.startswith("<EMAIL_ADDRESS>-") for u in by_session["s-1"])
    with workspace.store() as store:
        assert len(list(store.iter_traces(user_id=by_session["s-2"][0]))) == 3  # per-user queries work
    conn = sqlite3.connect(workspace.db_path)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    on_disk = b"".join(p.read_bytes() for p in workspace.data_dir.rglob("*") if p.is_file())
    assert EMAIL.encode() not in on_disk and other.encode() not in on_disk

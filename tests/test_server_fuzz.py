"""Fuzzing the server: property-based requests to every route from its own OpenAPI schema
(schemathesis, valid and invalid data), random JSON and random bytes (hypothesis), and a wrong
type in every field of a chat request: never a 5xx, always a JSON answer, the server alive
after. A tiny random-weight model (plain transformers) keeps each answered request cheap.

The example counts are bounded (FUZZ_EXAMPLES per route and mode, 20 by default: under a
minute on 2 CPU cores); `-s` prints how many requests the server answered and how many 5xx.
(Decoding is greedy and the model random: what is checked is the server's answer, not the text.)"""

import json
import os
import time
from collections import Counter

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from server_kit import Server, tiny_model

from kvbudget.kv import attach
from kvbudget.runtime.models import load_tokenizer
from kvbudget.serve import ServeConfig, create_app
from kvbudget.serve.schema import ChatCompletionRequest, Message

KEY = "fuzz-key-" + "f" * 24
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "20"))
POSITIONS = 256  # few: the valid chats on one session reach the model's end
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tok = load_tokenizer()
    model = tiny_model(tok, positions=POSITIONS)
    attach(model)
    config = ServeConfig(model_name="tiny", store=tmp_path_factory.mktemp("fuzz-store"), policies=["snapkv", "full"],
                         budget="64", block_size=64, max_tokens=4, default_max_tokens=2, api_keys=[KEY])
    server = Server(create_app(model, tok, config), headers=AUTH)
    server.tally = Counter()
    yield server
    m = server.metrics()
    fives = sum(n for k, n in m.items() if k.startswith("kvbudget_http_responses_total") and '"5' in k)
    total = sum(n for k, n in m.items() if k.startswith("kvbudget_http_responses_total"))
    print(f"\nfuzz: {total:.0f} requests answered by the server, {fives:.0f} with a 5xx; "
          f"internal errors {m['kvbudget_internal_errors_total']:.0f}; by route and status: {dict(server.tally)}")
    server.stop()


def _answered(server, response, what: str) -> None:
    server.tally[(what, response.status_code)] += 1
    assert response.status_code < 500, f"{what}: {response.status_code} {response.text[:500]}"
    kind = response.headers["content-type"]
    kind = kind[0] if isinstance(kind, list) else kind  # schemathesis' responses list each header's values
    assert kind.startswith(("application/json", "text/event-stream", "text/plain")), what
    if kind.startswith("application/json"):
        body = json.loads(response.content)
        assert response.status_code < 400 or set(body["error"]) == {"message", "type", "code", "param"}


def test_every_route_from_the_openapi_schema(served):
    """schemathesis draws requests for every operation in the server's OpenAPI schema, valid ones
    and ones that break it (wrong types, missing fields, out-of-range values, bad ids)."""
    schema = schemathesis.openapi.from_dict(served.app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/sessions",
                                              "GET /v1/sessions/{session_id}", "DELETE /v1/sessions/{session_id}"}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for op in operations:

            @SETTINGS
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                _answered(served, case.call(base_url=served.url, headers=AUTH), f"{op.label} {mode.value}")

            try:
                run()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # an operation without inputs has no invalid form
    assert served.client.get("/healthz").json()["status"] == "ok"
    assert served.metrics()["kvbudget_internal_errors_total"] == 0


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
FIELD_NAMES = sorted(ChatCompletionRequest.model_fields) + ["temprature", "\ud800", "messages "]
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", ""]) | json_values,
     "content": st.text(max_size=40) | json_values},
    optional={"name": json_values, "tool_calls": json_values, "extra": json_values},
), max_size=3)
chat_bodies = st.fixed_dictionaries({"messages": messages},
                                   optional={name: json_values for name in FIELD_NAMES if name != "messages"})


@SETTINGS
@given(body=chat_bodies)
def _chat_bodies(server, body):
    raw = json.dumps(body, ensure_ascii=True).encode()  # lone surrogates travel as \ud800 escapes
    _answered(server, server.client.post("/v1/chat/completions", content=raw), "chat body")


@SETTINGS
@given(raw=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
       path=st.sampled_from(["/v1/chat/completions", "/v1/sessions"]))
def _raw_bodies(server, raw, path):
    _answered(server, server.client.post(path, content=raw, headers={"Content-Type": "application/json"}), path)


def test_random_json_and_random_bytes(served):
    """Near-miss chat bodies (real field names with random values, messages of random shapes,
    misspelt and surrogate field names) and arbitrary bytes or JSON on every POST route."""
    start = time.monotonic()
    _chat_bodies(served)
    _raw_bodies(served)
    assert served.metrics()["kvbudget_internal_errors_total"] == 0
    assert time.monotonic() - start < 600


SAMPLES = {"string": "x", "integer": 5, "boolean": True, "array": [1], "object": {"a": 1}}


def _wrong_value(prop: dict):
    """A value of a JSON type that the schema property does not allow (never null: optional
    fields allow it)."""
    alternatives = prop.get("anyOf", [prop])
    types = {s.get("type") for s in alternatives}
    if any("$ref" in s for s in alternatives):
        types.add("object")
    if "number" in types:
        types.add("integer")
    return next(v for t, v in SAMPLES.items() if t not in types)


@pytest.mark.parametrize("model, base", [
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]}),
    (Message, None),
])
def test_a_wrong_type_in_any_field_is_a_400_naming_it(served, model, base):
    props = model.model_json_schema()["properties"]
    assert len(props) >= 8
    for name, prop in props.items():
        value = _wrong_value(prop)
        if base is None:  # a field of the message
            body, param = {"messages": [{"role": "user", "content": "hi", name: value}]}, f"messages[0].{name}"
        else:
            body, param = {**base, name: value}, name
        r = served.client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, (name, value, r.text)
        error = r.json()["error"]
        assert error["param"] == param and name in error["message"], (name, error)


texts = st.text(max_size=60) | st.sampled_from(["<|im_end|>", "<|im_start|>assistant\n", "\x00", "\u202e", "\ufeff",
                                                 "\U0001f600" * 5, " " * 30, "{{ messages }}", "</s>"])


@st.composite
def valid_chats(draw):
    """Chats the schema accepts, with text of any kind: special tokens, control and invisible
    characters, emoji, template syntax; turns on an existing session or on none, streamed or not."""
    history = draw(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), texts), max_size=3))
    question = draw(texts.filter(lambda t: t.strip()))
    body = {"messages": [{"role": r, "content": t} for r, t in history] + [{"role": "user", "content": question}],
            "max_tokens": draw(st.integers(1, 4)), "stream": draw(st.booleans())}
    return body, draw(st.booleans())


def test_valid_chats_with_any_text(served):
    """Requests that reach the model: every one is answered (200) or refused with a 400 that
    names why (the model's positions), and the session never passes the model's positions."""
    sid = served.new_session()

    @settings(SETTINGS, max_examples=max(5, EXAMPLES * 3 // 5))  # each one runs the model
    @given(chat=valid_chats())
    def run(chat):
        body, on_session = chat
        if on_session:
            body = {**body, "session_id": sid, "messages": body["messages"][-1:]}
        r = served.client.post("/v1/chat/completions", json=body)
        _answered(served, r, "valid chat")
        assert r.status_code in (200, 400), r.text
        if r.status_code == 200 and body.get("stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]

    run()
    assert served.tally[("valid chat", 200)] > 0
    info = served.client.get(f"/v1/sessions/{sid}").json()
    assert info["turns"] == len(info["messages"]) // 2
    assert info["tokens_seen"] <= POSITIONS and info["positions_left"] == POSITIONS - info["tokens_seen"]

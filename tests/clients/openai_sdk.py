"""The official OpenAI Python SDK against a running gateway.

Env: TRIAGE_URL (e.g. http://127.0.0.1:8080), TRIAGE_KEY, TRIAGE_MODEL (default "auto").
Prints one `ok NAME` / `FAIL NAME: why` line per check; exits 1 on any failure.
"""
import json
import os
import sys

import openai

URL = os.environ["TRIAGE_URL"].rstrip("/") + "/v1"
KEY = os.environ["TRIAGE_KEY"]
MODEL = os.environ.get("TRIAGE_MODEL", "auto")
client = openai.OpenAI(base_url=URL, api_key=KEY, max_retries=0)
failed = False


def check(name):
    def run(fn):
        global failed
        try:
            fn()
            print(f"ok {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is reported the same way
            failed = True
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        return fn
    return run


@check("responses.create")
def _():
    r = client.responses.create(model=MODEL, input="Say hi.")
    assert r.id.startswith("resp_"), r.id
    assert r.status == "completed", r.status
    assert r.output_text, "empty output_text"


@check("responses.create stream")
def _():
    types = []
    with client.responses.stream(model=MODEL, input="Say hi.") as s:
        for ev in s:
            types.append(ev.type)
        final = s.get_final_response()
    assert types[0] == "response.created", types
    assert types[-1] == "response.completed", types
    assert "response.output_text.delta" in types, types
    assert final.output_text, "empty final text"


@check("responses function tool round trip")
def _():
    tools = [{
        "type": "function", "name": "get_weather", "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    }]
    inp = [{"role": "user", "content": "What's the weather in Paris? Use the tool."}]
    first = client.responses.create(model=MODEL, input=inp, tools=tools, store=False)
    calls = [o for o in first.output if o.type == "function_call"]
    if calls:
        c = calls[0]
        json.loads(c.arguments or "{}")
        inp += [c.model_dump(exclude_none=True),
                {"type": "function_call_output", "call_id": c.call_id, "output": "sunny"}]
    else:
        # An upstream that answered in text: still send a tool result shape back.
        inp += [{"type": "function_call", "call_id": "call_x", "name": "get_weather",
                 "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call_output", "call_id": "call_x", "output": "sunny"}]
    second = client.responses.create(model=MODEL, input=inp, tools=tools, store=False)
    assert second.status == "completed", second.status


@check("responses previous_response_id")
def _():
    a = client.responses.create(model=MODEL, input="Remember the word: banana.")
    b = client.responses.create(model=MODEL, input="Which word?", previous_response_id=a.id)
    assert b.previous_response_id == a.id
    got = client.responses.retrieve(a.id)
    assert got.id == a.id
    client.responses.delete(a.id)
    try:
        client.responses.retrieve(a.id)
        raise AssertionError("deleted response still retrievable")
    except openai.NotFoundError:
        pass


@check("chat.completions.create")
def _():
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}])
    assert r.choices[0].message.content


@check("models.retrieve")
def _():
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL, m.id


@check("error envelope")
def _():
    try:
        client.responses.create(model="no-such-model-xyz", input="hi")
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.body and e.body.get("type") == "invalid_request_error", e.body
    bad = openai.OpenAI(base_url=URL, api_key="sk-wrong", max_retries=0)
    try:
        bad.responses.create(model=MODEL, input="hi")
        raise AssertionError("wrong key accepted")
    except openai.AuthenticationError:
        pass


sys.exit(1 if failed else 0)

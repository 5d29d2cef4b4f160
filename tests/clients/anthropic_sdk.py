"""Anthropic Python SDK checks against a running triage (see anthropic_check.sh).

Env: TRIAGE_URL (the gateway's base, e.g. http://127.0.0.1:8080), TRIAGE_KEY,
TRIAGE_MODEL (default claude-sonnet-4-5: resolved by the default config's
aliases). Prints one `ok NAME` / `FAIL NAME: why` line per check; exits 1 on
any failure.
"""

import os
import sys
import traceback

import anthropic

URL = os.environ["TRIAGE_URL"].rstrip("/")
KEY = os.environ["TRIAGE_KEY"]
MODEL = os.environ.get("TRIAGE_MODEL", "claude-sonnet-4-5")

client = anthropic.Anthropic(base_url=URL, api_key=KEY, max_retries=0)
failures = 0


def check(name):
    def wrap(fn):
        global failures
        try:
            fn()
            print(f"ok {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - any failure is a FAIL line
            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stderr)
        return fn

    return wrap


@check("messages.create")
def _():
    m = client.messages.create(
        model=MODEL, max_tokens=4096, messages=[{"role": "user", "content": "say hi"}]
    )
    assert m.type == "message" and m.role == "assistant", m
    assert m.content and m.content[0].type == "text" and m.content[0].text, m
    assert m.stop_reason in ("end_turn", "max_tokens"), m.stop_reason
    assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0, m.usage


@check("messages.stream")
def _():
    with client.messages.stream(
        model=MODEL, max_tokens=256, messages=[{"role": "user", "content": "count to five"}]
    ) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text, "no text streamed"
    assert final.content[0].text == text, (final, text)
    assert final.stop_reason is not None


WEATHER = {
    "name": "weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@check("tool round trip")
def _():
    # The demo mock does not call tools by itself: replay an assistant tool_use
    # turn as a client would after one, and check the result is answered.
    msgs = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_01", "name": "weather", "input": {"city": "Paris"}}],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "sunny, 24C"}]},
    ]
    m = client.messages.create(model=MODEL, max_tokens=256, tools=[WEATHER], messages=msgs)
    assert m.type == "message", m
    assert any(b.type in ("text", "tool_use") for b in m.content), m


@check("count_tokens")
def _():
    r = client.messages.count_tokens(
        model=MODEL, system="be brief", messages=[{"role": "user", "content": "hello there"}]
    )
    assert r.input_tokens > 0, r


@check("error envelope (bad key)")
def _():
    bad = anthropic.Anthropic(base_url=URL, api_key="sk-not-a-key", max_retries=0)
    try:
        bad.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    except anthropic.AuthenticationError as e:
        assert e.status_code == 401, e.status_code
        assert e.body["type"] == "error" and e.body["error"]["type"] == "authentication_error", e.body
        return
    raise AssertionError("a bad key was accepted")


@check("error envelope (unknown model)")
def _():
    try:
        client.messages.create(model="no-such-model", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    except anthropic.NotFoundError as e:
        assert e.body["error"]["type"] == "not_found_error", e.body
        return
    raise AssertionError("an unknown model was accepted")


sys.exit(1 if failures else 0)

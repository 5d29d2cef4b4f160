#!/usr/bin/env bash
# Real Anthropic clients against a running triage: the Python SDK
# (anthropic_sdk.py) and Claude Code (`claude -p`).
#
#   TRIAGE_URL=http://127.0.0.1:8080 TRIAGE_KEY=sk-triage-demo \
#   PY=/path/to/python-with-anthropic CLAUDE=/path/to/claude \
#   tests/clients/anthropic_check.sh
#
# Prints one `ok NAME` / `FAIL NAME` line per check; exits non-zero on any failure.
set -u
: "${TRIAGE_URL:?set TRIAGE_URL (e.g. http://127.0.0.1:8080)}"
: "${TRIAGE_KEY:?set TRIAGE_KEY}"
: "${PY:?set PY to a python with anthropic installed}"
: "${CLAUDE:?set CLAUDE to the claude CLI}"
here="$(cd "$(dirname "$0")" && pwd)"
fail=0

TRIAGE_URL="$TRIAGE_URL" TRIAGE_KEY="$TRIAGE_KEY" "$PY" "$here/anthropic_sdk.py" || fail=1

home="$(mktemp -d)"
trap 'rm -rf "$home"' EXIT
out="$(cd "$home" && HOME="$home" \
    ANTHROPIC_BASE_URL="$TRIAGE_URL" ANTHROPIC_API_KEY="$TRIAGE_KEY" \
    CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1 \
    timeout 120 "$CLAUDE" -p "say hi" 2>"$home/claude.err")"
rc=$?
if [ "$rc" -eq 0 ] && [ -n "$out" ]; then
    echo "ok claude -p"
else
    echo "FAIL claude -p: exit $rc, output: ${out:0:200} $(head -c 400 "$home/claude.err")"
    fail=1
fi
exit "$fail"

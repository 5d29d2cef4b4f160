#!/usr/bin/env bash
# Client check for the OpenAI side: the Python SDK and the Codex CLI against a running gateway.
# Env: TRIAGE_URL (http://host:port, no /v1), TRIAGE_KEY, PY (python with openai==3.63.0),
#      CODEX (path to the codex CLI), TRIAGE_MODEL (default "auto").
# One `ok NAME` / `FAIL NAME` line per check; exits non-zero on any failure.
set -u
: "${TRIAGE_URL:?}" "${TRIAGE_KEY:?}" "${PY:?}" "${CODEX:?}"
here="$(cd "$(dirname "$0")" && pwd)"
model="${TRIAGE_MODEL:-auto}"
fail=0

TRIAGE_URL="$TRIAGE_URL" TRIAGE_KEY="$TRIAGE_KEY" TRIAGE_MODEL="$model" "$PY" "$here/openai_sdk.py" || fail=1

codex_home="$(mktemp -d)"
trap 'rm -rf "$codex_home"' EXIT
work="$codex_home/work"
mkdir -p "$work"
# Codex offers its hosted web_search tool unless told not to; a chat upstream cannot run it
# (triage answers 400 naming the tool), so the check turns it off as a user would.
if (cd "$work" && CODEX_HOME="$codex_home" GW_KEY="$TRIAGE_KEY" timeout 120 "$CODEX" exec \
    --skip-git-repo-check -m "$model" -c model_provider=gw -c 'web_search="disabled"' \
    -c "model_providers.gw={name=\"gw\",base_url=\"$TRIAGE_URL/v1\",env_key=\"GW_KEY\",wire_api=\"responses\"}" \
    "say hi" >"$codex_home/out.txt" 2>&1); then
    echo "ok codex exec"
else
    echo "FAIL codex exec"
    tail -n 20 "$codex_home/out.txt" | sed 's/^/    /'
    fail=1
fi
exit "$fail"

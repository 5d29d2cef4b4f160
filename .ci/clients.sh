#!/usr/bin/env bash
# Client check: the official Python SDKs and the real agent CLIs (Claude Code,
# Codex) against `triage serve` on the default config and its mock provider.
# Clients are installed outside the repo (pinned), so nothing here is committed.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${TRIAGE_CLIENTS_DIR:-$HOME/.cache/triage-clients}
mkdir -p "$CLIENTS"
if [ ! -x "$CLIENTS/venv/bin/python" ]; then
  python3 -m venv "$CLIENTS/venv"
fi
"$CLIENTS/venv/bin/pip" install -q --disable-pip-version-check openai==3.63.0 anthropic==2.17.0
if [ ! -x "$CLIENTS/node_modules/.bin/claude" ] || [ ! -x "$CLIENTS/node_modules/.bin/codex" ]; then
  (cd "$CLIENTS" && { [ -f package.json ] || npm init -y >/dev/null; } \
    && npm install --silent --no-audit --no-fund @anthropic-ai/claude-code@2.1.332 @openai/codex@0.171.0)
fi

cargo build -q --bin triage
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/debug/triage serve -c config/triage.toml --listen "127.0.0.1:$port" >"$work/triage.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

export TRIAGE_URL="http://127.0.0.1:$port" TRIAGE_KEY=sk-triage-demo
export PY="$CLIENTS/venv/bin/python" CLAUDE="$CLIENTS/node_modules/.bin/claude" CODEX="$CLIENTS/node_modules/.bin/codex"
status=0
bash tests/clients/openai_check.sh | tee "$work/openai.out" || status=1
bash tests/clients/anthropic_check.sh | tee "$work/anthropic.out" || status=1
passed=$(cat "$work"/*.out | grep -c '^ok ' || true)
failed=$(cat "$work"/*.out | grep -c '^FAIL ' || true)
if [ "$status" -ne 0 ]; then
  echo "--- gateway log (last 40 lines)"; tail -40 "$work/triage.log"
fi
echo "clients: $passed passed, $failed failed"
exit $status

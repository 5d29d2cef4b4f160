#!/usr/bin/env bash
# Soak test: mixed traffic through a triage child process against a local
# fault-injecting mock upstream (127.0.0.1 only) for N minutes (default 10).
# Prints requests served, errors by kind, and triage's resident memory at
# start, peak and end. SOAK_PROFILE=dev skips the (slow, LTO) release build.
#   benches/soak.sh [minutes] [extra soak args, e.g. --concurrency 32]
set -euo pipefail
minutes="${1:-10}"
shift || true
cd "$(dirname "$0")/.."
profile="${SOAK_PROFILE:-release}"
case "$profile" in
  dev|debug) cargo build --bin triage --example soak; dir=target/debug ;;
  *) cargo build --profile "$profile" --bin triage --example soak; dir="target/$profile" ;;
esac
exec "$dir/examples/soak" --minutes "$minutes" --triage "$dir/triage" "$@"

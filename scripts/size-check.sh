#!/usr/bin/env bash
# Prints what the commits since BASE would add to a submission: files over
# 512 KB and the total diff size. A submission is capped (512 MiB packed,
# 256 MiB of diffs), so run this before pushing a large change.
set -euo pipefail
base=${1:-session-base}
git rev-parse -q --verify "$base" >/dev/null || base=$(git rev-list --max-parents=0 HEAD | tail -1)
echo "diff bytes since $base: $(git log -p --no-color "$base"..HEAD | wc -c)"
git diff --name-only "$base" HEAD | while read -r f; do
  [ -f "$f" ] && s=$(stat -c %s "$f") && [ "$s" -gt 524288 ] && echo "large: $f ($s bytes)"
done || true

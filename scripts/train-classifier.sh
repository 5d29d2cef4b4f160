#!/usr/bin/env bash
# Retrains the embedded request classifier shipped in models/classifier.bin, with the
# softmax temperature fitted on held-out sources, then prints the source-held-out
# evaluation recorded in models/README.md.
# Usage: scripts/train-classifier.sh [TRAIN_JSONL] [--set KEY=VALUE ...]
#   (default data: ../shared/data/classifier/train.jsonl; options as in `triage classifier train`)
# Both steps train once per `source` (123 on the shipped set): minutes, single-threaded.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data/classifier/train.jsonl}
shift || true
cargo build --release
target/release/triage classifier train --calibrate --data "$data" --out models/classifier.bin "$@"
target/release/triage classifier eval --split source --data "$data" "$@"

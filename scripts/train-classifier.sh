#!/usr/bin/env bash
# Retrains the embedded request classifier shipped in models/classifier.bin.
# Usage: scripts/train-classifier.sh [TRAIN_JSONL]   (default: ../shared/data/classifier/train.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --release -- classifier train --data "${1:-../shared/data/classifier/train.jsonl}" --out models/classifier.bin

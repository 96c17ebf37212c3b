#!/usr/bin/env bash
# The agent recipe (README "Agents", docs/design.md §5.4): the main job's checkpoint fine-tuned on verified tool-use
# dialogues and calculator problems, then evaluated on held-out tasks. Each step resumes or reuses what an earlier
# run of this script left in runs/ and build/agent/. Figures, budget and commit: benchmarks/RESULTS.md "agentic".
# Usage: bash tools/agent.sh [extra `longcat-lab eval --agentic` arguments]
source "$(dirname "$0")/env.sh"
set -euo pipefail
data=build/agent
mkdir -p "$data"
longcat-lab train --preset small --out runs/small --resume --no-progress
longcat-lab synth --n 6000 --seed 0 --out "$data/dialogues.jsonl" --no-progress
longcat-lab arithmetic --n 400 --out "$data/arithmetic.jsonl"
cat "$data/dialogues.jsonl" "$data/arithmetic.jsonl" > "$data/sft.jsonl"
longcat-lab sft --init-from runs/small --data "$data/sft.jsonl" --out runs/agent --resume --no-progress \
    --steps 300 --lr 2e-3 --set batch_size=4 --set grad_accum=1
longcat-lab eval --agentic --ckpt runs/agent --sft-data "$data/sft.jsonl" --no-progress \
    --cells 1-1-1 3-1-1 1-3-1 1-1-3 --per-cell 20 --k 2 --structured both --arithmetic 32 "$@"

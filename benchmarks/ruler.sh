#!/usr/bin/env bash
# RULER with every main policy: generate the tasks (seeded, lengths in the model's tokens), then one
# resumable `kvbudget eval` sweep over them in multi-turn (question-agnostic) and query-aware
# (optimistic) modes. docs/field-benchmarks.md quotes its results.
#
#   LENGTH=4096 TASKS=niah_single_1 N=1 OUT=benchmarks/results/ruler/cpu-4k bash benchmarks/ruler.sh
#
# Settings (environment): LENGTH (4096), TASKS (comma list of RULER tasks, or all), N contexts per
# task (1), SEED (0), HAYSTACK (empty: RULER's own per task; noise, essay or prose replaces it),
# ESSAY (a text file for essay haystacks; without one, built-in prose stands in), POLICIES, BUDGETS (2x,4x,8x), MODES,
# BLOCK (512), NEW_TOKENS (32), MODEL (default: the embedded SmolLM2-135M), DEVICE (cpu), OUT.
set -euo pipefail
LENGTH=${LENGTH:-4096}
TASKS=${TASKS:-all}
N=${N:-1}
SEED=${SEED:-0}
HAYSTACK=${HAYSTACK:-}
POLICIES=${POLICIES:-streaming,snapkv,h2o,tova,knorm,adakv,pyramidkv,kivi4,snapkv+kivi4,kvzip}
BUDGETS=${BUDGETS:-2x,4x,8x}
MODES=${MODES:-multi-turn,query-aware}
BLOCK=${BLOCK:-512}
NEW_TOKENS=${NEW_TOKENS:-32}
OUT=${OUT:-kvbudget-ruler-$LENGTH}
mkdir -p "$OUT"
model=(); [[ -n "${MODEL:-}" ]] && model=(--model "$MODEL")
device=(); [[ -n "${DEVICE:-}" ]] && device=(--device "$DEVICE")
hay=(); [[ -n "$HAYSTACK" ]] && hay=(--haystack "$HAYSTACK")
essay=(); [[ -n "${ESSAY:-}" ]] && essay=(--essay "$ESSAY")
: > "$OUT/tasks.jsonl.parts"
for task in ${TASKS//,/ }; do
    python3 -m kvbudget.cli tasks make ruler --task "$task" --length "$LENGTH" --n "$N" --seed "$SEED" \
        "${hay[@]}" "${essay[@]}" "${model[@]}" --out "$OUT/tasks-$task.jsonl"
    cat "$OUT/tasks-$task.jsonl" >> "$OUT/tasks.jsonl.parts"
    rm "$OUT/tasks-$task.jsonl"
done
mv "$OUT/tasks.jsonl.parts" "$OUT/tasks.jsonl"
python3 -m kvbudget.cli eval --tasks "$OUT/tasks.jsonl" --policy "$POLICIES" --budget "$BUDGETS" --mode "$MODES" \
    --block-size "$BLOCK" --max-new-tokens "$NEW_TOKENS" --seed "$SEED" --no-progress "${model[@]}" "${device[@]}" \
    --out "$OUT" | tee "$OUT/stdout.txt"

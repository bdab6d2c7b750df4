#!/usr/bin/env bash
# What the fourth session (2026-11-23, no GPU lent) built and could not time: the measurements,
# queued for the next session with a GPU (`device`, H100). Each step fits one 10-minute call:
#
#   bash benchmarks/gpu_queue.sh check   # CUDA correctness: gpu_tests groups + every KIVI variant
#   bash benchmarks/gpu_queue.sh kivi    # the fused KIVI kernels (fold, gather) vs bf16 SDPA
#   bash benchmarks/gpu_queue.sh adakv   # Ada-KV by a stable sort, one sync: A/B vs commit 8ab01f0
#   bash benchmarks/gpu_queue.sh lazy    # pass-2 tiles of the scoring kernels: sweep, then whole prefills
#   bash benchmarks/gpu_queue.sh parts   # the parts KIVI kernel: checks, then launch settings vs fold
#   bash benchmarks/gpu_queue.sh parts-final  # the parts default: model-level checks, bench at 8k-128k
#   bash benchmarks/gpu_queue.sh codec   # eighth session: Triton KIVI codec + in-place flush, A/B vs ab_old/
#   bash benchmarks/gpu_queue.sh nosync  # ninth session: store eviction without host syncs, A/B vs ab_old/
#   bash benchmarks/gpu_queue.sh settle  # ninth session: its one read deferred past the next block, A/B vs ab_old/
#   bash benchmarks/gpu_queue.sh lean    # ninth session: smaller scoring chunks, fewer store kernels, A/B vs ab_old/
#   bash benchmarks/gpu_queue.sh hostsnap  # ninth session: answer snapshots in pinned host memory, A/B vs ab_old/
#   bash benchmarks/gpu_queue.sh window-checks  # tenth session: SnapKV's window through the kernels: sweep, checks
#   bash benchmarks/gpu_queue.sh window  # tenth session: the same, 32k prefills A/B vs ab_old/
#   bash benchmarks/gpu_queue.sh fits    # tenth session: stateful scorers' updates stacked while the context fits
#   bash benchmarks/gpu_queue.sh lazybits  # tenth session: LazyEviction's scan as bits (consecutive queries)
#   bash benchmarks/gpu_queue.sh bits32  # eleventh session: LazyEviction's bits in 32-bit integers, A/B vs ab_old/
#
# `adakv` needs the old code beside the new, as an untracked folder that travels with the tree:
#   mkdir oldref && git archive 8ab01f0 src benchmarks | tar -x -C oldref && rm -rf oldref/benchmarks/results
# (delete it afterwards). Outputs go to $OUT; commit them under benchmarks/results/gpu-h100/.
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# The A/B steps run the old code (an untracked copy in ab_old/src, made as each step says) and
# the new code alternately. ab_rounds TAG POLICIES: two rounds of 32k prefills of the 8B shape
# (policy_overhead.py), printing the table rows. answer_memory FILE RUNS [options]: the memory of
# an answer with decode-time compression every 64 tokens (decode_memory.py), old then new; FILE
# names the output with {v} for old / new.
need_old() { [[ -d ab_old/src ]] || { echo "ab_old/ missing (see the step)" >&2; exit 2; }; }
src_of() { if [[ $1 == old ]]; then echo ab_old/src; else echo src; fi; }
ab_rounds() {
    local tag=$1 policies=$2 i v
    need_old
    for i in 1 2; do
        for v in old new; do
            echo "# round $i: $v"
            PYTHONPATH=$(src_of $v) python3 benchmarks/policy_overhead.py --model llama8b --device cuda \
                --context 32768 --budget 2048 --block-size 2048 --repeats 2 --policies "$policies" \
                --out "$OUT/ovh-$tag-$v-$i.jsonl" 2>&1 | grep -E "^ +[0-9]"
        done
    done
}
answer_memory() {
    local file=$1 runs=$2 v
    shift 2
    need_old
    for v in old new; do
        echo "# answer memory: $v"
        PYTHONPATH=$(src_of $v) python3 benchmarks/decode_memory.py --runs "$runs" --interval 64 "$@" \
            --out "$OUT/${file//\{v\}/$v}" 2>&1 | tail -n 2
    done
}
VARIANTS="fold;gather"  # the session's stack kernel was measured here and removed (docs/kernels.md)
# kernel@BLOCK_N,WARPS,STAGES,RESIDENT,MAXNREG (kernel_bench.kivi_variant); resident from ptxas's registers
PARTS_VARIANTS="fold;parts@32,4,1,3,168;parts@32,2,1,4,0;parts@16,2,1,4,0;parts@64,4,1,2,0;parts@16,1,1,8,0;parts@32,4,2,3,168"
case "${1:-}" in
    check)
        PYTHONPATH=src python3 benchmarks/gpu_tests.py stacked ragged lse lazy 2>&1 | tee "$OUT/gpu_tests-session4.log"
        ;;
    kivi)
        # Correctness of each variant first (the bench's check), then 32k / 128k at batch 1 and 8.
        PYTHONPATH=src python3 benchmarks/kernel_bench.py --only-kivi --contexts 32768,131072 \
            --kivi-variants "$VARIANTS" --out "$OUT/kivi-stack-sweep.jsonl" 2>&1 | tee "$OUT/kivi-stack-sweep.log"
        ;;
    adakv)
        [[ -d oldref/src ]] || { echo "oldref/ missing (see the top of this script)" >&2; exit 2; }
        A="--model llama8b --device cuda --context 32768 --budget 2048 --block-size 2048 --repeats 2 --policies snapkv,adakv"
        for i in 1 2; do
            PYTHONPATH=oldref/src python3 oldref/benchmarks/policy_overhead.py $A --out "$OUT/adakv-sort-old-$i.jsonl" \
                > "$OUT/adakv-sort-old-$i.txt" 2>&1
            PYTHONPATH=src python3 benchmarks/policy_overhead.py $A --out "$OUT/adakv-sort-new-$i.jsonl" \
                > "$OUT/adakv-sort-new-$i.txt" 2>&1
        done
        PYTHONPATH=src python3 benchmarks/compress_profile.py adakv > "$OUT/compress_profile-adakv-sort.log" 2>&1
        tail -n 5 "$OUT"/adakv-sort-*.txt
        ;;
    lazy)
        # Fifth session: pass 2 alone over 8 stacked layers, then the old and new lazy tiles in
        # whole 32k prefills (block_m,block_n,warps,stages,query_axis), then the CUDA checks.
        PYTHONPATH=src python3 benchmarks/scoring_bench.py --sweep-reduce --batch 8 --sweep-block-m 32,64 \
            --repeats 5 --out "$OUT/sweep-b8.jsonl" > "$OUT/sweep-b8.log" 2>&1
        PYTHONPATH=src python3 benchmarks/score_tiles_ab.py --policy lazy --mode lazy \
            --tiles "64,64,4,-,0;32,128,4,3,1;32,64,4,3,1" --rounds 2 --out "$OUT/tiles-lazy-final.jsonl"
        PYTHONPATH=src python3 benchmarks/gpu_tests.py lazy stacked 2>&1 | tee "$OUT/gpu_tests-session5.log"
        ;;
    codec)
        # Eighth session: the Triton KIVI codec (bit-equal to torch, timed), the KIVI graph checks
        # with flushes in place, then prefill (policy_overhead) and answer memory (decode_memory),
        # old / new / old / new. Old code: mkdir ab_old && git archive 899693e src | tar -x -C ab_old
        need_old
        PYTHONPATH=src python3 benchmarks/gpu_tests.py codec kivigraph 2>&1 | tee "$OUT/gpu_tests-codec.log"
        ab_rounds codec full,kivi4,kivi2,snapkv+kivi4,h2o+kivi4
        answer_memory "decode_memory-{v}-i64.jsonl" kivi4:0,kivi2:0
        ;;
    nosync)
        # Ninth session: store eviction that reads nothing back while it is queued (one sync per
        # compression): the CUDA stacked-vs-loop checks, then prefill shares and answer memory,
        # old / new / old / new. Old code: mkdir ab_old && git archive 247d961 src | tar -x -C ab_old
        need_old
        PYTHONPATH=src python3 benchmarks/gpu_tests.py stacked 2>&1 | tee "$OUT/gpu_tests-stacked-session9.log" | tail -n 4
        ab_rounds nosync full,snapkv,snapkv+kivi4,snapkv+kivi2,h2o+kivi4
        answer_memory "decode_memory-nosync-{v}-i64.jsonl" snapkv:2048,snapkv+kivi4:2048
        PYTHONPATH=src python3 benchmarks/compress_profile.py snapkv+kivi4 > "$OUT/compress_profile-nosync.log" 2>&1
        grep -iE "wall|gpu|launch" "$OUT/compress_profile-nosync.log" | head -n 12
        ;;
    settle)
        # Ninth session, second step: the eviction's one read (the chunk tables' widths) waits
        # until the next block's forward is queued. Old code: the first step (commit 248a5c9):
        # rm -rf ab_old && mkdir ab_old && git archive 248a5c9 src | tar -x -C ab_old
        need_old
        PYTHONPATH=src python3 benchmarks/gpu_tests.py stacked graph 2>&1 | tee "$OUT/gpu_tests-settle-session9.log" | tail -n 2
        ab_rounds settle full,snapkv,snapkv+kivi4,snapkv+kivi2,h2o+kivi4
        PYTHONPATH=src python3 benchmarks/decode_memory.py --runs snapkv:2048,snapkv+kivi4:2048 --interval 64 \
            --breakdown --out "$OUT/decode_memory-breakdown.jsonl" 2>&1 | tail -n 2
        ;;
    lean)
        # Ninth session, third step: scoring chunks of 64 MiB (was 256) computed in place, and
        # fewer kernels stacking / cutting the store layers' tables. Old code: the second step:
        # rm -rf ab_old && mkdir ab_old && git archive eaed2b3 src | tar -x -C ab_old
        need_old
        PYTHONPATH=src python3 benchmarks/gpu_tests.py stacked graph 2>&1 | tee "$OUT/gpu_tests-lean-session9.log" | tail -n 1
        ab_rounds lean full,snapkv,h2o,snapkv+kivi4,snapkv+kivi2,h2o+kivi4
        answer_memory "decode_memory-lean-{v}.jsonl" snapkv:2048,snapkv+kivi4:2048 --breakdown
        ;;
    hostsnap)
        # Ninth session, fourth step: the snapshot an answer rolls back to waits in pinned host
        # memory. The graph checks (with the rollback check), then the answer's memory by step.
        # Old code: rm -rf ab_old && mkdir ab_old && git archive 5bc96a0 src | tar -x -C ab_old
        need_old
        PYTHONPATH=src python3 benchmarks/gpu_tests.py graph 2>&1 | tee "$OUT/gpu_tests-hostsnap-session9.log" \
            | grep -E "FAIL|snapshot|answer peak|FAILURES"
        answer_memory "decode_memory-hostsnap-{v}.jsonl" snapkv:2048,snapkv+kivi4:2048,h2o:2048 --breakdown
        ;;
    window-checks)
        # Tenth session: SnapKV's window scored by the kernels (stacked rows, the flash call's
        # LSE of the window). The few-query sweep that sets scoring.TRITON_MIN_ROWS, the CUDA
        # checks (window LSE == the kernel's own first pass; stacked == loop), one profile.
        PYTHONPATH=src python3 benchmarks/scoring_bench.py --sweep-window --out "$OUT/window-sweep.jsonl" \
            | python3 -c "import json,sys; [print(r['batch'], r['queries'], r['path'], round(r['ms'], 3), r['rel_err_vs_chunked']) for r in map(json.loads, sys.stdin)]"
        PYTHONPATH=src python3 benchmarks/gpu_tests.py lse stacked 2>&1 | tee "$OUT/gpu_tests-window-session10.log" \
            | grep -E "FAIL|rows|FAILURES"
        PYTHONPATH=src python3 benchmarks/compress_profile.py snapkv snapkv+kivi4 > "$OUT/compress_profile-window.log" 2>&1
        grep -E "===|Self CUDA time total" "$OUT/compress_profile-window.log"
        ;;
    window)
        # Tenth session: 32k prefills, old (main before the change) and new alternately.
        # Old code: rm -rf ab_old && mkdir ab_old && git archive <old> src | tar -x -C ab_old
        ab_rounds window full,snapkv,pyramidkv,adakv,snapkv+kivi4,snapkv+kivi2
        ;;
    fits)
        # Tenth session: a stateful scorer's compressions while the context fits, stacked (they
        # were a per-layer loop, host-bound). CUDA checks (stacked == loop), how far the host
        # leads at each compression, then 32k prefills old / new alternately.
        # Old code: rm -rf ab_old && mkdir ab_old && git archive a0f8977 src | tar -x -C ab_old
        need_old
        PYTHONPATH=src python3 benchmarks/gpu_tests.py stacked 2>&1 | tee "$OUT/gpu_tests-fits-session10.log" \
            | grep -E "FAIL|FAILURES"
        PYTHONPATH=src python3 benchmarks/host_lead.py h2o+kivi4 h2o --out "$OUT/host_lead-fits.json" 2>&1 \
            | tee "$OUT/host_lead-fits.txt" | grep -E "===" -A3
        ab_rounds fits full,h2o,a2sf,lazy,h2o+kivi4
        ;;
    lazybits)
        # Tenth session: LazyEviction's scan as bits for consecutive query positions. CUDA checks,
        # pass 2's tiles again (8 stacked layers), then 32k prefills old / new alternately.
        # Old code: rm -rf ab_old && mkdir ab_old && git archive 24bcce7 src | tar -x -C ab_old
        need_old
        PYTHONPATH=src python3 benchmarks/gpu_tests.py lazy 2>&1 | tee "$OUT/gpu_tests-lazybits-session10.log" \
            | grep -E "FAIL|lazy|FAILURES"
        PYTHONPATH=src python3 benchmarks/scoring_bench.py --sweep-reduce --batch 8 --sweep-modes lazy,sum \
            --sweep-block-m 32,64 --out "$OUT/reduce-sweep-lazybits.jsonl" > /dev/null 2>&1
        python3 -c "
import json
rows = [r for r in map(json.loads, open('$OUT/reduce-sweep-lazybits.jsonl')) if 'ms' in r]
for mode in ('sum', 'lazy'):
    for r in sorted((r for r in rows if r['mode'] == mode), key=lambda r: r['ms'])[:5]:
        print(mode, r['query_axis'], r['block_m'], r['block_n'], r['num_warps'], r['num_stages'], round(r['ms'], 3), r.get('state_equal_to_first'))"
        ab_rounds lazybits full,lazy,h2o
        ;;
    bits32)
        # Eleventh session: LazyEviction's bits in 32-bit integers (no int64, no float64), with
        # the tenth session's last change (triton's default pipelining for its pass 2). CUDA
        # checks, pass 2's tiles for old and new (8 stacked layers), 32k prefills old / new.
        # Old code: rm -rf ab_old && mkdir ab_old && git archive 0017ce5 src | tar -x -C ab_old
        need_old
        PYTHONPATH=src python3 benchmarks/gpu_tests.py lazy 2>&1 | tee "$OUT/gpu_tests-bits32-session11.log" \
            | grep -E "FAIL|lazy|FAILURES"
        for v in old new; do
            PYTHONPATH=$(src_of $v) python3 benchmarks/scoring_bench.py --sweep-reduce --batch 8 --sweep-modes lazy \
                --sweep-block-m 32 --out "$OUT/reduce-sweep-bits32-$v.jsonl" > /dev/null 2>&1
            python3 -c "
import json
rows = [r for r in map(json.loads, open('$OUT/reduce-sweep-bits32-$v.jsonl')) if 'ms' in r]
for r in sorted(rows, key=lambda r: r['ms'])[:4]:
    print('$v', r['query_axis'], r['block_m'], r['block_n'], r['num_warps'], r['num_stages'], round(r['ms'], 3), r.get('state_equal_to_first'))"
        done
        ab_rounds bits32 lazy,h2o
        ;;
    parts)
        # Sixth session: the "parts" KIVI kernel (kernels/kivi_parts.py) against the fold kernel:
        # correctness of both (the bench's check), then launch settings at 32k / 128k.
        PYTHONPATH=src python3 benchmarks/kernel_bench.py --only-kivi --contexts 32768 --kivi-variants "fold;parts" \
            --out "$OUT/kivi-parts-check.jsonl" > "$OUT/kivi-parts-check.log" 2>&1
        PYTHONPATH=src python3 benchmarks/kernel_bench.py --skip-check --only-kivi --contexts 32768,131072 \
            --kivi-variants "$PARTS_VARIANTS" --out "$OUT/kivi-parts-sweep.jsonl" > "$OUT/kivi-parts-sweep.log" 2>&1
        grep -E "correctness|FAILED" "$OUT/kivi-parts-check.log"; sed -n '/=== copy/,$p' "$OUT/kivi-parts-sweep.log"
        ;;
    parts-final)
        # The committed default (parts: transposed tiles, prefetch, 16 entries x 1 warp): the
        # model-level KIVI checks, then the bench's correctness check and timings at 8k / 32k / 128k.
        # (Its first version, commit c4299b8, wrote gpu_tests-session6.log / kernel_bench-parts-final.log;
        # that commit's `parts-options` step compared the transposed tiles and the prefetch.)
        PYTHONPATH=src python3 benchmarks/gpu_tests.py fused 2>&1 | tee "$OUT/gpu_tests-session6-final.log"
        PYTHONPATH=src python3 benchmarks/kernel_bench.py --only-kivi --contexts 8192,32768,131072 \
            --out "$OUT/kernels-kivi-session6-final.jsonl" > "$OUT/kernel_bench-session6-final.log" 2>&1
        grep -E "correctness|FAILED" "$OUT/kernel_bench-session6-final.log"; sed -n '/=== copy/,$p' "$OUT/kernel_bench-session6-final.log"
        ;;
    *) echo "usage: $0 check|kivi|adakv|lazy|parts|parts-final|codec|nosync|settle|lean|hostsnap|window-checks|window|fits|lazybits|bits32" >&2; exit 2 ;;
esac

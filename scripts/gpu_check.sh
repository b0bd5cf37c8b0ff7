#!/usr/bin/env bash
# make gpu-check: the CUDA path in one short, prepared run (target < 8 min on one H100; no network needed).
#   1. kernels  - tests/kernels/test_pack_perturbed.py -k cuda: the compiled Triton kernel vs its torch reference
#                 (fp32/bf16/fp16, channels_last; the 10 cases skip without CUDA and must pass with it)
#   2. squeeze  - 1-GPU DeepSpeed squeeze of the ImageNet-1K GUARD preset in bf16 with model.compile=true on synthetic
#                 224 px ImageNet-shaped JPEGs through FFCV (bench/toy_imagenet.py -> guard-fast data to-ffcv)
#   3. bench    - guard-fast bench --config configs/bench/gpu.toml with few repetitions (plain, every GUARD strategy
#                 eager and compiled, pgd-at K=10, guard-curvature) -> bench/results/gpu-<device>.{json,md,png}
# Each step has its own time limit, prints its wall time, and a failing step does not stop the next one; the summary
# (step, status, seconds, device) goes to $OUT/summary.md and, on a GPU, to bench/results/gpu-check-<device>.md.
# Exit status: 0 when every step passed (or when there is no CUDA device: one line, nothing run), 1 otherwise.
#
# Environment: PY (default .venv/bin/python, made by `make setup`), OUT (default runs/gpu-check),
# GPU_CHECK_DRY_RUN=1 runs the same steps on the CPU at toy sizes (checks the script, not the GPU);
# GPU_CHECK_LIMIT_SCALE multiplies every step's time limit (default 1; 6 in a dry run, CPUs compile slowly).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu-check}
DRY=${GPU_CHECK_DRY_RUN:-0}
LIMIT_SCALE=${GPU_CHECK_LIMIT_SCALE:-$([[ "$DRY" == 1 ]] && echo 6 || echo 1)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONDONTWRITEBYTECODE=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing here downloads; make sure nothing tries

if [[ ! -x "$PY" ]]; then
    echo "gpu-check: $PY not found: run 'make setup' first (or set PY=/path/to/python)" >&2
    exit 2
fi
if [[ "$DRY" != 1 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu-check: no CUDA device visible to torch (torch.cuda.is_available() is False); nothing to check"
    exit 0
fi

if [[ "$DRY" == 1 ]]; then
    DEVICE="cpu dry run"
    SLUG="dry-run"
    RESULTS="$OUT/results"  # a dry run never writes into bench/results
    # toy sizes: (classes, train/class, batch, width, epochs, bench image px, bench batch, reps, warm-up)
    CLASSES=4 PER_CLASS=4 BATCH=4 WIDTH=4 EPOCHS=1 WORKERS=1 BENCH_PX=64 BENCH_BATCH=4 REPS=2 WARMUP=2
    DEV_ARGS=(--dist.device=cpu)
else
    DEVICE=$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))')
    SLUG=$(echo "$DEVICE" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
    RESULTS="bench/results"
    # 16 classes x 64 images at batch 128: 8 steps per epoch, 2 epochs (the second runs on the compiled graph)
    CLASSES=16 PER_CLASS=64 BATCH=128 WIDTH=64 EPOCHS=2 WORKERS=8 BENCH_PX=224 BENCH_BATCH=256 REPS=5 WARMUP=2
    DEV_ARGS=(--dist.device=cuda)
fi
rm -rf "$OUT"
mkdir -p "$OUT" "$RESULTS"
SUMMARY="$OUT/summary.md"
START=$SECONDS
FAILED=0
{
    echo "# gpu-check: $DEVICE"
    echo
    echo "git $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "| step | status | seconds | limit s |"
    echo "|---|---|---|---|"
} >"$SUMMARY"

# step NAME LIMIT_S CMD...: run with a time limit, log to $OUT/NAME.log, record status and wall time.
step() {
    local name=$1 limit=$(($2 * LIMIT_SCALE))
    shift 2
    local t0=$SECONDS rc=0
    echo "gpu-check: [$name] $* (limit ${limit}s, log $OUT/$name.log)"
    timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1 || rc=$?
    local dt=$((SECONDS - t0)) status=ok
    if ((rc == 124)); then status="TIMEOUT"; elif ((rc != 0)); then status="FAIL (exit $rc)"; fi
    [[ $status == ok ]] || { FAILED=1; tail -n 20 "$OUT/$name.log" | sed "s/^/  [$name] /"; }
    echo "| $name | $status | $dt | $limit |" >>"$SUMMARY"
    echo "gpu-check: [$name] $status in ${dt}s"
}

# Only the compiled (CUDA) cases: the interpreter cases run in `make test` on any machine.
step kernels 90 "$PY" -m pytest -q -p no:cacheprovider tests/kernels/test_pack_perturbed.py -k cuda -rs
if [[ "$DRY" != 1 ]] && ! grep -qE "^10 passed" <(tail -n 1 "$OUT/kernels.log"); then
    FAILED=1  # on a GPU all 10 compiled cases must run and pass, not skip
    echo "| kernels: expected '10 passed', got '$(tail -n 1 "$OUT/kernels.log")' | FAIL | | |" >>"$SUMMARY"
fi

DATA="$OUT/data"
step data 60 bash -c "\"$PY\" -m bench.toy_imagenet --out \"$DATA/folders\" --classes $CLASSES --train $PER_CLASS \
    --val 2 && for s in train val; do \"$PY\" -m launchers.cli data to-ffcv --src \"$DATA/folders/\$s\" \
    --out \"$DATA/\$s.beton\" --mode jpg --workers $WORKERS || exit 1; done"

step squeeze 150 "$PY" launchers/squeeze.py --config configs/imagenet-1k/squeeze-guard.toml "${DEV_ARGS[@]}" \
    --data.path="$DATA" --data.batch_size=$BATCH --data.eval_batch_size=$BATCH --data.workers=$WORKERS \
    --model.width=$WIDTH --model.compile=true --optim.epochs=$EPOCHS --output.dir="$OUT/squeeze" \
    --output.log_every=1 --output.progress=false

step bench 180 "$PY" -m launchers.cli bench --config configs/bench/gpu.toml "${DEV_ARGS[@]}" \
    --bench.objectives=none,guard,guard-curvature,pgd-at --bench.image_size=$BENCH_PX \
    --bench.batch_size=$BENCH_BATCH --bench.reps=$REPS --bench.warmup=$WARMUP \
    --bench.name="gpu-$SLUG" --bench.out_dir="$RESULTS" --model.width=$WIDTH

# The squeeze must have produced a teacher with finite losses at every logged step.
if [[ -f "$OUT/squeeze/metrics.jsonl" ]]; then
    "$PY" - "$OUT/squeeze/metrics.jsonl" >>"$SUMMARY" <<'EOF' || FAILED=1
import json, math, sys
steps = [json.loads(line) for line in open(sys.argv[1]) if '"loss"' in line]
ok = bool(steps) and all(math.isfinite(s["loss"]) for s in steps)
rate = steps[-1].get("images_per_s", float("nan")) if steps else float("nan")
print(f"\nsqueeze: {len(steps)} steps, last loss {steps[-1]['loss'] if steps else 'n/a'}, "
      f"last images/s {rate:.1f}, all finite: {ok}")
sys.exit(0 if ok else 1)
EOF
fi
echo "" >>"$SUMMARY"
echo "total: $((SECONDS - START)) s" >>"$SUMMARY"
if [[ "$DRY" != 1 ]]; then
    cp "$SUMMARY" "bench/results/gpu-check-$SLUG.md"
fi
cat "$SUMMARY"
exit $FAILED

#!/usr/bin/env bash
# The standard set of GPU measurements, sized for one short lease (about 6 minutes on an H200 once
# MLX's kernels are built): fp16 UNet steps compiled and eager against diffusers/PyTorch in the same
# process (with the 4-bit refiner), VAE decode, text encoding and whole images, the one-process A/B
# with CUDA graphs kept (MLX_USE_CUDA_GRAPHS=1: lower peak memory), the building blocks at their
# real shapes (bench.components), and kernel time by family for the refiner (with diffusers') and
# the 4-bit refiner (bench.profile). Results go to $1 (default: bench/results/gpu): seven JSON files
# and one log (a lent machine returns at most eight files; the Markdown tables can be made again
# from the JSON with bench.report.markdown).
#
# On the lent machine, after the two install steps of shared/device/README.md
# (export PYTHONPATH=/tmp/site:$PWD):
#   bash bench/gpu_session.sh "$OUT"
#
# Each command has its own time limit, so one that hangs does not cost the others; bench.ab,
# bench.profile and bench.components rewrite their JSON after each row.
set -u
out=${1:-bench/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() {  # run LIMIT NAME ARGS...: one command under a time limit, logged
    local limit=$1 name=$2
    shift 2
    echo "== $name: $*" | tee -a "$out/log.txt"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$out/log.txt"
    echo "== $name took $((SECONDS - t0)) s" | tee -a "$out/log.txt"
}
size=${SIZE:-1024}  # SIZE=64 TINY=1: a quick smoke test of this script on any machine
tiny=$([ "${TINY:-0}" = 1 ] && echo --tiny)
common=(--width "$size" --height "$size" "${tiny:---random-weights}")
(nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 || true) | tee -a "$out/log.txt"
run 100 compiled python3 -m bench "${common[@]}" --only unet --dtype float16 --refiner-bits 4 --repeats 10 \
    --warmup 3 --compile --compare diffusers --json "$out/compiled.json"
run 80 eager python3 -m bench "${common[@]}" --only unet --dtype float16 --refiner-bits 4 --repeats 10 \
    --warmup 3 --compare diffusers --json "$out/eager.json"
run 100 stages python3 -m bench "${common[@]}" --only text,vae,e2e --dtype float16 --refiner-bits 4 --repeats 3 \
    --warmup 1 --compare diffusers --json "$out/stages.json"
MLX_USE_CUDA_GRAPHS=1 MLX_MAX_OPS_PER_BUFFER=4 run 40 ab_graphs python3 -m bench.ab --dtype float16 \
    --size "$size" --repeats 8 --warmup 3 --models base,refiner,refiner_q --json "$out/ab_cuda_graphs.json" $tiny
run 60 components python3 -m bench.components --dtype float16 --json "$out/components.json" \
    $([ "${TINY:-0}" = 1 ] && echo --scale 16 --chain 2 --repeats 2)
run 40 profile python3 -m bench.profile --size "$size" --models refiner --variants compiled --repeats 5 \
    --warmup 2 --kernels --torch --json "$out/profile.json" $tiny
run 40 profile_q4 python3 -m bench.profile --size "$size" --models refiner_q4 --variants compiled --repeats 5 \
    --warmup 2 --kernels --json "$out/profile_q4.json" $tiny
ls -l "$out"

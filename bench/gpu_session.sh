#!/usr/bin/env bash
# The standard set of GPU measurements, sized for one short lease (about 7 minutes on an H200 once
# MLX's kernels are built), most wanted first, so a lease cut short keeps what matters:
#   0. memory (issue #22): `bench --memory-profile` of a whole 1024² image in the three goal modes
#      (default with a 4-bit refiner; low memory with the fp16 base; low memory with 4-bit base and
#      refiner): the first call's peak, loads included, and each stage's weights, peak and working
#      memory against estimate_memory; one UNet step paced (evaluated in segments, as the sampler
#      does) against unpaced, step for step (bench.ab --interleave-variants); the VAE decode whole,
#      exactly tiled at two tile sizes, and diffusers-style blended (bench.vae_memory);
#      ONLY_MEMORY=1 stops after it;
#   1. ab_q4: the dense refiner and the 4-bit one, compiled, keys and values made once per stage
#      as the sampler does; each alone (time and peak), then both timed step for step in turn;
#   2. the same with CUDA graphs off but a commit every N = 8 or 5 kernels
#      (MLX_MAX_OPS_PER_BUFFER), which bounds how far the CPU runs ahead of the GPU and so the
#      step's peak memory, and with CUDA graphs of 10 kernels;
#   3. profile_q4: GPU kernel time by family of the 4-bit refiner's step;
#   4. compiled: fp16 UNet steps, compiled, against diffusers/PyTorch in the same process;
#   5. stages: text encoding, VAE decode and whole images against diffusers (peaks included);
#   6. profile: the refiner's kernel time by family, with diffusers'.
# ONLY_Q4=1 stops after step 2. Results go to $1 (default: bench/results/gpu): JSON files and one log (a lent machine returns
# at most eight files; the Markdown tables can be made again from the JSON with bench.report.markdown).
#
# On the lent machine, after the two install steps of shared/device/README.md
# (export PYTHONPATH=/tmp/site:$PWD):
#   bash bench/gpu_session.sh "$OUT"
#
# Each command has its own time limit, so one that hangs does not cost the others; bench.ab,
# bench.profile rewrite their JSON after each row.
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
if [ "${SKIP_MEMORY:-0}" != 1 ]; then
    mem=(python3 -m bench "${common[@]}" --memory-profile --dtype float16 --steps "${MEM_STEPS:-10}")
    run 90 mem_default_q4 "${mem[@]}" --refiner-bits 4 --json "$out/mem_default_q4.json"
    run 90 mem_low_fp16 "${mem[@]}" --low-memory --json "$out/mem_low_fp16.json"
    run 90 mem_low_q4 "${mem[@]}" --low-memory --base-bits 4 --refiner-bits 4 --json "$out/mem_low_q4.json"
    vae=(python3 -m bench.vae_memory --size "$size" --dtype float32 --repeats 2 $tiny)
    run 60 vae_decode "${vae[@]}" --modes untiled,exact:128,exact:256,exact:512,blend --json "$out/vae_decode.json"
    run 120 ab_paced python3 -m bench.ab --dtype float16 --size "$size" --repeats 6 --warmup 2 $tiny \
        --models base,refiner_q --variants eager_kv,eager_kv_paced --interleave-variants --json "$out/ab_paced.json"
    [ "${ONLY_MEMORY:-0}" = 1 ] && { ls -l "$out"; exit 0; }
fi
ab=(python3 -m bench.ab --dtype float16 --size "$size" --repeats 10 --warmup 3 --variants compiled_kv --interleave
    $tiny)
run 150 ab_q4 "${ab[@]}" --models refiner,refiner_q --json "$out/ab_q4.json"
run 40 ab_ops_8 env MLX_MAX_OPS_PER_BUFFER=8 "${ab[@]}" --models refiner_q,refiner --json "$out/ab_ops_8.json"
run 40 ab_ops_5 env MLX_MAX_OPS_PER_BUFFER=5 "${ab[@]}" --models refiner_q,refiner --json "$out/ab_ops_5.json"
run 40 ab_graphs_10 env MLX_USE_CUDA_GRAPHS=1 MLX_MAX_OPS_PER_BUFFER=10 "${ab[@]}" --models refiner_q,refiner \
    --json "$out/ab_graphs_10.json"
[ "${ONLY_Q4:-0}" = 1 ] && { ls -l "$out"; exit 0; }
run 40 profile_q4 python3 -m bench.profile --size "$size" --models refiner_q4 --variants compiled --repeats 5 \
    --warmup 2 --kernels --json "$out/profile_q4.json" $tiny
run 100 compiled python3 -m bench "${common[@]}" --only unet --dtype float16 --refiner-bits 4 --repeats 10 \
    --warmup 3 --compile --compare diffusers --json "$out/compiled.json"
run 100 stages python3 -m bench "${common[@]}" --only text,vae,e2e --dtype float16 --refiner-bits 4 --repeats 3 \
    --warmup 1 --compare diffusers --json "$out/stages.json"
run 40 profile python3 -m bench.profile --size "$size" --models refiner --variants compiled --repeats 5 \
    --warmup 2 --kernels --torch --json "$out/profile.json" $tiny
ls -l "$out"

#!/usr/bin/env bash
# The standard set of GPU measurements, sized for one short lease (about 5 minutes on an H100):
# fp16 UNet steps eager and compiled against diffusers/PyTorch in the same process, the 4-bit
# refiner both ways, VAE decode and text encoding, bf16/fp32 steps, whole images, and the
# one-process eager/compiled A/B. Results go to $1 (default: bench/results/gpu): five JSON
# files and one log (few files, as a lent machine returns at most eight; the Markdown tables
# can be made again from the JSON with bench.report.markdown).
#
# On the lent machine, after the two install steps of shared/device/README.md
# (export PYTHONPATH=/tmp/site:$PWD):
#   bash bench/gpu_session.sh "$OUT"
#
# Each command has its own time limit, so one that hangs does not cost the others; every JSON
# file is written as its command ends (bench.ab rewrites its file after each measurement).
set -u
out=${1:-bench/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() {  # run LIMIT NAME ARGS...: one command under a time limit, logged
    local limit=$1 name=$2
    shift 2
    echo "== $name: $*" | tee -a "$out/log.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/log.txt"
}
size=${SIZE:-1024}  # SIZE=64 TINY=1: a quick smoke test of this script on any machine
common=(--width "$size" --height "$size" "$([ "${TINY:-0}" = 1 ] && echo --tiny || echo --random-weights)")
run 150 eager python3 -m bench "${common[@]}" --only unet --dtype float16 --refiner-bits 4 --repeats 20 --warmup 3 \
    --compare diffusers --json "$out/eager.json"
run 150 compiled python3 -m bench "${common[@]}" --only unet --dtype float16 --refiner-bits 4 --repeats 20 \
    --warmup 3 --compile --compare diffusers --json "$out/compiled.json"
run 120 stages python3 -m bench "${common[@]}" --only text,vae,e2e --dtype float16 --refiner-bits 4 --repeats 3 \
    --warmup 1 --compare diffusers --json "$out/stages.json"
run 90 dtypes python3 -m bench "${common[@]}" --only unet --dtype bfloat16,float32 --repeats 5 --warmup 2 \
    --json "$out/dtypes.json"
run 90 ab python3 -m bench.ab --dtype float16 --size "$size" --repeats 10 --warmup 3 --thresholds 77,never \
    --json "$out/ab.json" $([ "${TINY:-0}" = 1 ] && echo --tiny)
ls -l "$out"

#!/usr/bin/env bash
# GPU check of all three scripts: the test suite with --device auto, which is cuda on a GPU machine
# (the torchrun tests stay on gloo), then short timed runs on cuda (and cpu where it compares).
# Writes device.txt, runs.log, sps.tsv and pytest.log into the folder given (default
# benchmarks/results/gpu). Needs a CUDA build of torch; tests that need wandb or moviepy are skipped
# when those are not installed there.
#
#     bash benchmarks/device_check.sh [out_dir]
set -uo pipefail
out=${1:-benchmarks/results/gpu}
py=${PYTHON:-python3}
runs=$(mktemp -d)
mkdir -p "$out"
export WANDB_MODE=offline PYTHONUNBUFFERED=1
{ nvidia-smi -L; nproc; $py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } | tee "$out/device.txt"

# last value of a metric in a run's metrics.jsonl
last() { $py -c "import json,sys; print([r for r in map(json.loads, open(sys.argv[1])) if sys.argv[2] in r][-1][sys.argv[2]])" "$1" "$2"; }

timed() {  # name, metric, script and flags
  local name=$1 metric=$2; shift 2
  local dir="$runs/$name" start=$SECONDS
  timeout 100 $py "$@" --runs-dir "$dir" >>"$out/runs.log" 2>&1
  local rc=$?
  local value=$( (last "$dir"/*/metrics.jsonl "$metric") 2>/dev/null || echo "-")
  printf '%s\t%s\t%s\t%s\t%ss\n' "$name" "$rc" "$metric" "$value" "$((SECONDS - start))" | tee -a "$out/sps.tsv"
}

skip=()
$py -c "import wandb" 2>/dev/null || skip+=("not track and not wandb")
$py -c "import moviepy" 2>/dev/null || skip+=("not video")
filter=$(IFS='|'; echo "${skip[*]}" | sed 's/|/ and /g')
timeout 270 $py -m pytest -q -p no:cacheprovider -n 12 ${filter:+-k "$filter"} >"$out/pytest.log" 2>&1; tail -40 "$out/pytest.log"

printf 'run\texit\tmetric\tvalue\twall\n' >"$out/sps.tsv"
timed rlhf-cuda-bf16 eps ppo_rlhf.py --total-episodes 3200 --device cuda --bf16 --cache-dir "$runs/task"
timed rlhf-cuda-fp32 eps ppo_rlhf.py --total-episodes 3200 --device cuda --cache-dir "$runs/task"
timed rlhf-cuda-bf16-gc eps ppo_rlhf.py --total-episodes 640 --device cuda --bf16 --gradient-checkpointing --cache-dir "$runs/task"
timed breakout-cuda charts/SPS ppo_discrete.py --env-id ALE/Breakout-v5 --num-envs 8 --clip-coef 0.1 --total-timesteps 32768 --eval-episodes 0 --device cuda
timed halfcheetah-cuda charts/SPS ppo_continuous.py --total-timesteps 10240 --eval-episodes 1 --device cuda
timed cartpole-cuda charts/SPS ppo_discrete.py --total-timesteps 50000 --eval-episodes 2 --device cuda
timed breakout-cpu charts/SPS ppo_discrete.py --env-id ALE/Breakout-v5 --num-envs 8 --clip-coef 0.1 --total-timesteps 8192 --eval-episodes 0 --device cpu
timed halfcheetah-cpu charts/SPS ppo_continuous.py --total-timesteps 10240 --eval-episodes 1 --device cpu --num-threads 1
grep -E "^error|Error|Traceback" "$out/runs.log" | head -20


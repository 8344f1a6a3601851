#!/usr/bin/env bash
# Repeat a short two-process CPU training (the tests' DDP run) N times and count the runs that fail, e.g. at
# interpreter exit. Trainer.close's numbers (3 of 14 failed before it, 0 of 24 after) came from
#   LOAD=2 bash tools/ddp_exit_stress.sh 24
# LOAD=K runs K busy loops alongside (on 2 cores the failure needed load). Logs in ${WORK:-/tmp/ddp-stress}.
set -u
n=${1:-10}
work=${WORK:-/tmp/ddp-stress}
py=${PYTHON:-python3}
mkdir -p "$work"
export HF_HUB_OFFLINE=1 ACCELERATE_USE_CPU=1 OMP_NUM_THREADS=1 PYTHONFAULTHANDLER=1
$py -c "from stepdistill.testing import build_tiny_pipeline; build_tiny_pipeline('$work/pipe')" > /dev/null 2>&1
hogs=()
for _ in $(seq 1 "${LOAD:-0}"); do $py -c "while True: pass" & hogs+=($!); done
fail=0
for i in $(seq 1 "$n"); do
  port=$($py -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  rm -rf "$work/out"
  if ! $py -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
      --dynamo_backend no --main_process_port "$port" -m stepdistill train configs/shapes/consistency_lora.yaml \
      model.teacher="$work/pipe" train.output_dir="$work/out" train.max_steps=3 train.batch_size=2 \
      train.progress=false train.checkpoint_every=100 train.export=none data.max_samples=32 student.lora_rank=4 \
      objective.options.num_ddim_timesteps=10 train.lr=1e-2 "train.sample_prompts=[a red circle]" \
      > "$work/run$i.log" 2>&1; then
    fail=$((fail + 1)); echo "run $i failed: $(grep -m1 -E 'terminate|Error' "$work/run$i.log")"
  fi
done
for h in "${hogs[@]}"; do kill "$h"; done
echo "failures: $fail / $n"

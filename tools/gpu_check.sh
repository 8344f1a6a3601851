#!/usr/bin/env bash
# GPU checks on the shapes world (one CUDA device): DMD2 one step trained in fp32, bf16 and fp16 mixed precision,
# each evaluated at 1 step; the shared-base memory bench and the student-variant speed bench with CUDA memory.
#   bash tools/gpu_check.sh [OUT_DIR]      (needs the package importable: pip install -e . or PYTHONPATH=.)
# Writes OUT_DIR/log.txt and OUT_DIR/summary.md (default OUT_DIR: runs/gpu-check). STEPS (default 300) sets the
# training steps: this 1.5M-parameter UNet is launch-overhead bound on a GPU (an H200 ran the DMD2 config at
# 2.5 steps/s in bf16), so the whole script takes about 10 minutes there.
set -uo pipefail
out=${1:-runs/gpu-check}
work=${GPU_CHECK_WORK:-runs/gpu-check-work}
mkdir -p "$out" "$work"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
steps=${STEPS:-300}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch, diffusers, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"
  $py -c "import xformers; print('xformers', xformers.__version__)" 2>/dev/null || echo "xformers: not installed"
  for mp in no bf16 fp16; do
    echo "== train dmd2_1step, mixed_precision=$mp, $steps steps"
    start=$(date +%s)
    $py -m stepdistill train configs/shapes/dmd2_1step.yaml train.output_dir="$work/dmd_$mp" train.mixed_precision=$mp \
        train.max_steps=$steps train.progress=false train.checkpoint_every=100000 || echo "TRAIN FAILED ($mp)"
    echo "wall $(( $(date +%s) - start )) s"
    tail -n 1 "$work/dmd_$mp/metrics.jsonl"
  done
  echo "== evaluate the three exports at 1 step (300 test prompts)"
  $py -m stepdistill evaluate "$work/dmd_no/export" "$work/dmd_bf16/export" "$work/dmd_fp16/export" \
      --label fp32,bf16,fp16 --steps 1 --num-images 300 --out "$work/eval" --quiet || echo "EVALUATE FAILED"
  grep "^| " "$work/eval/report.md"
  echo "== memory: shared LoRA base vs separate copies (CUDA)"
  $py tools/bench_memory.py --device cuda --batch-size 16 --steps 5
  echo "== speed: student variants (CUDA)"
  $py tools/bench_train.py --batch-size 32 --steps 30 --warmup 5
  echo "== stepdistill benchmark: phases, overhead ratio, CUDA peak memory (shapes configs, three layouts)"
  $py tools/benchmark_shapes.py --out "$work/benchmark" --steps 20 --warmup 5
} 2>&1 | tee "$out/log.txt"
grep -E "^\| |^== |^wall|^torch|^xformers|TRAIN FAILED|EVALUATE FAILED|^DMD networks|^name|NVIDIA" "$out/log.txt" > "$out/summary.md"

"""Training-step speed and peak memory of student variants, side by side in one run.

    python tools/bench_train.py                      # bundled shapes teacher, CPU
    python tools/bench_train.py --teacher PATH --batch-size 8 --steps 20 --variants lora,full

Each variant runs in its own child process (so peak memory is its own): the trainer is built from the same config
except for the student, `--warmup` steps are run untimed, then `--steps` timed steps. Reported: ms per step, the
ratio to the first variant, and peak memory (CPU: the child's max RSS; CUDA: torch.cuda.max_memory_allocated).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "lora": ["student.type=lora"],
    "full": ["student.type=full"],
    "full+ema": ["student.type=full", "train.ema_decay=0.999"],
}


def child(args) -> None:
    import torch

    from stepdistill.objectives import load_run_config
    from stepdistill.trainer import Trainer

    cfg = load_run_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    for _ in range(args.warmup):
        trainer._train_step()
        trainer.state.step += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer._train_step()
        trainer.state.step += 1
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / args.steps * 1000
    out = {"ms_per_step": ms, "device": str(trainer.device),
           "trained_params": sum(p.numel() for p in trainer.student.parameters() if p.requires_grad)}
    if torch.cuda.is_available():
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("BENCH " + json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/shapes/consistency_lora.yaml")
    p.add_argument("--teacher", default=None)
    p.add_argument("--variants", default="lora,full,full+ema")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.child:
        return child(args)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            over = [*args.overrides, *VARIANTS[name], f"train.batch_size={args.batch_size}",
                    f"train.output_dir={tmp}/{name}", "train.progress=false", "data.max_samples=2000"]
            if args.teacher:
                over.append(f"model.teacher={args.teacher}")
            cmd = [sys.executable, __file__, "--child", "--config", args.config, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), *over]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            _, status, usage = os.wait4(proc.pid, 0)
            out, err = proc.stdout.read(), proc.stderr.read()
            if status != 0:
                sys.exit(f"variant {name} failed:\n{err[-2000:]}")
            res = json.loads(next(line for line in out.splitlines() if line.startswith("BENCH "))[6:])
            res["variant"], res["max_rss_mib"] = name, usage.ru_maxrss / 1024  # ru_maxrss is KiB on Linux
            rows.append(res)
    base = rows[0]["ms_per_step"]
    print(f"\nconsistency objective, batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"device {rows[0]['device']}, {os.cpu_count()} CPU cores\n")
    print("| student | trained params | ms / step | time vs first | peak memory (MiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        mem = r.get("cuda_peak_mib", r["max_rss_mib"])
        print(f"| {r['variant']} | {r['trained_params'] / 1e6:.2f}M | {r['ms_per_step']:.0f} | "
              f"{r['ms_per_step'] / base:.2f}x | {mem:.0f}{' (CUDA)' if 'cuda_peak_mib' in r else ' (RSS)'} |")


if __name__ == "__main__":
    main()

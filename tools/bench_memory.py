"""Peak memory of DMD's three networks (teacher, student, fake score): one shared frozen base with LoRA adapters
vs separate copies, side by side in one run.

    python tools/bench_memory.py                       # the shapes teacher (or --teacher PATH / --tiny)
    python tools/bench_memory.py --batch-size 16 --steps 2

Each setup runs in its own fresh subprocess: build the objective, then `--steps` training steps of every network
(forward, backward, AdamW step). Reported per setup: the unique parameter bytes held by all networks, the peak
resident memory above the process's level after the teacher was loaded (CPU: ru_maxrss), and on CUDA
torch.cuda.max_memory_allocated.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import resource
import subprocess
import tempfile
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUPS = {
    "shared": "LoRA student + LoRA fake score as adapters on the teacher's one frozen UNet",
    "separate": "teacher UNet + student copy with LoRA + fake-score copy with LoRA",
    "full": "teacher UNet + full student copy + full fake-score copy (DMD2 paper setting)",
}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(setup_name: str, teacher_path: str, batch_size: int, steps: int, device: str) -> dict:
    import torch

    from stepdistill.config import ModelConfig, StudentConfig
    from stepdistill.models import add_lora, build_student, load_teacher
    from stepdistill.objectives import Batch, DistillSetup, get_objective

    torch.manual_seed(0)
    dev = torch.device(device)
    teacher = load_teacher(ModelConfig(teacher=teacher_path, dtype="fp32"), dev)
    prompts = ["a small red circle at the center"] * batch_size
    cond, uncond = teacher.prompt_encoder(prompts), teacher.prompt_encoder([""] * batch_size)
    base_rss = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base_gpu = torch.cuda.memory_allocated()
    lora = StudentConfig(type="lora", lora_rank=16, lora_alpha=16)
    opts = {"num_steps": 1, "fake_lora_rank": 16, "fake_lora_alpha": 16}
    cls = get_objective("dmd")
    if setup_name == "shared":
        student = build_student(teacher, lora)  # the adapter goes on teacher.net itself
        obj = cls(DistillSetup(teacher, student, "lora", 1e-4, 32, dev), cls.parse_options(opts))
    elif setup_name == "separate":
        student = copy.deepcopy(teacher.net)
        add_lora(student, lora, "student")
        fake_base = dataclasses.replace(teacher, net=copy.deepcopy(teacher.net))
        obj = cls(DistillSetup(fake_base, student, "lora", 1e-4, 32, dev), cls.parse_options(opts))
        obj.teacher = teacher.denoiser()  # the real score: the original frozen UNet (the fake has its own copy)
    else:
        student = build_student(teacher, StudentConfig(type="full"))
        obj = cls(DistillSetup(teacher, student, "full", 1e-4, 32, dev), cls.parse_options({**opts, "fake_score": "full"}))
    nets = obj.networks()
    modules = {id(n.module): n.module for n in nets.values()} | {id(teacher.net): teacher.net}
    storages = {}
    for m in modules.values():
        for p in m.parameters():
            storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    optimizers = {k: torch.optim.AdamW(n.params if n.params is not None else
                                       [p for p in n.module.parameters() if p.requires_grad], lr=1e-5)
                  for k, n in nets.items()}
    trained = sum(p.numel() for k, n in nets.items() for g in optimizers[k].param_groups for p in g["params"])
    batch = Batch(prompts, cond, uncond, None)
    for step in range(steps):
        for k in nets:
            gen = torch.Generator(device=dev).manual_seed(step * 10 + len(k))
            optimizers[k].zero_grad(set_to_none=True)
            obj.losses(k, batch, gen)["loss"].backward()
            optimizers[k].step()
    out = {"setup": setup_name, "unets": len(modules), "param_mb": sum(storages.values()) / 2**20,
           "trained_params_m": trained / 1e6, "peak_rss_over_base_mb": _peak_rss_mb() - base_rss}
    if dev.type == "cuda":
        out["gpu_peak_mb"] = (torch.cuda.max_memory_allocated() - base_gpu) / 2**20
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=None, help="diffusers pipeline folder (default: assets/shapes-teacher, else a tiny one)")
    ap.add_argument("--tiny", action="store_true", help="use a tiny random pipeline")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES", "x") != "" and _has_cuda() else "cpu")
    ap.add_argument("--setups", default=",".join(SETUPS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    teacher = args.teacher
    if teacher is None:
        shapes = ROOT / "assets" / "shapes-teacher"
        if args.tiny or not (shapes / "model_index.json").is_file():
            from stepdistill.testing import build_tiny_pipeline

            teacher = str(Path(tempfile.gettempdir()) / "stepdistill-bench-tiny-sd")
            if not Path(teacher, "model_index.json").is_file():
                build_tiny_pipeline(teacher)
        else:
            teacher = str(shapes)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, teacher, args.batch_size, args.steps, args.device)))
        return
    rows = []
    for name in args.setups.split(","):
        cmd = [sys.executable, __file__, "--child", name, "--teacher", teacher, "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--device", args.device]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"setup {name} failed:\n{res.stderr[-3000:]}")
        rows.append(json.loads(line[7:]))
    gpu = any("gpu_peak_mb" in r for r in rows)
    print(f"DMD networks, teacher {teacher}, batch {args.batch_size}, {args.steps} step(s) of each network, "
          f"device {args.device}")
    head = "| setup | UNets in memory | parameters (MB) | trained params (M) | peak RSS over base (MB) |" + \
        (" GPU peak (MB) |" if gpu else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        cells = [f"{r['setup']}: {SETUPS[r['setup']]}", str(r["unets"]), f"{r['param_mb']:.1f}",
                 f"{r['trained_params_m']:.2f}", f"{r['peak_rss_over_base_mb']:.0f}"]
        if gpu:
            cells.append(f"{r.get('gpu_peak_mb', float('nan')):.0f}")
        print("| " + " | ".join(cells) + " |")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


if __name__ == "__main__":
    main()

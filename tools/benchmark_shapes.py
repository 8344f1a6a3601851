"""`stepdistill benchmark` over the shapes configs and student layouts, one fresh process each, into one table.

    python tools/benchmark_shapes.py --out results/benchmark-shapes            # CPU, 2 threads: about 10 minutes
    python tools/benchmark_shapes.py --configs configs/shapes/dmd2_1step.yaml --layouts shared,full --steps 10

Layouts: `shared` (a LoRA student, and a LoRA fake score where the objective has one, as adapters on the teacher's
one frozen UNet), `separate` (the LoRA student on its own copy of the UNet: `student.share_base=false`), `full`
(a full student, and a full fake score). Each row is one `stepdistill benchmark` process, so its peak memory is its
own, and each reports the teacher's own peak beside it (a fresh process that loads the teacher and runs a guided
forward on one batch). Writes summary.md / summary.json, plus each run's benchmark.md, under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "shared": [],
    "separate": ["student.share_base=false"],
    "full": ["student.type=full", "train.export=none"],
}
FULL_FAKE = {"dmd", "vsd"}  # objectives with a fake score: `full` makes it a full copy too


def _objective(config: str) -> str:
    import yaml

    return (yaml.safe_load(Path(config).read_text()) or {}).get("objective", {}).get("name", "consistency")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="configs/shapes/consistency_lora.yaml,configs/shapes/dmd2_1step.yaml")
    p.add_argument("--layouts", default="shared,separate,full")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/benchmark-shapes")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. train.batch_size=16")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    rows = []
    for config in args.configs.split(","):
        objective = _objective(ROOT / config if not Path(config).is_absolute() else config)
        for layout in args.layouts.split(","):
            overrides = list(LAYOUTS[layout])
            if layout == "full" and objective in FULL_FAKE:
                overrides.append("objective.options.fake_score=full")
            name = f"{Path(config).stem}-{layout}"
            cmd = [sys.executable, "-m", "stepdistill", "benchmark", config, *overrides, *args.overrides,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                   "--out", str(out / name)]
            print("$ " + " ".join(cmd), flush=True)
            res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            if res.returncode != 0:
                print(res.stderr[-2000:], file=sys.stderr)
                rows.append({"run": name, "error": (res.stderr.strip().splitlines() or ["failed"])[-1]})
                continue
            data = json.loads((out / name / "benchmark.json").read_text())
            rows.append({"run": name, "config": config, "layout": layout, "step_ms": data["step_ms"],
                         "bare_ms": data["bare_ms_per_step"], "overhead_ratio": data["overhead_ratio"],
                         "peak_mib": data["peak_memory_mib"], "teacher_peak_mib": data["teacher_peak_memory_mib"],
                         "memory_ratio": data["memory_ratio_to_teacher"],
                         "trained_params": sum(data["trained_params"].values()), "device": data["device"]})
            print(f"  {rows[-1]['step_ms']:.0f} ms/step, overhead {rows[-1]['overhead_ratio']:.3f}, peak "
                  f"{rows[-1]['peak_mib']:.0f} MiB ({rows[-1]['memory_ratio']:.2f}x the teacher's)", flush=True)
    lines = [f"# stepdistill benchmark on the shapes configs ({args.threads} threads, {args.steps} measured steps)",
             "", "Command: `python tools/benchmark_shapes.py " + " ".join(sys.argv[1:]) + "`", "",
             "| run | ms / step | bare passes ms / step | overhead ratio | peak MiB | teacher alone MiB | "
             "memory / teacher | trained params |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | failed: {r['error']} |||||||")
            continue
        lines.append(f"| {r['run']} | {r['step_ms']:.0f} | {r['bare_ms']:.0f} | {r['overhead_ratio']:.3f} | "
                     f"{r['peak_mib']:.0f} | {r['teacher_peak_mib']:.0f} | {r['memory_ratio']:.2f}x | "
                     f"{r['trained_params']:,} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

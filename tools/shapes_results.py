"""Train the shapes-world students (DMD2 1 and 4 steps, VSD, and the quick start's LCM-LoRA), evaluate them against
the teacher, and write a markdown table (FID, CLIP score, attribute accuracy, training loop time). Every number
comes from this run.

    python tools/shapes_results.py --out results/shapes-final         # train (two at a time) + evaluate
    python tools/shapes_results.py --out results/shapes-final --skip-train   # re-evaluate finished runs

Trainings run as subprocesses with logs in OUT/logs/ (one intra-op thread each: on a shared CPU, OpenMP
threads of several processes fighting over the cores make everything many times slower).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = ["configs/shapes/dmd2_1step.yaml", "configs/shapes/dmd2_4step.yaml", "configs/shapes/vsd_1step.yaml",
                   "configs/shapes/consistency_lora.yaml"]
# each student is evaluated at every one of these step counts that its export's own spec lists (export_steps)
EVAL_STEPS = (1, 2, 4)


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def _name(config: str) -> str:
    return Path(config).stem


def train_all(runs, out: Path, overrides: list[str], jobs: int, threads: int) -> dict:
    """Start up to `jobs` trainings at once; returns {name: wall seconds}."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    pending, running, walls = list(runs), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            config = pending.pop(0)
            name = _name(config)
            run_dir = out / "runs" / name
            cmd = [sys.executable, "-m", "stepdistill", "train", config, f"train.output_dir={run_dir}",
                   "train.progress=false", *overrides]
            log = open(out / "logs" / f"{name}.log", "w")
            log.write(" ".join(cmd) + "\n")
            log.flush()
            print(f"[train] {name}: {' '.join(cmd)}", flush=True)
            running[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env(threads)),
                             time.time(), log)
        time.sleep(5)
        for name, (proc, t0, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[name]
                if proc.returncode != 0:
                    raise SystemExit(f"training {name} failed (exit {proc.returncode}); see {out / 'logs' / (name + '.log')}")
                walls[name] = time.time() - t0
                (out / "runs" / name / "wall_time.json").write_text(json.dumps({"seconds": walls[name]}))
                print(f"[train] {name} done in {walls[name] / 60:.1f} min", flush=True)
    return walls


def evaluate(models: list[Path], labels: list[str], steps: list[int], out: Path, args, teacher: bool) -> dict:
    cmd = [sys.executable, "-m", "stepdistill", "evaluate", *map(str, models), "--label", ",".join(labels),
           "--steps", ",".join(map(str, steps)), "--num-images", str(args.num_images), "--seed", str(args.seed),
           "--out", str(out), "--quiet"]
    if teacher:
        cmd += ["--teacher", args.teacher, "--teacher-steps", ",".join(map(str, args.teacher_steps)),
                "--teacher-guidance", str(args.teacher_guidance)]
    print(f"[eval] {' '.join(cmd)}", flush=True)
    env = _env(args.threads)
    if args.eval_assets:
        env["STEPDISTILL_ASSETS"] = str(Path(args.eval_assets).resolve())
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    return json.loads((out / "report.json").read_text())


def loop_seconds(run_dir: Path) -> float | None:
    """Training-loop time from the run's own metrics.jsonl: the trainer logs it_per_s = steps done in this process
    / seconds since its loop started; a resumed run starts a new segment (the step counter goes back). Model
    loading and export are not included; steps lost to an interruption are."""
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return None
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    total, seg_first, last, prev = 0.0, None, None, None
    log_every = rows[1]["step"] - rows[0]["step"] if len(rows) > 1 else rows[0]["step"]
    for r in rows + [None]:
        if r is None or (prev is not None and r["step"] <= prev["step"]):
            if last is not None:
                total += (last["step"] - (seg_first["step"] - log_every)) / last["it_per_s"]
            if r is None:
                break
            seg_first = None
        if seg_first is None:
            seg_first = r
        last = prev = r
    return total


def stage_exports(run_dir: Path, name: str) -> list[tuple[Path, str, list[int]]]:
    """(export folder, label, step counts) to evaluate: a staged run (progressive rounds) has one export per stage
    under RUN/stages/, each evaluated at its own step count; other runs have RUN/export at its export_steps."""
    stages = sorted((run_dir / "stages").glob("*/stepdistill.json")) if (run_dir / "stages").is_dir() else []
    if not stages:
        return [(run_dir / "export", name, export_steps(run_dir / "export"))]
    found = []
    for spec in stages:
        n = json.loads(spec.read_text())["num_inference_steps"]
        found.append((spec.parent, f"{name}-{spec.parent.name}", [n]))
    return sorted(found, key=lambda e: -e[2][0])


def export_steps(export: Path) -> list[int]:
    """The step counts of EVAL_STEPS that an export's sampling spec gives timesteps or sigmas for (a one-step
    student: [1]; a 4-step one: [1, 2, 4]); a spec without either lists its num_inference_steps."""
    spec = json.loads((export / "stepdistill.json").read_text())
    listed = {int(k) for key in ("timesteps", "sigmas") for k in (spec.get(key) or {})}
    return [n for n in EVAL_STEPS if n in listed] or [int(spec["num_inference_steps"])]


def step_reversals(rows: list[dict]) -> list[str]:
    """A line for each student whose FID gets worse from one of its step counts to the next larger one: the
    papers' multi-step students improve with steps, and a reversal is a bug to hunt (issue 14)."""
    fids: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        if r.get("role") not in ("teacher", "real") and r.get("steps") and r.get("fid") is not None:
            fids.setdefault(r["label"], []).append((int(r["steps"]), float(r["fid"])))
    found = []
    for label, points in fids.items():
        points.sort()
        for (n0, f0), (n1, f1) in zip(points, points[1:]):
            if f1 > f0:
                found.append(f"reversal: {label} FID {f0:.1f} at {n0} steps -> {f1:.1f} at {n1} steps")
    return found


def _fmt(v, nd):
    return "-" if v is None else f"{v:.{nd}f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/shapes-final")
    ap.add_argument("--configs", nargs="*", help="configs to run (default: dmd2_1step, dmd2_4step, vsd_1step, consistency_lora)")
    ap.add_argument("--skip-train", action="store_true", help="reuse finished runs in OUT/runs")
    ap.add_argument("--resume", action="store_true", help="continue interrupted runs in OUT from their last checkpoint")
    ap.add_argument("--jobs", type=int, default=2, help="trainings at once (one per core with --threads 1)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--num-images", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher", default="assets/shapes-teacher", help="copied to OUT/teacher and used from there")
    ap.add_argument("--teacher-steps", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 25])
    ap.add_argument("--teacher-guidance", type=float, default=3.0)
    ap.add_argument("--eval-assets", default=None,
                    help="folder holding shapes-eval/ (sets STEPDISTILL_ASSETS for evaluate; default: assets/)")
    ap.add_argument("overrides", nargs="*", help="config overrides for every training (key=value)")
    args = ap.parse_args(argv)
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    runs = args.configs or DEFAULT_CONFIGS
    # `--configs A.yaml key=value` would take the override for a config name (and train the defaults under it)
    swallowed = [c for c in runs if "=" in c and not (ROOT / c).is_file() and not Path(c).is_file()]
    if swallowed:
        raise SystemExit(f"error: {swallowed[0]!r} is not a config file; put overrides before --configs")
    # Students and the teacher baseline use one frozen snapshot of the teacher (a teacher still being trained
    # may be rewritten in place; a LoRA export names its base folder).
    snapshot = out / "teacher"
    if not args.skip_train and not args.resume:
        src = Path(args.teacher) if Path(args.teacher).is_absolute() else ROOT / args.teacher
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.copytree(src, snapshot)
    args.teacher = str(snapshot)
    overrides = [f"model.teacher={snapshot}", *(["train.resume=latest"] if args.resume else []), *args.overrides]

    if not args.skip_train:
        train_all(runs, out, overrides, args.jobs, args.threads)
    walls = {_name(c): loop_seconds(out / "runs" / _name(c)) for c in runs}

    rows = []
    by_steps: dict[tuple, list] = {}
    run_of: dict[str, str] = {}  # evaluation label -> run name
    for config in runs:
        name = _name(config)
        for export, label, n in stage_exports(out / "runs" / name, name):
            by_steps.setdefault(tuple(n), []).append((export, label))
            run_of[label] = name
    for i, (steps, entries) in enumerate(by_steps.items()):
        report = evaluate([e for e, _ in entries], [label for _, label in entries], list(steps),
                          out / f"eval-{'-'.join(map(str, steps))}steps", args, teacher=i == 0)
        rows += [r for r in report["rows"] if r.get("role") != "real" or i == 0]  # one real-images row
    walls = {label: walls.get(name) for label, name in run_of.items()}

    teacher_info = {}
    info = snapshot / "shapes_teacher.json"
    if info.is_file():
        teacher_info = json.loads(info.read_text())
    attrs = ["shape", "color", "background", "size", "position"]
    lines = [f"| model | steps | NFE | FID | CLIP | {' | '.join(attrs)} | all correct | training loop time |",
             "|---" * (7 + len(attrs)) + "|"]
    for r in rows:
        wall = walls.get(r["label"])
        detail = r.get("attribute_accuracy_detail") or {}
        lines.append(f"| {r['label']} | {r.get('steps') or '-'} | {r.get('nfe') or '-'} | {_fmt(r.get('fid'), 1)} | "
                     f"{_fmt(r.get('clip_score'), 1)} | {' | '.join(_fmt(detail.get(a), 2) for a in attrs)} | "
                     f"{_fmt(r.get('attribute_accuracy'), 2)} | {'-' if wall is None else f'{wall / 60:.1f} min'} |")
    table = "\n".join(lines) + "".join(f"\n\n{w}" for w in step_reversals(rows))
    header = (f"Shapes world, {args.num_images} images per row (seeds {args.seed}..), teacher "
              f"`{args.teacher}` ({json.dumps(teacher_info)}), teacher CFG {args.teacher_guidance} with its own scheduler; "
              f"students with their exported schedulers and timesteps. Command: "
              f"`python tools/shapes_results.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    (out / "results.md").write_text(header + "\n\n" + table + "\n")
    print(header + "\n\n" + table)


if __name__ == "__main__":
    main()

"""Peer comparison: stepdistill's `consistency` LoRA training step vs diffusers' own LCM-LoRA SDXL example.

    pip install datasets            # their script needs it (or: pip install -e .[peer])
    python tools/peer_lcm_sdxl.py --diffusers-src ~/src/diffusers --out runs/peer-lcm-sdxl
    python tools/peer_lcm_sdxl.py --diffusers-src ~/src/diffusers/.git --diffusers-rev v0.35.0 ...  # an older example
    python tools/peer_lcm_sdxl.py --diffusers-src path/to/train_lcm_distill_lora_sdxl.py ...

`--diffusers-src` is a diffusers source checkout, its git directory (a bare mirror works: the script is read with
`git show REV:examples/consistency_distillation/train_lcm_distill_lora_sdxl.py` into the work folder, never into this
repository), or the script itself. Nothing of theirs is copied into stepdistill.

What runs. One tiny random SDXL teacher (`stepdistill.testing.build_tiny_pipeline(sdxl=True)`, or `--teacher`), one
image folder of shapes-world images with `metadata.jsonl` captions (written at exactly `--resolution`, so both sides
see original size = target size and crop (0, 0) in the SDXL time ids), and the same settings on both sides: batch
size, resolution (center crop, no flip), LoRA rank / alpha on the same 14 module types (same 158 tensors on the tiny
teacher), num_ddim_timesteps, w ~ U[w_min, w_max] with the same CFG convention (pred = cond + w (cond - uncond)),
huber loss (c = 0.001), timestep scaling 10, AdamW (lr, weight decay), max grad norm 1, constant lr without
warm-up, fp32 everywhere, seed 0, no EMA (LCM-LoRA uses the student itself as target on both sides). Checkpoints and
sampling are off where they can be: theirs `--checkpointing_steps` / `--validation_steps` past the run, ours
`train.checkpoint_every` past the run, `train.sample_every=0`, `train.export=none`.

    ours    python -m stepdistill train configs/shapes/consistency_lora.yaml key=value ...
    theirs  python train_lcm_distill_lora_sdxl.py --pretrained_teacher_model ... --train_data_dir ...
    (`--launcher accelerate` runs both under `accelerate launch --num_processes 1`)

How seconds per step are measured (startup excluded). Per side and round, with `--steps N1 N2`:

    s/step = (T(N2) - T(N1)) / (N2 - N1)

  --method progress (default): each side trains N2 steps in one fresh process whose output the parent reads through
    a pipe, stamping each chunk with the time it arrives; T(k) is when its training progress bar first showed k/N2
    (ours: the trainer's "train" bar; theirs: the script's "Steps" bar; both are updated right after the optimizer
    step, before the per-step bookkeeping, so a window of steps holds whole steps with their logging). Everything
    before step N1 (imports, model loading, the dataset, the first, slower steps) and after step N2 (theirs: LoRA
    save and the final validation, which always runs; ours: the step-N checkpoint, RUN/final and the final sample
    grid) is outside the window.
  --method processes: each side runs twice, N1 and N2 steps, and T(k) is the whole process's wall time (spawn to
    exit) of the k-step run; all fixed costs cancel in the difference (their `datasets` imagefolder conversion uses
    a fresh cache folder per run, so it is the same in both). No output parsing, but on a shared machine the noise of
    two startups (seconds) lands on a difference of a few seconds: use large N2 - N1.

With the progress method the headline s/step is the median of the single-step intervals T(k+1) - T(k) over steps
N1..N2 of all rounds pooled: robust to the multi-second stalls other work causes on a shared machine (seen here:
runs of 13 steps at 24 s instead of 0.4 s, on either side, when other jobs took the 2 cores); the window mean
(T(N2) - T(N1)) / (N2 - N1), which counts them, is reported beside it. The fixed cost is (wall time of the N-step
run) - N * mean s/step. Rounds alternate so that slow phases of a shared
machine hit both sides alike: within a round ours runs first, then theirs (processes: ours N1, theirs N1, ours N2,
theirs N2), and every other round starts with theirs (ABBA). Reported are medians over rounds; the per-round
values, the best round and every run's progress timestamps are in the JSON. `--warmup` runs each side
once (one step, untimed) before the rounds.

Both really train the step count: ours is checked in RUN/final/trainer_state.json (step == N), theirs by the final
`Steps: ... N/N` of its progress bar plus its saved pytorch_lora_weights.safetensors.

Peak memory. On CPU each run's peak resident set size comes from os.wait4 (ru_maxrss of that child; under
`accelerate launch` the largest of the launcher and its waited-for training process). It covers the whole process
(imports, loading, the end-of-run sampling / validation), not only the steps; reported is the median over the N2
runs. With `--device cuda` the GPU memory of their process can't be read with torch.cuda.max_memory_allocated, so
`nvidia-smi --query-compute-apps` is polled every 0.2 s for the child and its descendants (peak used memory,
coarser than the allocator's own peak; untested on the machine this was written on, which had no GPU).

Output in --out: results.json (settings, commands, every run, per-round numbers, summary), results.md (a table)
and logs/ (each run's stdout+stderr).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_REL = "examples/consistency_distillation/train_lcm_distill_lora_sdxl.py"
BASE_CONFIG = ROOT / "configs" / "shapes" / "consistency_lora.yaml"
FAR = 1_000_000  # "never" for their checkpointing / validation steps and our checkpoint_every


# ---------------------------------------------------------------------------------------------------------------
# their script
def locate_script(src: str, rev: str | None, work: Path) -> dict:
    """The example script to run and where it came from: {"path", "source", "commit", "sha256", "min_version"}."""
    p = Path(src).expanduser().resolve()
    info: dict = {"source": str(p), "commit": None}
    if p.is_file():
        if rev:
            sys.exit("--diffusers-rev needs --diffusers-src to be a checkout or a git directory, not the script")
        script = p
        top = _git(["rev-parse", "--show-toplevel"], cwd=p.parent)
        if top:
            info["commit"] = _git(["log", "-1", "--format=%H", "--", str(p)], cwd=p.parent) or None
            info["checkout_head"] = _git(["rev-parse", "HEAD"], cwd=p.parent)
            info["dirty"] = bool(_git(["status", "--porcelain", "--", str(p)], cwd=p.parent))
    elif p.is_dir():
        git_dir = _git_dir(p)
        if rev is not None or (git_dir and not (p / SCRIPT_REL).is_file()):
            if git_dir is None:
                sys.exit(f"--diffusers-src {p}: not a git checkout or git directory, so --diffusers-rev can't be read")
            rev = rev or "HEAD"
            commit = _git(["--git-dir", git_dir, "rev-parse", f"{rev}^{{commit}}"])
            if not commit:
                sys.exit(f"--diffusers-rev {rev!r} is not a commit of {git_dir}")
            text = _git(["--git-dir", git_dir, "show", f"{commit}:{SCRIPT_REL}"], strip=False)
            if text is None:
                sys.exit(f"{SCRIPT_REL} does not exist at {commit} of {git_dir}")
            script = work / "peer" / Path(SCRIPT_REL).name
            script.parent.mkdir(parents=True, exist_ok=True)
            script.write_text(text)
            last = _git(["--git-dir", git_dir, "log", "-1", "--format=%H", commit, "--", SCRIPT_REL])
            info.update(commit=commit, rev=rev, git_dir=git_dir, script_last_changed=last)
        else:
            script = p / SCRIPT_REL
            if not script.is_file():
                sys.exit(f"--diffusers-src {p} has no {SCRIPT_REL}; give a diffusers checkout or the script path")
            if git_dir:
                info["checkout_head"] = _git(["rev-parse", "HEAD"], cwd=p)
                info["commit"] = _git(["log", "-1", "--format=%H", "--", SCRIPT_REL], cwd=p) or None
                info["dirty"] = bool(_git(["status", "--porcelain", "--", SCRIPT_REL], cwd=p))
    else:
        sys.exit(f"--diffusers-src {src}: no such file or directory")
    text = script.read_text()
    info["path"] = str(script)
    info["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    m = re.search(r'check_min_version\(\s*["\']([^"\']+)["\']', text)
    info["min_version"] = m.group(1) if m else None
    return info


def _git_dir(p: Path) -> str | None:
    out = _git(["rev-parse", "--absolute-git-dir"], cwd=p)
    if out:
        return out
    if (p / "HEAD").is_file() and (p / "objects").is_dir():  # a bare mirror
        return str(p)
    return None


def _git(args: list[str], cwd: Path | None = None, strip: bool = True) -> str | None:
    try:
        r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() if strip else r.stdout


def check_versions(min_version: str | None) -> dict:
    import diffusers
    from packaging import version

    have = diffusers.__version__
    if min_version and version.parse(have) < version.parse(min_version):
        sys.exit(f"their script calls check_min_version({min_version!r}) but diffusers {have} is installed: use the "
                 f"example of a diffusers release that matches (e.g. --diffusers-rev v{version.parse(have).base_version}"
                 f" with a git --diffusers-src; `git log -- {SCRIPT_REL}` lists its commits)")
    try:
        import datasets  # noqa: F401
    except ImportError:
        sys.exit("their script needs `datasets`: pip install datasets (or pip install -e .[peer])")
    import accelerate
    import peft
    import torch
    import transformers

    out = {"diffusers": have, "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__, "peft": peft.__version__, "datasets": datasets.__version__}
    try:
        import tensorboard  # noqa: F401

        out["tensorboard"] = "installed (their default --report_to tensorboard logs loss and lr every step)"
    except ImportError:
        out["tensorboard"] = "not installed (their default --report_to tensorboard is dropped: no tracker)"
    return out


# ---------------------------------------------------------------------------------------------------------------
# shared inputs
def build_inputs(work: Path, args) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from stepdistill.data.shapes import sample

    teacher = Path(args.teacher).resolve() if args.teacher else work / "teacher"
    if not args.teacher:
        from stepdistill.testing import build_tiny_pipeline

        build_tiny_pipeline(teacher, sdxl=True)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "metadata.jsonl", "w") as f:
        for i in range(args.num_images):
            item = sample("train", i, size=args.resolution)
            name = f"{i:05d}.png"
            item["image"].save(data / name)
            f.write(json.dumps({"file_name": name, "text": item["caption"]}) + "\n")
    return teacher, data


def ours_cmd(args, teacher: Path, data: Path, steps: int, run: Path) -> list[str]:
    o = args
    overrides = [
        "name=peer-lcm-sdxl", f"model.teacher={teacher}", "model.dtype=fp32",
        "student.type=lora", f"student.lora_rank={o.lora_rank}", f"student.lora_alpha={o.lora_alpha}",
        "student.lora_dropout=0.0",
        "objective.name=consistency", f"objective.options.num_ddim_timesteps={o.num_ddim_timesteps}",
        f"objective.options.w_min={o.w_min}", f"objective.options.w_max={o.w_max}",
        "objective.options.loss=huber", "objective.options.huber_c=0.001", "objective.options.timestep_scaling=10.0",
        "objective.options.lora_ema_target=false",  # diffusers' example: the LoRA student itself is the target
        f"data.source={data}", f"data.resolution={o.resolution}", "data.center_crop=true", "data.random_flip=false",
        f"train.output_dir={run}", "train.seed=0", f"train.max_steps={steps}", f"train.batch_size={o.batch_size}",
        "train.grad_accum=1", f"train.lr={o.lr}", f"train.weight_decay={o.weight_decay}", "train.max_grad_norm=1.0",
        "train.lr_scheduler=constant", "train.warmup_steps=0", "train.mixed_precision=no", "train.ema_decay=0.0",
        f"train.checkpoint_every={FAR}", "train.sample_every=0", "train.export=none", "train.trackers=[]",
    ]
    return [*launcher(args, module=True), "stepdistill", "train", str(BASE_CONFIG), *overrides]


def theirs_cmd(args, script: str, teacher: Path, data: Path, steps: int, run: Path) -> list[str]:
    o = args
    flags = [
        "--pretrained_teacher_model", str(teacher), "--train_data_dir", str(data), "--output_dir", str(run),
        "--cache_dir", str(run / "hf-datasets-cache"), "--seed", "0",
        "--resolution", str(o.resolution), "--center_crop", "--train_batch_size", str(o.batch_size),
        "--max_train_steps", str(steps), "--gradient_accumulation_steps", "1", "--dataloader_num_workers", "0",
        "--lora_rank", str(o.lora_rank), "--lora_alpha", str(o.lora_alpha), "--lora_dropout", "0.0",
        "--num_ddim_timesteps", str(o.num_ddim_timesteps), "--w_min", str(o.w_min), "--w_max", str(o.w_max),
        "--loss_type", "huber", "--huber_c", "0.001", "--timestep_scaling_factor", "10.0",
        "--learning_rate", str(o.lr), "--adam_weight_decay", str(o.weight_decay), "--max_grad_norm", "1.0",
        "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--mixed_precision", "no",
        "--checkpointing_steps", str(FAR), "--validation_steps", str(FAR),
    ]
    return [*launcher(args, module=False), script, *flags]


def launcher(args, module: bool) -> list[str]:
    if args.launcher == "python":
        return [sys.executable, "-m"] if module else [sys.executable]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]
    if args.device == "cpu":
        cmd.append("--cpu")
    return [*cmd, "-m"] if module else cmd


def child_env(args, ours: bool) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["ACCELERATE_USE_CPU"] = "1"
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    if ours:  # this checkout's stepdistill, whatever is installed
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


# ---------------------------------------------------------------------------------------------------------------
# one timed run
class GpuPoller(threading.Thread):
    """Peak nvidia-smi used memory (MiB) of a process tree."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0.0, threading.Event()

    def run(self):
        import psutil

        while not self.stop.wait(0.2):
            try:
                pids = {self.pid, *(c.pid for c in psutil.Process(self.pid).children(recursive=True))}
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                                      "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5).stdout
            except Exception:
                continue
            used = sum(float(m) for p, m in (line.split(",") for line in out.splitlines() if "," in line)
                       if int(p) in pids)
            self.peak = max(self.peak, used)


def run_child(cmd: list[str], env: dict, cwd: Path, log: Path, gpu: bool) -> dict:
    """Run one child to its end; its output (stdout and stderr) goes to `log`, each chunk stamped with the time the
    parent read it, so progress-bar updates can be timed (`chunks`: (seconds since spawn, end offset in the text))."""
    chunks: list[tuple[float, int]] = []
    with open(log, "wb") as f:
        f.write(("$ " + " ".join(cmd) + "\n\n").encode())
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0)
        poller = GpuPoller(proc.pid) if gpu else None
        if poller:
            poller.start()
        size, fd = 0, proc.stdout.fileno()
        while True:
            data = os.read(fd, 65536)
            if not data:
                break
            stamp = time.perf_counter() - t0
            f.write(data)
            size += len(data)
            chunks.append((stamp, size))
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if poller:
            poller.stop.set()
            poller.join()
    out = {"wall_s": wall, "rc": proc.returncode, "max_rss_mib": usage.ru_maxrss / 1024, "chunks": chunks}
    if poller:
        out["gpu_peak_mib"] = poller.peak
    return out


# the training progress bars: ours (stepdistill.trainer, tqdm desc "train") and theirs (desc "Steps")
BARS = {"ours": re.compile(rb"train:\s*\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)"),
        "theirs": re.compile(rb"Steps:\s*\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)")}


def progress_times(side: str, log: Path, chunks: list[tuple[float, int]]) -> dict[int, float]:
    """{k: seconds since spawn when the parent first read the training bar at k/N}; the header line is skipped."""
    raw = log.read_bytes()
    header = raw.index(b"\n\n") + 2
    times: dict[int, float] = {}
    i = 0
    for m in BARS[side].finditer(raw, header):
        end = m.end() - header
        while i < len(chunks) and chunks[i][1] < end:
            i += 1
        k = int(m.group(1))
        if k not in times and i < len(chunks):
            times[k] = chunks[i][0]
    return times


def check_steps(side: str, run: Path, log: Path, steps: int) -> str | None:
    """None when the run trained exactly `steps` steps, else what is wrong."""
    if side == "ours":
        state = run / "final" / "trainer_state.json"
        if not state.is_file():
            return f"no {state}"
        done = json.loads(state.read_text()).get("step")
        return None if done == steps else f"trained {done} steps, not {steps}"
    bars = BARS["theirs"].findall(log.read_bytes())
    if not bars:
        return "no 'Steps:' progress bar in its output"
    done, total = map(int, bars[-1])
    if (done, total) != (steps, steps):
        return f"progress bar ended at {done}/{total}, not {steps}/{steps}"
    if not (run / "pytorch_lora_weights.safetensors").is_file():
        return "no pytorch_lora_weights.safetensors written"
    return None


# ---------------------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers-src", default=os.environ.get("DIFFUSERS_SRC"),
                   help="diffusers checkout, its git dir (bare mirror ok), or the example script (env DIFFUSERS_SRC)")
    p.add_argument("--diffusers-rev", default=None,
                   help="read the example at this commit/tag of a git --diffusers-src (default: the work tree, or "
                        "HEAD of a bare git dir)")
    p.add_argument("--out", default="runs/peer-lcm-sdxl")
    p.add_argument("--work", default=None, help="folder for teacher, data and runs (default: a temporary one)")
    p.add_argument("--keep-work", action="store_true", help="keep the run folders (default: deleted once checked)")
    p.add_argument("--teacher", default=None, help="an SDXL diffusers pipeline folder (default: a tiny random one)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--launcher", choices=["python", "accelerate"], default="python")
    p.add_argument("--threads", type=int, default=None, help="OMP/MKL threads of both children (default: inherit)")
    p.add_argument("--steps", type=int, nargs=2, default=[5, 25], metavar=("N1", "N2"),
                   help="time steps N1..N2 (progress: within one N2-step run; processes: N1- vs N2-step runs)")
    p.add_argument("--method", choices=["progress", "processes"], default="progress",
                   help="progress: time the training progress bars of one run per side and round (default); "
                        "processes: whole-process wall time of an N1 and an N2 run (noisier)")
    p.add_argument("--repeats", type=int, default=3, help="rounds (each: both sides at N1 and N2)")
    p.add_argument("--warmup", type=int, default=0, help="untimed one-step runs of each side first (page cache)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--num-images", type=int, default=None, help="default: batch size x N2 (one epoch, no repeats)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=16, help="an integer: their --lora_alpha is type=int")
    p.add_argument("--num-ddim-timesteps", type=int, default=50)
    p.add_argument("--w-min", type=float, default=3.0)
    p.add_argument("--w-max", type=float, default=15.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    args = p.parse_args()
    if not args.diffusers_src:
        p.error("--diffusers-src is required (a diffusers checkout, git dir, or the example script)")
    n1, n2 = args.steps
    if not 0 < n1 < n2:
        p.error("--steps needs 0 < N1 < N2")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.num_images = args.num_images or args.batch_size * n2
    if args.num_images < args.batch_size:
        p.error("--num-images must be at least the batch size")

    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    tmp = None
    if args.work:
        work = Path(args.work).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="peer-lcm-sdxl-")
        work = Path(tmp)
    try:
        report = measure(args, out, logs, work)
    finally:
        if tmp and not args.keep_work:
            shutil.rmtree(tmp, ignore_errors=True)
    print(report)


def measure(args, out: Path, logs: Path, work: Path) -> str:
    n1, n2 = args.steps
    script = locate_script(args.diffusers_src, args.diffusers_rev, work)
    versions = check_versions(script["min_version"])
    print(f"their script: {script['path']} (commit {script.get('commit') or 'unknown'}, needs diffusers >= "
          f"{script['min_version']}); installed diffusers {versions['diffusers']}", flush=True)
    teacher, data = build_inputs(work, args)
    runs_root = work / "runs"
    runs_root.mkdir(exist_ok=True)
    gpu = args.device == "cuda"

    def one(side: str, steps: int, tag: str) -> dict:
        run = runs_root / f"{side}-{tag}-n{steps}"
        shutil.rmtree(run, ignore_errors=True)
        cmd = (ours_cmd(args, teacher, data, steps, run) if side == "ours"
               else theirs_cmd(args, script["path"], teacher, data, steps, run))
        log = logs / f"{side}-{tag}-n{steps}.log"
        res = run_child(cmd, child_env(args, side == "ours"), work, log, gpu)
        if res["rc"] != 0:
            tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
            sys.exit(f"{side} ({tag}, {steps} steps) failed with exit code {res['rc']}; log {log}:\n{tail}")
        bad = check_steps(side, run, log, steps)
        if bad:
            sys.exit(f"{side} ({tag}, {steps} steps): {bad}; log {log}")
        if not args.keep_work:
            shutil.rmtree(run, ignore_errors=True)
        times = progress_times(side, log, res.pop("chunks"))
        res["progress_s"] = {str(k): round(v, 4) for k, v in sorted(times.items())}
        if args.method == "progress" and steps >= n2:
            k0 = min((k for k in times if k >= n1), default=None)
            if k0 is None or steps not in times or k0 >= steps:
                sys.exit(f"{side} ({tag}): could not read its training progress bar at steps >= {n1} and {steps} "
                         f"(seen: {sorted(times)}); log {log}; try --method processes")
            res["window_mean_s"] = (times[steps] - times[k0]) / (steps - k0)
            res["window"] = [k0, steps]
            deltas = [times[k + 1] - times[k] for k in range(k0, steps) if k in times and k + 1 in times]
            res["median_step_s"] = statistics.median(deltas) if deltas else res["window_mean_s"]
            res["step_intervals_s"] = [round(d, 4) for d in deltas]
        res.update(side=side, tag=tag, steps=steps, cmd=cmd)
        mem = f", GPU {res['gpu_peak_mib']:.0f} MiB" if gpu else ""
        sps = (f"  steps {res['window'][0]}-{steps}: median {res['median_step_s']:.3f} s/step, mean "
               f"{res['window_mean_s']:.3f}" if "window" in res else "")
        print(f"  {side:6s} {tag:7s} {steps:4d} steps  {res['wall_s']:7.2f} s{sps}  peak RSS "
              f"{res['max_rss_mib']:6.0f} MiB{mem}", flush=True)
        return res

    t_start = time.time()
    for i in range(args.warmup):
        for side in ("ours", "theirs"):
            one(side, 1, f"warmup{i}")
    rows = []
    counts = (n2,) if args.method == "progress" else (n1, n2)
    for r in range(args.repeats):
        order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
        for steps in counts:
            for side in order:
                rows.append(one(side, steps, f"round{r}"))

    def row(side, r, steps):
        return next(x for x in rows if x["side"] == side and x["tag"] == f"round{r}" and x["steps"] == steps)

    rounds = []
    for r in range(args.repeats):
        rec = {"round": r}
        for side in ("ours", "theirs"):
            if args.method == "progress":
                x = row(side, r, n2)
                sps = x["median_step_s"]
                rec[f"{side}_window_mean_s"] = x["window_mean_s"]
                rec[f"{side}_fixed_s"] = x["wall_s"] - n2 * x["window_mean_s"]
            else:
                sps = (row(side, r, n2)["wall_s"] - row(side, r, n1)["wall_s"]) / (n2 - n1)
                rec[f"{side}_fixed_s"] = row(side, r, n1)["wall_s"] - n1 * sps
            rec[f"{side}_s_per_step"] = sps
        rec["ratio"] = rec["ours_s_per_step"] / rec["theirs_s_per_step"] if rec["theirs_s_per_step"] > 0 else None
        rounds.append(rec)

    def med(key):
        return statistics.median(x[key] for x in rounds)

    def peak(side, key="max_rss_mib"):
        return statistics.median(x[key] for x in rows if x["side"] == side and x["steps"] == n2)

    summary = {side: {"s_per_step": med(f"{side}_s_per_step"),
                      "s_per_step_min": min(x[f"{side}_s_per_step"] for x in rounds),
                      "fixed_s": med(f"{side}_fixed_s"), "peak_rss_mib": peak(side),
                      "peak_rss_mib_max": max(x["max_rss_mib"] for x in rows if x["side"] == side)}
               for side in ("ours", "theirs")}
    if args.method == "progress":
        for side in ("ours", "theirs"):
            pooled = [d for x in rows if x["side"] == side and x["steps"] == n2 for d in x["step_intervals_s"]]
            summary[side]["s_per_step"] = statistics.median(pooled)  # the median step of all rounds together
            summary[side]["median_step_s_per_round"] = [x[f"{side}_s_per_step"] for x in rounds]
            summary[side]["window_mean_s"] = med(f"{side}_window_mean_s")
            summary[side]["window_mean_s_min"] = min(x[f"{side}_window_mean_s"] for x in rounds)
    if gpu:
        for side in ("ours", "theirs"):
            summary[side]["gpu_peak_mib"] = peak(side, "gpu_peak_mib")
    o, t = summary["ours"], summary["theirs"]
    summary["time_ratio"] = o["s_per_step"] / t["s_per_step"] if t["s_per_step"] > 0 else None
    summary["time_ratio_min"] = o["s_per_step_min"] / t["s_per_step_min"] if t["s_per_step_min"] > 0 else None
    if args.method == "progress":
        summary["time_ratio_window_mean"] = o["window_mean_s"] / t["window_mean_s"]
        summary["time_ratio_window_mean_min"] = o["window_mean_s_min"] / t["window_mean_s_min"]
    summary["time_ratio_per_round"] = [x["ratio"] for x in rounds]
    summary["memory_ratio"] = o["peak_rss_mib"] / t["peak_rss_mib"]
    if gpu:
        summary["gpu_memory_ratio"] = o["gpu_peak_mib"] / t["gpu_peak_mib"] if t["gpu_peak_mib"] else None
    summary["goal_time_ratio_le_1"] = None if summary["time_ratio"] is None else summary["time_ratio"] <= 1.0
    summary["total_wall_s"] = time.time() - t_start
    if any(x["theirs_s_per_step"] <= 0 or x["ours_s_per_step"] <= 0 for x in rounds):
        summary["warning"] = ("a round's T(N2) - T(N1) was not positive: the machine's noise is larger than the "
                              "step time difference; raise --steps N2 or --repeats")

    settings = {k: v for k, v in vars(args).items() if k not in ("work",)}
    settings.update(num_images=args.num_images, cpu_count=os.cpu_count(), platform=platform.platform(),
                    python=platform.python_version(), date=datetime.datetime.now().isoformat(timespec="seconds"),
                    OMP_NUM_THREADS=child_env(args, True).get("OMP_NUM_THREADS"),
                    teacher=str(args.teacher or "tiny random SDXL (stepdistill.testing.build_tiny_pipeline)"),
                    stepdistill_commit=_git(["rev-parse", "HEAD"], cwd=ROOT),
                    stepdistill_uncommitted_changes=bool(_git(["status", "--porcelain", "--", "stepdistill"], cwd=ROOT)))
    result = {"settings": settings, "versions": versions, "their_script": script,
              "commands": {"ours": rows[0]["cmd"], "theirs": next(x["cmd"] for x in rows if x["side"] == "theirs")},
              "runs": [{k: v for k, v in x.items() if k != "cmd"} for x in rows], "rounds": rounds, "summary": summary}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / "results.md").write_text(md)
    return md + f"\nwritten: {out / 'results.json'}, {out / 'results.md'}, logs in {out / 'logs'}"


def markdown(result: dict) -> str:
    s, st, sc = result["summary"], result["settings"], result["their_script"]
    n1, n2 = st["steps"]
    gpu = "gpu_peak_mib" in s["ours"]
    prog = "window_mean_s" in s["ours"]
    ratio = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    if prog:
        how = (f"One run of {n2} steps per side and round; T(k) = when its training progress bar reached k. s/step = "
               f"median of the single-step intervals T(k+1) - T(k), steps {n1}..{n2} of all rounds pooled (robust to "
               f"the stalls of a shared machine); window mean = (T({n2}) - T({n1})) / {n2 - n1}, median over rounds, "
               "and its best round.")
        head = "| | s / step (median step) | window mean s / step | best round, window mean | fixed s | peak RSS (MiB) |"
        cols = lambda x: [x["s_per_step"], x["window_mean_s"], x["window_mean_s_min"]]  # noqa: E731
        rcols = [s["time_ratio"], s["time_ratio_window_mean"], s["time_ratio_window_mean_min"]]
    else:
        how = (f"s/step = (T({n2}) - T({n1})) / {n2 - n1}, T(k) = the whole-process wall time of a k-step run; median "
               "over rounds and best round.")
        head = "| | s / step | best round | fixed s | peak RSS (MiB) |"
        cols = lambda x: [x["s_per_step"], x["s_per_step_min"]]  # noqa: E731
        rcols = [s["time_ratio"], s["time_ratio_min"]]
    lines = [
        "# stepdistill `consistency` LoRA vs diffusers `train_lcm_distill_lora_sdxl.py`",
        "",
        f"{st['teacher']}, {st['device']}, batch {st['batch_size']}, {st['resolution']} px, LoRA rank "
        f"{st['lora_rank']} (alpha {st['lora_alpha']}), num_ddim_timesteps {st['num_ddim_timesteps']}, w in "
        f"[{st['w_min']:g}, {st['w_max']:g}], huber, fp32; {st['num_images']} images; steps {n1} to {n2}, "
        f"{st['repeats']} alternated rounds; {st['cpu_count']} CPU cores, OMP_NUM_THREADS={st['OMP_NUM_THREADS']}; "
        f"launcher {st['launcher']}.",
        f"Their script: commit {sc.get('commit') or 'unknown'}"
        + (f" (file last changed in {sc['script_last_changed']})" if sc.get("script_last_changed") else "")
        + f" (sha256 {sc['sha256'][:12]}, check_min_version "
        f"{sc['min_version']}); diffusers {result['versions']['diffusers']}, torch {result['versions']['torch']}.",
        "",
        how + " Fixed = wall time - N x mean s/step (startup and end-of-run work). Peak RSS = median ru_maxrss of "
        f"the {n2}-step runs (the whole process).",
        "",
        head + (" peak GPU (MiB) |" if gpu else ""),
        "|" + "---|" * (head.count("|") - 1 + gpu),
    ]
    for side, label in (("ours", "stepdistill"), ("theirs", "diffusers example")):
        x = s[side]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in cols(x)) + f" | {x['fixed_s']:.1f} | "
                     f"{x['peak_rss_mib']:.0f} |" + (f" {x['gpu_peak_mib']:.0f} |" if gpu else ""))
    lines.append(f"| **ours / theirs** | **{ratio(rcols[0])}** | " + " | ".join(ratio(v) for v in rcols[1:])
                 + f" | | **{ratio(s['memory_ratio'])}** |" + (f" {ratio(s.get('gpu_memory_ratio'))} |" if gpu else ""))
    lines += ["", "Per-round time ratios" + (" (of each run's median step)" if prog else "") + ": "
              + ", ".join(ratio(v) for v in s["time_ratio_per_round"]) + ". Goal "
              f"ratio <= 1.0: {({True: 'met', False: 'NOT met'}).get(s['goal_time_ratio_le_1'], 'n/a')}. Total {s['total_wall_s']:.0f} s."]
    if "warning" in s:
        lines += ["", f"Warning: {s['warning']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

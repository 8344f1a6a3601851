"""`stepdistill benchmark CONFIG [overrides]`: where a training step's time and memory go.

The trainer is built from the config exactly as `train` builds it; `--warmup` steps run untimed, then `--repeats`
rounds of `--steps` steps run through the trainer's own step (`Trainer._train_step`) with every phase timed: data, text encoding, VAE
encoding, each network's forward passes (teacher, student, fake score, discriminator, ...), the backward pass and
the optimizer step of each network update, and the objective's own arithmetic around them. Time is exclusive
(a phase's time excludes the phases inside it), so the phases and "framework (rest)" add up to the step time.

After each round, every distinct network pass the steps made (same network, adapter, grad mode and input shapes)
is replayed once alone, on a copy of its recorded inputs: forward only where the step ran it without grad, forward
+ backward where the step's backward reached its output; the text encoder and VAE calls likewise. Steps and
replays alternate, so both sides of the ratio see the machine in the same state. The **overhead ratio**
is the measured step time divided by the sum of those bare passes per step: 1.0 means the framework adds nothing
to the networks' own work. Peak memory: the process's peak RSS on CPU, torch.cuda.max_memory_allocated on GPU,
beside the teacher's own peak (a fresh process that loads the teacher and runs its guided forward on one batch).
"""
from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .denoiser import Denoiser, _tuner_layers, adapter_scope
from .utils import atomic_write_json, atomic_write_text


class PhaseClock:
    """Exclusive wall time per phase: time spent in a phase nested inside another counts only for the inner one."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._inner: list[float] = []
        self._open: list[tuple[str, float]] = []
        self.enabled = False

    def begin(self, name: str) -> None:
        if self.enabled:
            self.sync()
            self._open.append((name, time.perf_counter()))
            self._inner.append(0.0)

    def end(self) -> None:
        if self.enabled and self._open:
            self.sync()
            name, t0 = self._open.pop()
            dt = time.perf_counter() - t0
            self.seconds[name] += dt - self._inner.pop()
            self.calls[name] += 1
            if self._inner:
                self._inner[-1] += dt

    @contextlib.contextmanager
    def phase(self, name: str):
        opened = self.enabled
        self.begin(name)
        try:
            yield
        finally:
            if opened:
                self.end()


CUT = " (cut short: its time in the step)"


@dataclass
class RecordedPass:
    """One distinct network pass: what to call and a copy of its inputs, for the bare replay."""

    label: str
    run: object  # a callable taking no arguments that performs the pass (forward, or forward + backward)
    count: int = 0
    # A pass the objective cut short (DMD2 reads the fake score's mid-block features and stops there): a replay
    # would run it whole, so it counts at its time inside the step.
    cut_short: bool = False
    inloop_seconds: float = 0.0


def _shape_key(value) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), str(value.dtype), value.requires_grad)
    if isinstance(value, dict):
        return tuple((k, _shape_key(v)) for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_shape_key(v) for v in value)
    return (type(value).__name__,)


def _snapshot(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad and value.is_floating_point())
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    return value


def _adapter_state(module) -> tuple:
    layers = _tuner_layers(module)
    if not layers:
        return ()
    return (tuple(layers[0]._active_adapter), bool(layers[0]._disable_adapters))


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    raise TypeError(f"cannot find the output tensor of {type(out).__name__}")


class StepProfiler:
    """Times a Trainer's steps phase by phase and records its network passes for replay.

    Installs wrappers on the trainer's objects (never on library classes except Denoiser.__call__, restored on
    exit); the step's arithmetic is untouched, so a profiled step computes what an unprofiled one does."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.clock = PhaseClock(trainer.device)
        self.passes: dict[tuple, RecordedPass] = {}
        self.recording = False
        self._local = threading.local()
        self._undo: list = []
        self._hooked: set[int] = set()

    # --- labels -------------------------------------------------------------------------------------------
    def _network(self) -> str:
        return getattr(self._local, "network", None) or "outside"

    def _role(self, den: Denoiser) -> str:
        tr = self.trainer
        if den.adapter is not None:
            return {"student": "student", "fake": "fake score", "target": "target"}.get(den.adapter, den.adapter)
        if den.module is tr.teacher.net:
            return "teacher"
        if den.module is tr.student:
            return "student"
        for name, net in tr.networks.items():
            if den.module is net.module:
                return {"fake": "fake score"}.get(name, name)
        return "frozen copy"  # e.g. a progressive round's frozen target, an EMA target

    def _phase(self, what: str) -> str:
        return f"{self._network()} update | {what}"

    # --- installing -----------------------------------------------------------------------------------------
    def _patch(self, obj, attr: str, wrapper) -> None:
        had = attr in vars(obj) if not isinstance(obj, type) else True
        old = getattr(obj, attr)
        setattr(obj, attr, wrapper(old))
        self._undo.append((obj, attr, old, had))

    def __enter__(self):
        tr, prof = self.trainer, self

        def timed(what, record=None):
            def wrap(fn):
                def inner(*args, **kwargs):
                    with prof.clock.phase(prof._phase(what() if callable(what) else what)):
                        out = fn(*args, **kwargs)
                    if record is not None and prof.recording:
                        record(args, kwargs)
                    return out
                return inner
            return wrap

        self._patch(tr, "_batch", timed("data"))
        encoder = tr.teacher.prompt_encoder
        tr.teacher.prompt_encoder = _TimedEncoder(encoder, self)
        self._undo.append((tr.teacher, "prompt_encoder", encoder, True))
        self._patch(tr.teacher.vae, "encode", timed("VAE encoding", self._record_vae))

        def wrap_losses(fn):
            def losses(network, batch, gen):
                prof._local.network = network
                with prof.clock.phase(prof._phase("objective arithmetic")):
                    return fn(network, batch, gen)
            return losses

        self._patch(tr.objective, "losses", wrap_losses)
        self._patch(tr.accelerator, "backward", timed(lambda: "backward"))
        for name, opt in tr.optimizers.items():
            self._patch(opt, "step", timed("optimizer step"))
            self._patch(opt, "zero_grad", timed("optimizer step"))
        self._patch(tr.accelerator, "clip_grad_norm_", timed("gradient clipping"))
        if tr.ema is not None:
            self._patch(tr.ema, "update", timed("EMA update"))

        original_call = Denoiser.__call__

        def denoiser_call(den, x_t, t, cond, w=None):
            prof._hook(den.module)  # a network no TrainedNetwork names (an EMA target, a frozen round target)
            role = prof._role(den)
            prof._local.role = role
            grad = " (grad)" if torch.is_grad_enabled() else ""
            with prof.clock.phase(prof._phase(f"{role} forward{grad}")):
                return original_call(den, x_t, t, cond, w)

        Denoiser.__call__ = denoiser_call
        self._undo.append((Denoiser, "__call__", original_call, True))
        # The raw inputs of every backbone pass, as the network received them (below DDP, inside the adapter scope)
        backbones = {id(tr.teacher.net): tr.teacher.net, id(tr.student): tr.student}
        for net in tr.networks.values():
            backbones.setdefault(id(net.module), net.module)
        for module in backbones.values():
            self._hook(module)
        return self

    def _hook(self, module) -> None:
        if id(module) in self._hooked:
            return
        self._hooked.add(id(module))
        if hasattr(getattr(module, "config", None), "in_channels"):  # a backbone
            self._undo.append(("hook", module.register_forward_pre_hook(self._record_backbone, with_kwargs=True)))
            self._undo.append(("hook", module.register_forward_hook(self._watch_backward, always_call=True)))
        else:  # a head (discriminator): timed and recorded as its own network pass
            self._undo.append(("hook", module.register_forward_pre_hook(self._record_head, with_kwargs=True)))
            self._undo.append(("hook", module.register_forward_hook(lambda m, a, o: self.clock.end())))

    def __exit__(self, *exc):
        for item in reversed(self._undo):
            if item[0] == "hook":
                item[1].remove()
                continue
            obj, attr, old, had = item
            if had or isinstance(obj, type):
                setattr(obj, attr, old)
            else:
                delattr(obj, attr)
        self._undo.clear()
        self._hooked.clear()
        return False

    # --- recording ------------------------------------------------------------------------------------------
    def _add(self, key: tuple, label: str, make_run) -> None:
        if not self.recording:
            return
        if key not in self.passes:
            self.passes[key] = RecordedPass(label, make_run())
        self.passes[key].count += 1

    def _record_backbone(self, module, args, kwargs):
        grad = torch.is_grad_enabled()
        state = _adapter_state(module)
        role = getattr(self._local, "role", "network")
        key = ("backbone", id(module), state, grad, _shape_key(args), _shape_key(kwargs))
        self._local.pass_key = key if self.recording else None

        def make_run():
            saved_args, saved_kwargs = _snapshot(args), _snapshot(kwargs)
            adapter = None if not state or state[1] else state[0][0]
            rec = RecordedPass(f"{role} forward", None)

            def run():
                with adapter_scope(module, adapter) if state else contextlib.nullcontext():
                    a, k = _snapshot(saved_args), _snapshot(saved_kwargs)
                    if not grad:
                        with torch.no_grad():
                            return module(*a, **k)
                    out = _first_tensor(module(*a, **k))
                    if rec.label.endswith("+ backward"):  # as in the step: backward only where one reached it
                        out.backward(torch.ones_like(out))
            rec.run = run
            return rec

        if self.recording and key not in self.passes:
            self.passes[key] = make_run()
        if self.recording:
            self.passes[key].count += 1
            self.clock.sync()
            self._local.pass_start = time.perf_counter()

    def _watch_backward(self, module, args, out):
        """A grad-mode pass is replayed with its backward only if the step's backward reached its output (a pass
        run in grad mode whose output is then detached costs its forward, and the memory of its activations)."""
        key, self._local.pass_key = getattr(self._local, "pass_key", None), None
        if key is None:
            return
        rec = self.passes[key]
        if out is None:  # the forward raised: cut short (called anyway: always_call)
            self.clock.sync()
            rec.cut_short = True
            rec.inloop_seconds += time.perf_counter() - self._local.pass_start
            if not rec.label.endswith(CUT):
                rec.label = rec.label.split(" (grad")[0].split(" + backward")[0] + CUT
            return
        if not torch.is_grad_enabled() or rec.cut_short:
            return
        tensor = _first_tensor(out)
        if tensor.requires_grad and not rec.label.endswith("+ backward"):
            def seen(grad, rec=rec):
                if not rec.label.endswith("+ backward"):
                    rec.label = rec.label.replace(" (grad, no backward)", "") + " + backward"
                return grad
            tensor.register_hook(seen)
            if "(grad" not in rec.label:
                rec.label += " (grad, no backward)"

    def _record_head(self, module, args, kwargs):
        grad = torch.is_grad_enabled()
        key = ("head", id(module), grad, _shape_key(args), _shape_key(kwargs))
        name = next((n for n, net in self.trainer.networks.items() if net.module is module), "head")

        def make_run():
            saved_args, saved_kwargs = _snapshot(args), _snapshot(kwargs)

            def run():
                a, k = _snapshot(saved_args), _snapshot(saved_kwargs)
                if not grad:
                    with torch.no_grad():
                        return module(*a, **k)
                out = _first_tensor(module(*a, **k))
                out.backward(torch.ones_like(out))
            return run

        self._add(key, f"{name} forward{' + backward' if grad else ''}", make_run)
        self.clock.begin(self._phase(f"{name} forward{' (grad)' if grad else ''}"))  # ended by the forward hook

    def _record_text(self, prompts, resolution) -> None:
        encoder = self.trainer.teacher.prompt_encoder
        inner = encoder.inner if isinstance(encoder, _TimedEncoder) else encoder
        key = ("text", len(prompts), resolution)
        self._add(key, "text encoder forward", lambda: (lambda: inner(list(prompts), resolution)))

    def _record_vae(self, args, kwargs) -> None:
        vae = self.trainer.teacher.vae
        pixels = args[0]
        key = ("vae", tuple(pixels.shape), str(pixels.dtype))
        saved = pixels.detach().clone()

        def make_run():
            encode = type(vae).encode

            def run():
                with torch.no_grad():
                    return encode(vae, saved)
            return run

        self._add(key, "VAE encoder forward", make_run)


class _TimedEncoder:
    """The teacher's PromptEncoder, timed (and recorded for replay); everything else passes through."""

    def __init__(self, inner, profiler: StepProfiler):
        self.inner = inner
        self.profiler = profiler

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, prompts, resolution=None):
        with self.profiler.clock.phase(self.profiler._phase("text encoding")):
            out = self.inner(prompts, resolution)
        self.profiler._record_text(prompts, resolution)
        return out


# --- memory ---------------------------------------------------------------------------------------------------

def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def teacher_peak_memory(cfg) -> dict:
    """The teacher's own peak memory, in a fresh process: load it, encode one batch of prompts, one guided forward."""
    code = ("import json,sys; from stepdistill.benchmark import _teacher_child; "
            "print('TEACHER ' + json.dumps(_teacher_child(sys.argv[1])))")
    with _saved_config(cfg) as path:
        res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("TEACHER ")), None)
    if res.returncode != 0 or line is None:
        from .errors import StepdistillError

        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise StepdistillError(f"benchmark: the teacher-only process failed ({tail}); rerun with --no-teacher-memory")
    return json.loads(line[len("TEACHER "):])


@contextlib.contextmanager
def _saved_config(cfg):
    import tempfile

    from .config import save_config

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        save_config(cfg, path)
        yield path


def _teacher_child(config_path: str) -> dict:
    from .config import load_config
    from .models import load_teacher

    cfg = load_config(config_path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = load_teacher(cfg.model, device)
    b, res = cfg.train.batch_size, cfg.data.resolution
    cond = teacher.prompt_encoder(["a red circle"] * b, res)
    uncond = teacher.prompt_encoder([""] * b, res)
    x = torch.randn(b, *teacher.latent_shape(res), device=device)
    t = torch.full((b,), teacher.schedule.num_train_timesteps // 2, device=device, dtype=torch.long)
    with torch.no_grad():
        teacher.denoiser().guided_x0_eps(x, t, cond, uncond, 4.5)
    return {"peak_mib": peak_memory_mib(device), "device": str(device)}


# --- the command -----------------------------------------------------------------------------------------------

@dataclass
class BenchmarkResult:
    config: str
    device: str
    steps: int
    step_ms: float
    phases: list[dict] = field(default_factory=list)  # {update, phase, ms_per_step, calls_per_step, share}
    bare: list[dict] = field(default_factory=list)  # {pass, calls_per_step, ms_each, ms_per_step}
    bare_ms_per_step: float = 0.0
    overhead_ratio: float = 0.0
    peak_memory_mib: float = 0.0
    teacher_peak_memory_mib: float | None = None
    memory_ratio_to_teacher: float | None = None
    trained_params: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


def run_benchmark(cfg, *, warmup: int = 2, steps: int = 5, repeats: int = 3, teacher_memory: bool = True,
                  label: str = "") -> BenchmarkResult:
    from .trainer import Trainer

    if steps < 1 or warmup < 0 or repeats < 1:
        from .errors import StepdistillError

        raise StepdistillError("benchmark: --steps and --repeats must be >= 1 and --warmup >= 0")
    cfg.train.progress = False
    teacher = teacher_peak_memory(cfg) if teacher_memory else None  # first: its process must not see ours
    trainer = Trainer(cfg)
    dev = trainer.device
    if trainer.stages:
        trainer.objective.begin_stage(0, trainer.student_for_export())
    prof = StepProfiler(trainer)
    with prof:
        for _ in range(warmup):
            trainer._advance_stage() if trainer.stages else None
            trainer._train_step()
            trainer.state.step += 1
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
        # Rounds of `steps` timed steps, each followed by one bare replay of every pass recorded so far: steps and
        # replays alternate, so a change in the machine's load moves both sides of the ratio alike.
        total, bare_seconds, measured = 0.0, defaultdict(float), 0
        replayed: dict[tuple, int] = defaultdict(int)
        for _ in range(repeats):
            prof.clock.enabled = prof.recording = True
            for _ in range(steps):
                prof.clock.sync()
                t0 = time.perf_counter()
                trainer._train_step()
                prof.clock.sync()
                total += time.perf_counter() - t0
                trainer.state.step += 1
                measured += 1
            prof.clock.enabled = prof.recording = False
            peak = peak_memory_mib(dev)  # a process-lifetime peak (RSS) or since the reset (CUDA)
            for key, rec in list(prof.passes.items()):
                if rec.cut_short:
                    continue
                if not replayed[key]:
                    rec.run()  # its first run is a warm-up
                prof.clock.sync()
                t0 = time.perf_counter()
                rec.run()
                prof.clock.sync()
                bare_seconds[key] += time.perf_counter() - t0
                replayed[key] += 1
    steps = measured
    step_ms = total / steps * 1000

    phases, accounted = [], 0.0
    for name, sec in sorted(prof.clock.seconds.items(), key=lambda kv: -kv[1]):
        update, phase = name.split(" | ", 1)
        ms = sec / steps * 1000
        accounted += ms
        phases.append({"update": update.replace(" update", ""), "phase": phase, "ms_per_step": ms,
                       "calls_per_step": prof.clock.calls[name] / steps, "share": ms / step_ms})
    rest = step_ms - accounted
    phases.append({"update": "all", "phase": "framework (rest)", "ms_per_step": rest, "calls_per_step": None,
                   "share": rest / step_ms})

    bare, bare_total = [], 0.0
    for key, rec in prof.passes.items():
        ms_each = (rec.inloop_seconds / rec.count if rec.cut_short else bare_seconds[key] / replayed[key]) * 1000
        per_step = ms_each * rec.count / steps
        bare_total += per_step
        bare.append({"pass": rec.label, "calls_per_step": rec.count / steps, "ms_each": ms_each,
                     "ms_per_step": per_step})
    for params in trainer.params.values():  # the replayed backward passes left gradients behind
        for p in params:
            p.grad = None
    bare.sort(key=lambda r: -r["ms_per_step"])
    trained = {name: sum(p.numel() for p in ps) for name, ps in trainer.params.items()}
    tc = cfg.train
    result = BenchmarkResult(
        config=label, device=str(dev), steps=steps, step_ms=step_ms, phases=phases, bare=bare,
        bare_ms_per_step=bare_total, overhead_ratio=step_ms / bare_total if bare_total else float("nan"),
        peak_memory_mib=peak, trained_params=trained,
        teacher_peak_memory_mib=None if teacher is None else teacher["peak_mib"],
        memory_ratio_to_teacher=None if teacher is None else peak / teacher["peak_mib"],
        settings={"objective": cfg.objective.name, "student": cfg.student.type, "batch_size": tc.batch_size,
                  "resolution": cfg.data.resolution, "gradient_checkpointing": tc.gradient_checkpointing,
                  "cache_text_embeddings": cfg.data.cache_text_embeddings, "master_weights": tc.master_weights,
                  "threads": torch.get_num_threads(), "warmup": warmup, "rounds": repeats,
                  "steps_per_round": steps // repeats})
    trainer.close()
    return result


def markdown(result: BenchmarkResult) -> str:
    r = result
    mem = f"peak memory {r.peak_memory_mib:.0f} MiB"
    if r.teacher_peak_memory_mib:
        mem += f" (teacher alone {r.teacher_peak_memory_mib:.0f} MiB: {r.memory_ratio_to_teacher:.2f}x)"
    lines = [f"## benchmark: {r.config}", "",
             f"{r.settings}", "",
             f"**{r.step_ms:.1f} ms per step** on {r.device} over {r.steps} steps; bare network passes "
             f"{r.bare_ms_per_step:.1f} ms per step; **overhead ratio {r.overhead_ratio:.3f}**; {mem}.", "",
             "| update | phase | ms / step | calls / step | share |", "|---|---|---:|---:|---:|"]
    for p in r.phases:
        calls = "" if p["calls_per_step"] is None else f"{p['calls_per_step']:.1f}"
        lines.append(f"| {p['update']} | {p['phase']} | {p['ms_per_step']:.2f} | {calls} | {100 * p['share']:.1f}% |")
    lines += ["", "| bare pass (replayed alone) | calls / step | ms each | ms / step |", "|---|---:|---:|---:|"]
    for b in r.bare:
        lines.append(f"| {b['pass']} | {b['calls_per_step']:.1f} | {b['ms_each']:.2f} | {b['ms_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


def write_result(result: BenchmarkResult, out: Path) -> tuple[Path, Path]:
    from dataclasses import asdict

    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "benchmark.json", out / "benchmark.md"
    atomic_write_json(json_path, asdict(result))
    atomic_write_text(md_path, markdown(result))
    return json_path, md_path

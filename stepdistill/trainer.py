"""The training loop, on accelerate: devices, DDP, mixed precision, accumulation, EMA, checkpoints, logging.

Works the same under `stepdistill train CONFIG` and `accelerate launch -m stepdistill train CONFIG`.
Randomness inside a step comes from a generator seeded by (seed, step, network, micro-batch, rank), and the
data order from a seeded stream whose only state is a counter, so resuming from a checkpoint is exact.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from .checkpoints import list_checkpoints, resolve_resume
from .config import Config, save_config, to_dict
from .data import BatchStream, image_to_tensor, load_source
from .denoiser import Conditioning, enable_gradient_checkpointing
from .ema import EMA
from .errors import StepdistillError, TrainingInterrupted
from .models import build_student, check_resolution, load_teacher, load_trainable_state_dict, trainable_state_dict
from .objectives import Batch, DistillSetup, get_objective
from .utils import atomic_write_json, check_output_dir, image_grid, save_image_atomic

log = logging.getLogger(__name__)


class TrainState:
    """Step counter and data position, checkpointed with the rest."""

    def __init__(self):
        self.step = 0
        self.drawn = 0
        self.stage = 0  # index into Objective.stages()
        self.nonfinite: dict[str, int] = {}  # network -> consecutive updates skipped for a non-finite loss/gradient

    def state_dict(self):
        return {"step": self.step, "drawn": self.drawn, "stage": self.stage, "nonfinite": dict(self.nonfinite)}

    def load_state_dict(self, state):
        self.step, self.drawn = int(state["step"]), int(state["drawn"])
        self.stage = int(state.get("stage", 0))
        self.nonfinite = {str(k): int(v) for k, v in state.get("nonfinite", {}).items()}


class _StateAdapter:
    """Lets accelerate checkpoint an object through state_dict / load_state_dict."""

    def __init__(self, obj):
        self.obj = obj

    def state_dict(self):
        return self.obj.state_dict()

    def load_state_dict(self, state):
        self.obj.load_state_dict(state)


class Trainer:
    def __init__(self, cfg: Config):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = cfg
        tc = cfg.train
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU") == "1"
        mixed = "no" if cpu else tc.mixed_precision
        if cpu and tc.mixed_precision != "no":
            log.warning("train.mixed_precision=%s ignored on CPU (bf16/fp16 are far slower there); using fp32",
                        tc.mixed_precision)
        self.run_dir = Path(tc.output_dir)
        _check_distribution()
        _check_run_folder(self.run_dir, cfg)  # before any rank writes there
        check_output_dir(self.run_dir, "train.output_dir")  # a file or a read-only folder: before the teacher loads
        self.accelerator = Accelerator(
            mixed_precision=mixed, cpu=cpu, project_dir=str(self.run_dir),
            log_with=list(tc.trackers) or None)
        acc = self.accelerator
        _check_distribution(acc.distributed_type.value)
        self.device = acc.device
        torch.manual_seed(tc.seed)

        if not tc.progress:  # every bar, the libraries' loading bars too
            import diffusers
            import transformers

            diffusers.utils.logging.disable_progress_bar()
            transformers.utils.logging.disable_progress_bar()
        self.teacher = load_teacher(cfg.model, self.device).at_resolution(cfg.data.resolution)
        check_resolution(cfg.data.resolution, self.teacher, self.teacher.net)
        self.student = build_student(self.teacher, cfg.student)
        if self.student is not self.teacher.net:  # a small student may downsample more
            check_resolution(cfg.data.resolution, self.teacher, self.student)
        objective_cls = get_objective(cfg.objective.name)
        options = objective_cls.parse_options(cfg.objective.options)
        self.setup = DistillSetup(self.teacher, self.student, cfg.student.type, tc.lr, cfg.data.resolution, self.device,
                                  tc.max_steps)
        self.objective = objective_cls(self.setup, options)
        self.stages = self.objective.stages()
        if self.stages and sum(s.steps for s in self.stages) != tc.max_steps:
            raise StepdistillError(f"objective '{cfg.objective.name}' has stages of {[s.steps for s in self.stages]} "
                                   f"steps (sum {sum(s.steps for s in self.stages)}); set train.max_steps to that sum")
        self.data = load_source(cfg.data, self.objective.needs_images)  # may depend on options

        self.networks = self.objective.networks()
        self._memory_options()
        from diffusers.optimization import get_scheduler

        modules, optimizers, schedulers, self.params = [], [], [], {}
        for name, net in self.networks.items():
            params = net.params if net.params is not None else [p for p in net.module.parameters() if p.requires_grad]
            if not params:
                raise StepdistillError(f"objective '{cfg.objective.name}' network '{name}' has nothing to train")
            self.params[name] = params
            betas = net.betas if net.betas is not None else (tc.adam_beta1, tc.adam_beta2)
            decay = net.weight_decay if net.weight_decay is not None else tc.weight_decay
            # fused: one kernel over all of a network's tensors; the per-tensor loop cost 3% of a LoRA step on
            # CPU (`stepdistill benchmark`).
            fused = self.device.type in ("cpu", "cuda")
            opt = torch.optim.AdamW(params, lr=net.lr, betas=betas, weight_decay=decay, fused=fused or None)
            updates = math.ceil(tc.max_steps / net.update_every)
            sched = get_scheduler(tc.lr_scheduler, opt, num_warmup_steps=tc.warmup_steps, num_training_steps=updates)
            if not any(m is net.module for m in modules):  # a shared module is prepared (DDP-wrapped) once
                modules.append(net.module)
            optimizers.append(opt)
            schedulers.append(sched)
        # Networks sharing one module leave the other's parameters unused in a step: DDP must look for them.
        acc.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=len(modules) < len(self.networks))
        prepared = acc.prepare(*modules, *optimizers, *schedulers)
        n, k = len(modules), len(self.networks)
        wrapped_of = {id(m): w for m, w in zip(modules, prepared[:n])}
        self.wrapped = {name: wrapped_of[id(net.module)] for name, net in self.networks.items()}
        self.optimizers = dict(zip(self.networks, prepared[n:n + k]))
        self.schedulers = dict(zip(self.networks, prepared[n + k:]))
        self.objective.use_wrapped(self.wrapped)
        self._trained_names = [{n for n, p in m.named_parameters() if p.requires_grad} for m in modules]

        self.state = TrainState()
        self.ema = EMA(self.student, tc.ema_decay) if tc.ema_decay > 0 else None
        acc.register_for_checkpointing(self.state, _StateAdapter(self.objective))
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)
        acc.register_save_state_pre_hook(self._save_hook)
        acc.register_load_state_pre_hook(self._load_hook)
        self.stream = BatchStream(len(self.data), tc.batch_size, tc.seed, acc.process_index, acc.num_processes)
        self._uncond = None
        self._text_cache: dict = {}

    def _memory_options(self) -> None:
        """train.gradient_checkpointing and train.master_weights, on every trained backbone (heads stay fp32)."""
        tc = self.cfg.train
        backbones = {id(n.module): n.module for n in self.networks.values() if _is_backbone(n.module)}
        if tc.gradient_checkpointing:
            for module in backbones.values():
                if getattr(module, "_supports_gradient_checkpointing", False):
                    enable_gradient_checkpointing(module)
        if tc.master_weights == "bf16":
            for name, net in self.networks.items():
                if _is_backbone(net.module):
                    for p in (net.params if net.params is not None else net.module.parameters()):
                        if p.requires_grad:
                            p.data = p.data.to(torch.bfloat16)

    # --- checkpoint hooks: only trained weights are written (a LoRA checkpoint holds just the adapter) -------
    def _save_hook(self, models, weights, output_dir):
        for i, model in enumerate(models):
            # keys without the DDP "module." prefix, so a checkpoint resumes under any process count
            weights[i] = {_strip_ddp(k): v.contiguous() for k, v in weights[i].items()
                          if _strip_ddp(k) in self._trained_names[i]}

    def _load_hook(self, models, input_dir):
        from safetensors.torch import load_file

        originals = list(models)
        models.clear()  # accelerate loads nothing itself; we load the trained subset, strictly
        for i, model in enumerate(originals):
            path = Path(input_dir) / (f"model_{i}.safetensors" if i else "model.safetensors")
            try:
                state = load_file(str(path), device=str(self.device))
            except Exception as err:
                raise StepdistillError(f"checkpoint '{input_dir}' is corrupt or incomplete ({path.name}: {err})") from None
            load_trainable_state_dict(self.accelerator.unwrap_model(model), state, f"checkpoint '{input_dir}'")

    # --- batches ---------------------------------------------------------------------------------------------
    def _batch(self, gen: torch.Generator) -> Batch:
        idx = self.stream.next_indices()
        items = [self.data[i] for i in idx]
        prompts = [it["caption"] for it in items]
        enc = self.teacher.prompt_encoder
        cond = self._encode_cached(prompts) if self.cfg.data.cache_text_embeddings else enc(prompts, self.cfg.data.resolution)
        if self._uncond is None:
            self._uncond = enc([""], self.cfg.data.resolution)
        uncond = self._uncond.map(lambda t: t.expand(len(prompts), *t.shape[1:]))
        latents = None
        if items[0]["image"] is not None and self.objective.needs_images:
            pixels = torch.stack([image_to_tensor(it["image"], self.cfg.data.resolution, self.cfg.data.center_crop)
                                  for it in items])
            if self.cfg.data.random_flip:
                flip = torch.rand(len(items), generator=gen, device=gen.device) < 0.5
                pixels = torch.where(flip.cpu()[:, None, None, None], pixels.flip(-1), pixels)
            vae = self.teacher.vae
            with torch.no_grad():
                dist = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
                latents = self.teacher.to_latents(dist.sample(generator=gen).float())
        return Batch(prompts, cond, uncond, latents)

    def _encode_cached(self, prompts: list[str]):
        """data.cache_text_embeddings: each distinct caption is encoded once, alone (so its embedding never depends
        on which captions shared its first batch, and a resumed run gets the same numbers), then reused."""
        cache = self._text_cache
        for prompt in dict.fromkeys(p for p in prompts if p not in cache):
            cache[prompt] = self.teacher.prompt_encoder([prompt], self.cfg.data.resolution)
        return Conditioning.concat([cache[p] for p in prompts])

    def _generator(self, step: int, network_index: int, micro: int) -> torch.Generator:
        seed = (((self.cfg.train.seed * 1_000_003 + step) * 31 + network_index) * 131 + micro) * 4099 + self.accelerator.process_index
        return torch.Generator(device=self.device).manual_seed(seed % (2**63))

    # --- the loop --------------------------------------------------------------------------------------------
    def train(self) -> Path:
        """Train to train.max_steps, then sample, write RUN/final and export.

        SIGINT and SIGTERM stop the run at the next step boundary with a checkpoint there, and raise
        TrainingInterrupted (the CLI exits 130 / 143); a second signal acts at once."""
        with self._catch_signals():
            return self._train()

    def _train(self) -> Path:
        acc, tc = self.accelerator, self.cfg.train
        resume = resolve_resume(self.run_dir, tc.resume, self._checkpoint_files(), acc.print, acc.is_main_process)
        if resume is not None:
            self._load_checkpoint(resume)
            acc.print(f"resumed from {resume} at step {self.state.step}")
        elif tc.resume == "latest":
            acc.print("train.resume=latest: no checkpoint yet, starting from scratch")
        self._prepare_run_dir()  # only now: a resume that fails leaves RUN/config.yaml as it was
        if resume is None and self.stages:
            self.objective.begin_stage(0, self.student_for_export())
        self.stream.drawn = self.state.drawn
        if tc.trackers:
            acc.init_trackers(self.cfg.name, config=_flat(to_dict(self.cfg)))
        progress = None
        if tc.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=tc.max_steps, initial=self.state.step, desc="train", dynamic_ncols=True)
        t0, steps_done = time.time(), 0
        # Each logged value is the mean since the last log over the steps that produced it: with two time-scale
        # updates a network does not update every step, and a single step's loss is noisy.
        pending: dict[str, list[float]] = {}
        while self.state.step < tc.max_steps:
            self._advance_stage()
            logs = self._train_step()
            for key, v in logs.items():
                pending.setdefault(key, []).append(v)
            self.state.step += 1
            self.state.drawn = self.stream.drawn
            steps_done += 1
            step = self.state.step
            if progress is not None:
                progress.update(1)
                progress.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.endswith("loss")})
            if step % tc.log_every == 0 or step == tc.max_steps:
                logs = _reduce_logs(pending)
                pending.clear()
                logs.update(step=step, it_per_s=steps_done / (time.time() - t0),
                            lr={n: s.get_last_lr()[0] for n, s in self.schedulers.items()})
                self._log(logs)
            saved = step % tc.checkpoint_every == 0 or step == tc.max_steps
            if saved:
                self.save_checkpoint()
            if tc.sample_every and step % tc.sample_every == 0 and step != tc.max_steps:
                self.sample_grid(step)
            if self._agreed_signal():
                self._interrupt(progress, saved, pending)
        if progress is not None:
            progress.close()
        self.sample_grid(self.state.step)
        if self._agreed_signal():  # the checkpoint at max_steps is on disk; a resume only samples and exports
            self._interrupt(None, True, {})
        self.finish()  # a signal from here on is honoured by finishing: the run is complete a moment later
        self.close()
        return self.run_dir

    # --- signals and resume -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _catch_signals(self):
        """While training, SIGINT and SIGTERM only set a flag, read at the next step boundary; a second signal gets
        the previous behaviour at once (checkpoints and exports are written atomically, so even then nothing that
        looks complete is half-written). Handlers can only be set in the main thread: elsewhere signals keep theirs."""
        self._signal = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}
        main = self.accelerator.is_main_process

        def handler(signum, frame):
            if self._signal:
                signal.signal(signum, previous[signum] if previous[signum] is not None else signal.SIG_DFL)
                signal.raise_signal(signum)
                return
            self._signal = signum
            if main:  # os.write: print is not safe inside a signal handler
                os.write(2, f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                            "(again to stop at once)\n".encode())

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old if old is not None else signal.SIG_DFL)

    def _agreed_signal(self) -> int:
        """The signal that stops the run at this step boundary (0: none), the same on every rank."""
        signum = getattr(self, "_signal", 0)
        if self.accelerator.num_processes == 1:
            return signum
        return int(self.accelerator.gather(torch.tensor([signum], device=self.device)).max())

    def _interrupt(self, progress, saved: bool, pending: dict) -> None:
        """Stop at this step boundary: checkpoint (unless this step wrote one), log, close, raise."""
        acc, step = self.accelerator, self.state.step
        signum = self._agreed_signal()
        ckpt = self.run_dir / "checkpoints" / f"checkpoint-{step}" if saved else self.save_checkpoint()
        if pending:
            self._log({**_reduce_logs(pending), "step": step})
        if progress is not None:
            progress.close()
        err = TrainingInterrupted(signum, step, ckpt)
        if acc.is_main_process:
            print(str(err), file=sys.stderr, flush=True)
        self.close()
        raise err

    def _checkpoint_files(self) -> list[str]:
        """The files accelerate's save_state writes into a checkpoint of this trainer (what resume checks)."""
        from accelerate.utils import OPTIMIZER_NAME, RNG_STATE_NAME, SAFE_MODEL_NAME, SCALER_NAME, SCHEDULER_NAME

        def numbered(stem: str, n: int, ext: str) -> list[str]:
            return [f"{stem}{f'_{i}' if i else ''}.{ext}" for i in range(n)]

        k = len(self.optimizers)
        files = (numbered(SAFE_MODEL_NAME, len(self._trained_names), "safetensors") + numbered(OPTIMIZER_NAME, k, "bin")
                 + numbered(SCHEDULER_NAME, k, "bin") + [f"{RNG_STATE_NAME}_0.pkl"]
                 + [f"custom_checkpoint_{i}.pkl" for i in range(len(self.accelerator._custom_objects))])
        return files + ([SCALER_NAME] if self.accelerator.scaler is not None else [])

    def _load_checkpoint(self, path: Path) -> None:
        """accelerate's load_state, after resolve_resume has checked every file; a failure that check cannot see
        (a corrupt tensor inside an intact archive) stops in one line instead of training on half-loaded state."""
        try:
            self.accelerator.load_state(str(path))
        except StepdistillError:
            raise
        except Exception as err:  # noqa: BLE001
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise StepdistillError(f"checkpoint '{path}' is corrupt or incomplete ({reason}); resume from an "
                                   "earlier one with train.resume=RUN/checkpoints/checkpoint-N") from None

    # --- stages ---------------------------------------------------------------------------------------------
    def _advance_stage(self) -> None:
        """At a stage boundary: export the finished stage's student, start the next stage, reset the optimizers.

        Runs at the top of a step, after the previous step's checkpoint, so a run resumed from the checkpoint
        at a boundary crosses it exactly as an uninterrupted run does."""
        while self.state.stage + 1 < len(self.stages) and \
                self.state.step >= sum(s.steps for s in self.stages[:self.state.stage + 1]):
            finished = self.stages[self.state.stage]
            if finished.export:
                self.export_stage(finished)
            self.state.stage += 1
            self.objective.begin_stage(self.state.stage, self.student_for_export())
            if self.stages[self.state.stage].reset_optimizers:
                for opt in self.optimizers.values():
                    getattr(opt, "optimizer", opt).state.clear()  # Adam moments and step counts
            if self.accelerator.is_main_process:
                atomic_write_json(self.run_dir / "sampling_spec.json", self.objective.sampling_spec().to_json())
                self.accelerator.print(f"step {self.state.step}: stage {self.stages[self.state.stage].name}")
            self.accelerator.wait_for_everyone()

    def export_stage(self, stage) -> Path | None:
        """The current student, exported to RUN/stages/<stage name> with this stage's sampling spec (main process
        only; callers synchronise)."""
        acc = self.accelerator
        out = None
        fmt = self._export_format()
        if acc.is_main_process and fmt != "none":
            from .export import export_student

            out = export_student(self.teacher, self.student_for_export(), self.objective.sampling_spec(), fmt,
                                 self.run_dir / "stages" / stage.name, student_type=self.cfg.student.type,
                                 name=f"{self.cfg.name} ({stage.name})")
            acc.print(f"stage {stage.name} export ({fmt}): {out}")
        return out

    def _export_format(self) -> str:
        from .export import default_format

        fmt = self.cfg.train.export
        return default_format(self.cfg.student.type, self.teacher.pipeline_class) if fmt == "auto" else fmt

    def close(self) -> None:
        """Stop the trackers and destroy the process group while the interpreter is still whole.

        Left to interpreter exit, the DDP wrappers keep the process group alive and a gloo worker thread can
        reach for the GIL mid-finalization, aborting a finished run ("terminate called without an active
        exception": 3 of 14 two-process CPU runs under load, 0 of 24 after; `tools/ddp_exit_stress.sh`). So every
        rank waits for the others, the wrappers are dropped and collected, and only then is the group destroyed.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        self.objective.use_wrapped({name: net.module for name, net in self.networks.items()})
        self.wrapped = {}
        acc.free_memory()  # accelerate's own references to the wrappers, then a garbage collection
        acc.end_training()

    def _train_step(self) -> dict:
        acc, tc = self.accelerator, self.cfg.train
        step = self.state.step
        logs = {}
        for k, (name, net) in enumerate(self.networks.items()):
            if step % net.update_every:
                continue
            wrapped, opt = self.wrapped[name], self.optimizers[name]
            for params in self.params.values():  # no stale gradients from another network's loss
                for p in params:
                    p.grad = None
            totals: dict[str, float] = {}
            for micro in range(tc.grad_accum):
                batch = self._batch(self._generator(step, k, micro))
                gen = self._generator(step, k, micro + 1000)
                sync = micro == tc.grad_accum - 1
                with (acc.no_sync(wrapped) if not sync else contextlib.nullcontext()), acc.autocast():
                    losses = self.objective.losses(name, batch, gen)
                    acc.backward(losses["loss"] / tc.grad_accum)
                for key, v in losses.items():
                    totals[key] = totals.get(key, 0.0) + float(v.detach()) / tc.grad_accum
            # The backward pass above always runs, even on a non-finite loss: under DDP it is a collective, and a
            # rank that skipped it would hang the others. The decision below is the same on every rank.
            bad_loss = self._any_rank(not math.isfinite(totals.get("loss", 0.0)))
            if bad_loss and acc.scaler is not None:  # fp16: poisoned gradients make the GradScaler skip the step
                for p in self.params[name]:
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))
            norm = None
            if tc.max_grad_norm > 0:
                norm = acc.clip_grad_norm_(self.params[name], tc.max_grad_norm)
                totals["grad_norm"] = float(norm)
            if acc.scaler is not None:  # it skips (and lowers its scale) on non-finite gradients itself
                opt.step()
                self.schedulers[name].step()
                skipped = bool(opt.step_was_skipped)
            else:
                skipped = bad_loss or not self._grads_finite(name, norm)  # the gradients agree across ranks
                if not skipped:
                    opt.step()
                    self.schedulers[name].step()
            opt.zero_grad(set_to_none=True)
            if not skipped:
                self.objective.after_update(name)
                if name == "student" and self.ema is not None:
                    self.ema.update(self.student)
            self._count_nonfinite(name, skipped, counts=bad_loss or acc.scaler is None, loss=totals.get("loss"))
            if skipped:  # a skipped update's losses (nan, inf) would poison the logged means
                totals = {"nonfinite_skips": 1.0}
            totals["nonfinite_skips"] = float(skipped)
            for key, v in totals.items():
                logs[key if name == "student" else f"{name}/{key}"] = v
        return logs

    # --- non-finite losses and gradients --------------------------------------------------------------------
    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any."""
        if self.accelerator.num_processes == 1:
            return flag
        return bool(self.accelerator.gather(torch.tensor([float(flag)], device=self.device)).max() > 0)

    def _grads_finite(self, name: str, norm) -> bool:
        if norm is None:  # no clipping: the norm is computed here only for the check
            grads = [p.grad for p in self.params[name] if p.grad is not None]
            if not grads:
                return True
            norm = torch.nn.utils.get_total_norm(grads)
        return math.isfinite(float(norm))

    def _count_nonfinite(self, name: str, skipped: bool, counts: bool, loss) -> None:
        """A skipped update of `name` extends its run of consecutive skips; train.max_nonfinite_skips of them stop
        the run. Skips are never written into the weights, so the checkpoints on disk stay good. Under fp16 the
        GradScaler's own overflow skips (finite loss) are logged but not counted: they are how it finds its scale."""
        streak = self.state.nonfinite
        if not skipped:
            streak.pop(name, None)
            return
        if not counts:
            return
        streak[name] = streak.get(name, 0) + 1
        limit, step = self.cfg.train.max_nonfinite_skips, self.state.step + 1  # 1-based, as logged
        log.warning("step %d: non-finite %s loss or gradient (loss %s); update skipped (%d in a row, stop at %d)",
                    step, name, loss, streak[name], limit)
        if streak[name] >= limit:
            ckpts = list_checkpoints(self.run_dir)
            kept = f"the last checkpoint, '{ckpts[-1]}', holds the last good weights" if ckpts else "no checkpoint yet"
            self.close()
            raise StepdistillError(f"network '{name}': {limit} consecutive non-finite losses or gradients (last at "
                                   f"step {step}, train.max_nonfinite_skips={limit}); stopped, {kept}; lower "
                                   "train.lr or check the data")

    def _log(self, logs: dict) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(logs) + "\n")
        if self.cfg.train.trackers:
            acc.log({k: v for k, v in logs.items() if isinstance(v, (int, float))}, step=logs["step"])

    def _prepare_run_dir(self) -> None:
        acc = self.accelerator
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
            atomic_write_json(self.run_dir / "run.json", {"name": self.cfg.name, "teacher": self.cfg.model.teacher,
                                                          "objective": self.cfg.objective.name,
                                                          "student": self.cfg.student.type,
                                                          "processes": acc.num_processes})
            if getattr(self.student, "init_report", None) is not None:  # a small student: what came from the teacher
                atomic_write_json(self.run_dir / "student_init.json", self.student.init_report)
            atomic_write_json(self.run_dir / "sampling_spec.json", self.objective.sampling_spec().to_json())
        acc.wait_for_everyone()

    def save_checkpoint(self) -> Path:
        """Written to a temporary folder and renamed, so a crash never leaves a complete-looking checkpoint."""
        acc, tc = self.accelerator, self.cfg.train
        root = self.run_dir / "checkpoints"
        final = root / f"checkpoint-{self.state.step}"
        tmp = root / f".checkpoint-{self.state.step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(tmp / "trainer_state.json", self.state.state_dict())
            _remove_checkpoint(final)
            os.replace(tmp, final)
            for old in list_checkpoints(self.run_dir)[:-tc.keep_checkpoints]:
                _remove_checkpoint(old)
            for stale in root.glob(".checkpoint-*.deleting"):  # left by a kill mid-removal
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def student_for_export(self):
        """The weights to export: the EMA shadow when train.ema_decay > 0, else the live student."""
        return self.ema.shadow if self.ema is not None else self.student

    def sample_grid(self, step: int) -> Path | None:
        if not self.accelerator.is_main_process:
            return None
        from .sampling import generate, make_scheduler
        from .export import pipeline_with_net

        spec = self.objective.sampling_spec()
        prompts = self.cfg.train.sample_prompts or _default_prompts(self.data)
        net = self.student_for_export()
        was_training = net.training
        net.eval()
        pipe = pipeline_with_net(self.teacher, net, make_scheduler(spec))
        pipe.set_progress_bar_config(disable=not self.cfg.train.progress)
        # Under mixed precision accelerate has patched the network's forward to return fp32, so the latents reach
        # the half-precision VAE as fp32 (seen on an H200: "Input type (float) and bias type (c10::Half)");
        # sampling under the same autocast as training matches them. A no-op without mixed precision.
        with self.accelerator.autocast():
            images = generate(pipe, spec, prompts, list(range(len(prompts))), height=self.cfg.data.resolution,
                              width=self.cfg.data.resolution)
        net.train(was_training)
        path = self.run_dir / "samples" / f"step_{step:06d}_{spec.num_inference_steps}steps.png"
        save_image_atomic(image_grid(images), path)
        return path

    def replica_checksums(self) -> list[float]:
        """One number per process summarising its trained weights: equal numbers = replicas in sync."""
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        for i, p in enumerate(trainable_state_dict(self.student).values()):
            total += (p.double() * (1 + (torch.arange(p.numel(), device=p.device) % 97).reshape(p.shape))).sum() * (i + 1)
        return [float(v) for v in self.accelerator.gather(total).cpu()]

    def finish(self) -> None:
        """Final trained weights in run_dir/final, then the export the config asks for."""
        acc = self.accelerator
        acc.wait_for_everyone()
        checksums = self.replica_checksums()
        if not acc.is_main_process:
            return
        if len(set(checksums)) > 1:
            log.warning("replicas diverged: trained-weight checksums %s", checksums)
        from safetensors.torch import save_file

        from .export import export_student
        from .utils import atomic_directory

        net = self.student_for_export()
        trained = trainable_state_dict(self.student)  # names of the trained weights; values from `net`
        values = dict(net.named_parameters())
        with atomic_directory(self.run_dir / "final") as tmp:
            save_file({k: values[k].detach().contiguous().cpu() for k in trained}, str(tmp / "student.safetensors"))
            atomic_write_json(tmp / "trainer_state.json", {**self.state.state_dict(), "replica_checksums": checksums})
        fmt = self._export_format()
        if fmt != "none":
            out = export_student(self.teacher, net, self.objective.sampling_spec(), fmt, self.run_dir / "export",
                                 student_type=self.cfg.student.type, name=self.cfg.name)
            acc.print(f"export ({fmt}): {out}")
        if self.stages and self.stages[-1].export:
            self.export_stage(self.stages[-1])


def _remove_checkpoint(path: Path) -> None:
    """Renamed away first, then deleted: a kill mid-deletion never leaves a complete-looking half checkpoint."""
    if path.exists():
        doomed = path.with_name(f".{path.name}.deleting")
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _reduce_logs(pending: dict[str, list[float]]) -> dict[str, float]:
    """Means since the last log; skip counts are summed."""
    return {key: sum(vs) if key.endswith("nonfinite_skips") else sum(vs) / len(vs) for key, vs in pending.items()}


def _check_distribution(kind: str | None = None) -> None:
    """FSDP and DeepSpeed, asked for by an accelerate config (its env vars, read before the Accelerator is made) or
    set up by accelerate (`kind`), are refused in one line: on CPU accelerate would silently run the processes as
    plain DDP, and on GPUs the trainer's checkpoint hooks (trained subset, strict load), export and sample grid are
    verified under DDP only (configs/accelerate/ holds drafts for the FSDP and DeepSpeed work)."""
    asked = [name for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
             if os.environ.get(env, "false").lower() == "true"]
    if kind in ("FSDP", "DEEPSPEED"):
        asked.append(kind)
    if asked:
        raise StepdistillError(f"{asked[0]} is not supported yet (verified under DDP only); launch with "
                               "configs/accelerate/ddp.yaml (multi-GPU DDP), or on CPU with ACCELERATE_USE_CPU=1 "
                               "accelerate launch --multi_gpu")


def _is_backbone(module) -> bool:
    """A diffusion backbone (UNet or transformer with a diffusers config), as opposed to a head."""
    return hasattr(getattr(module, "config", None), "in_channels") or hasattr(module, "enable_gradient_checkpointing")


def _strip_ddp(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


# What makes a checkpoint another model or objective: a resume whose config changes one of them is refused.
RESUME_FIXED_KEYS = ("model", "student", "objective", "data.resolution")


def _check_run_folder(run_dir: Path, cfg: Config) -> None:
    """A run folder belongs to one run: training into another run's folder is refused unless it resumes it, and a
    resume that changes the model, student or objective is refused before anything there is rewritten."""
    if not ((run_dir / "run.json").is_file() or list_checkpoints(run_dir)):
        return
    if cfg.train.resume is None:
        raise StepdistillError(f"train.output_dir '{run_dir}' holds another run; choose another train.output_dir, "
                               "or resume it with train.resume=latest")
    import yaml

    try:
        old = _flat(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError):
        return  # no readable config to compare (e.g. a folder holding only a copied checkpoint)
    new = _flat(to_dict(cfg))
    for key in sorted(set(old) | set(new)):
        if key.startswith(tuple(f"{k}." for k in RESUME_FIXED_KEYS)) or key in RESUME_FIXED_KEYS:
            if old.get(key) != new.get(key):
                raise StepdistillError(f"train.resume: '{key}' differs from the run in '{run_dir}' "
                                       f"({old.get(key)!r} there, {new.get(key)!r} now); a checkpoint resumes only "
                                       "with the same model, student and objective (choose another train.output_dir)")


def _default_prompts(data, n: int = 16) -> list[str]:
    """n distinct captions drawn at random (fixed seed) from the whole dataset: every k-th caption of a sorted
    prompt file would show one corner of it."""
    import random

    picked: list[str] = []
    for i in random.Random(0).sample(range(len(data)), min(len(data), 4 * n)):
        caption = data[i]["caption"]
        if caption not in picked:
            picked.append(caption)
        if len(picked) == n:
            break
    return picked


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def train(cfg: Config) -> Path:
    return Trainer(cfg).train()

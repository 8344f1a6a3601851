"""The student sampling spec, and loading + generating through the real diffusers pipeline.

Every export carries a `stepdistill.json` spec: which scheduler (class and config), how many steps and which
timesteps, what guidance scale. `load_pipeline` applies it, so a user's pipeline, `stepdistill sample` and
`stepdistill evaluate` all sample the student the way it was trained.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import json
import os
from dataclasses import dataclass, field

import torch

from .errors import StepdistillError
from .backbones import backbone_for_pipeline
from .models import absent_components, read_pipeline_class, samples_flow
from .utils import bundled_path, load_error_line

SPEC_FILE = "stepdistill.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
SCHEDULER_ALIASES = {"ddim": "DDIMScheduler", "lcm": "LCMScheduler", "euler": "EulerDiscreteScheduler",
                     "ddpm": "DDPMScheduler", "dpm": "DPMSolverMultistepScheduler",
                     "dpmsolver": "DPMSolverMultistepScheduler", "pndm": "PNDMScheduler", "tcd": "TCDScheduler",
                     "euler_a": "EulerAncestralDiscreteScheduler"}


@dataclass
class SamplingSpec:
    format: str  # "lora" | "full" | "pipeline"
    scheduler_class: str
    scheduler_config: dict
    num_inference_steps: int
    timesteps: dict[int, list[int]] | None = None  # explicit timesteps per step count, where the student needs them
    sigmas: dict[int, list[float]] | None = None  # flow students: explicit sigmas per step count (set_timesteps(sigmas=))
    guidance_scale: float = 1.0  # pipeline guidance_scale (1 = no CFG)
    lora_scale: float = 1.0
    base_model: str | None = None  # LoRA exports: the base pipeline
    resolution: int | None = None
    objective: str | None = None
    extra: dict = field(default_factory=dict)
    # The student takes the guidance scale as an input (UNet `time_cond_proj_dim`): one network evaluation per
    # step whatever the guidance, where classifier-free guidance would need two.
    embedded_guidance: bool = False

    def nfe(self, steps: int, guidance_scale: float | None = None) -> int:
        """Network evaluations per image: classifier-free guidance doubles them (not for embedded guidance)."""
        g = self.guidance_scale if guidance_scale is None else guidance_scale
        return steps * (2 if g > 1.0 and not self.embedded_guidance else 1)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        if self.timesteps is not None:
            d["timesteps"] = {str(k): [int(t) for t in v] for k, v in self.timesteps.items()}
        if self.sigmas is not None:
            d["sigmas"] = {str(k): [float(s) for s in v] for k, v in self.sigmas.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "SamplingSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if d.get("timesteps") is not None:
            d["timesteps"] = {int(k): [int(t) for t in v] for k, v in d["timesteps"].items()}
        if d.get("sigmas") is not None:
            d["sigmas"] = {int(k): [float(s) for s in v] for k, v in d["sigmas"].items()}
        return cls(**d)

    def explicit_schedule(self, steps: int) -> dict:
        """The pipeline kwargs that fix the student's own steps for `steps` steps ({"sigmas": ...} for a flow
        student, {"timesteps": ...} for a VP one), or {} where the scheduler's own grid is used."""
        if (self.sigmas or {}).get(steps) is not None:
            return {"sigmas": list(self.sigmas[steps])}
        if (self.timesteps or {}).get(steps) is not None:
            return {"timesteps": list(self.timesteps[steps])}
        return {}

    @classmethod
    def read(cls, folder: str) -> "SamplingSpec":
        path = os.path.join(folder, SPEC_FILE)
        try:
            with open(path) as f:
                return cls.from_json(json.load(f))
        except (json.JSONDecodeError, TypeError) as err:
            raise StepdistillError(f"'{path}' is corrupt ({err}); re-export the student") from None


# the VP samplers a student spec may name, and whether their flow counterpart re-noises between steps
FLOW_EQUIVALENT = {"LCMScheduler": True, "EulerDiscreteScheduler": False, "DDIMScheduler": False}


def for_schedule(spec: SamplingSpec, schedule, teacher_scheduler_config: dict) -> SamplingSpec:
    """The spec a student of this teacher is sampled with. Objectives describe their sampler on the VP grid
    (LCM's re-noising, or deterministic DDIM / Euler steps, at explicit schedule times); on a flow teacher the
    same sampler is FlowMatchEulerDiscreteScheduler through the same points: `stochastic_sampling=True` re-noises
    each x0 prediction to the next sigma as LCMScheduler does, without it each step is the flow ODE's Euler step
    (which is DDIM's), and its sigmas are the trained ones (the shift switched off in the exported config, so
    they are used as given)."""
    from .schedule import FlowSchedule

    if not isinstance(schedule, FlowSchedule):
        return spec
    if spec.scheduler_class not in FLOW_EQUIVALENT or not spec.timesteps:
        raise StepdistillError(f"no flow-matching sampler for a student spec of {spec.scheduler_class} without "
                               "explicit timesteps")
    stochastic = FLOW_EQUIVALENT[spec.scheduler_class]
    sigmas = {n: schedule.sampling_sigmas(ts) for n, ts in spec.timesteps.items()}
    extra = {**spec.extra, "trained_timesteps": spec.timesteps[spec.num_inference_steps]}
    return dataclasses.replace(spec, scheduler_class="FlowMatchEulerDiscreteScheduler",
                               scheduler_config=FlowSchedule.sampling_config(teacher_scheduler_config, stochastic),
                               timesteps=None, sigmas=sigmas, extra=extra)


def scheduler_class(name: str):
    import diffusers

    name = SCHEDULER_ALIASES.get(name.lower(), name)
    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise StepdistillError(f"unknown scheduler '{name}'; use a diffusers scheduler class name or one of "
                               f"{', '.join(SCHEDULER_ALIASES)}")
    return cls


def make_scheduler(spec: SamplingSpec):
    return scheduler_class(spec.scheduler_class).from_config(spec.scheduler_config)


def scheduler_timesteps(name: str, config: dict, steps: int) -> list[int]:
    """The timesteps a diffusers scheduler picks for `steps` steps."""
    sched = scheduler_class(name).from_config(config)
    set_timesteps_checked(sched, steps)
    return [int(t) for t in sched.timesteps]


def lcm_config_for(config: dict, timesteps: list[int]) -> dict | None:
    """An LCMScheduler config whose own `set_timesteps(len(timesteps))` gives exactly `timesteps`, or None.

    LCMScheduler's grid for n steps is its `original_inference_steps` (O) grid, t = j * (T // O) - 1, sampled at
    n evenly spaced indices from the top; a student trained at other timesteps (a one-step student at 699) is
    sampled at 999 by a plain `num_inference_steps=1` unless O puts its timesteps on that grid (O = 700 for 699).
    With such a config a user's pipeline call needs no `timesteps=` (nor gets diffusers' warning about them)."""
    T = int(config.get("num_train_timesteps", 1000))
    top, n = int(timesteps[0]) + 1, len(timesteps)
    for k in range(1, T + 1):  # the grid's top is O * k - 1 with k = T // O
        if top % k or T // (top // k) != k:
            continue
        candidate = {**config, "original_inference_steps": top // k}
        try:
            if scheduler_timesteps("LCMScheduler", candidate, n) == [int(t) for t in timesteps]:
                return candidate
        except StepdistillError:
            continue
    return None


def set_timesteps_checked(sched, steps: int) -> None:
    """`sched.set_timesteps(steps)`, with the scheduler's refusal as one line."""
    try:
        sched.set_timesteps(steps)
    except ValueError as err:  # e.g. LCMScheduler asked for more steps than its original_inference_steps grid
        why = str(err).strip().splitlines()[0][:300].rstrip(".")
        raise StepdistillError(f"{type(sched).__name__} cannot sample in {steps} steps with this config: {why}; "
                               "choose another step count") from None


def _pipeline_class(folder: str):
    import diffusers

    return getattr(diffusers, read_pipeline_class(folder))


def _from_pretrained(model: str, dtype):
    cls = _pipeline_class(model)
    kwargs = {"torch_dtype": dtype, **absent_components(model)}
    if "safety_checker" in inspect.signature(cls.__init__).parameters:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        return cls.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as err:
        raise StepdistillError(f"could not load pipeline '{model}': {load_error_line(err)}; re-download or re-save "
                               "it") from None


def resolve_model(model: str) -> tuple[str, "SamplingSpec | None"]:
    """(folder or hub id, spec) of what `load_pipeline` loads (a run folder means its export; spec None: a plain
    pipeline), or one line saying why `model` is none of them. Cheap: nothing is loaded, so a caller can check
    every model before it starts."""
    model = bundled_path(str(model))  # e.g. --teacher assets/shapes-teacher from any directory
    if os.path.isdir(model) and os.path.isfile(os.path.join(model, "run.json")):
        export = os.path.join(model, "export")
        if not os.path.isfile(os.path.join(export, SPEC_FILE)):
            raise StepdistillError(f"run folder '{model}' has no export yet; run `stepdistill export {model}` first")
        model = export
    if os.path.isdir(model) and os.path.isfile(os.path.join(model, SPEC_FILE)):
        return model, SamplingSpec.read(model)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise StepdistillError(f"'{model}' is not an export folder (no {SPEC_FILE}), a run folder (no run.json) "
                                   "or a diffusers pipeline folder (no model_index.json); give RUN/export, a run "
                                   "folder, or a pipeline folder")
        return model, None  # a plain pipeline: its own scheduler unless told otherwise
    if os.path.exists(model):
        raise StepdistillError(f"'{model}' is a file; give an export folder (RUN/export), a run folder, or a "
                               "diffusers pipeline folder")
    if "/" in model and not model.startswith((".", "/", "~")) and model.count("/") == 1:
        return model, None  # a hub id (org/name): a plain pipeline
    raise StepdistillError(f"'{model}' does not exist; give an export folder (RUN/export), a run folder, or a "
                           "diffusers pipeline folder or hub id")


def load_pipeline(model: str, *, device="cpu", dtype=torch.float32, scheduler: str | None = None,
                  base_model: str | None = None, guidance_scale: float | None = None):
    """(pipeline, spec) for an export folder, a training run folder, or a plain diffusers pipeline."""
    model, spec = resolve_model(model)

    if spec is not None and spec.format == "lora":
        base = base_model or spec.base_model
        if not base:
            raise StepdistillError(f"LoRA export '{model}' names no base model; pass --base-model")
        pipe = _from_pretrained(bundled_path(base), dtype)  # a relative bundled teacher from any directory
        try:
            pipe.load_lora_weights(model, weight_name=LORA_FILE, adapter_name="student")
        except Exception as err:  # truncated / corrupt file: safetensors, OSError or peft errors by version
            path = os.path.join(model, LORA_FILE)
            why = load_error_line(err, 200).replace(f"'{path}' is truncated", "the file is truncated")
            raise StepdistillError(f"LoRA weights '{path}' cannot be loaded ({why}); "
                                   "re-export the student") from None
        if spec.lora_scale != 1.0:
            pipe.set_adapters(["student"], [spec.lora_scale])
    else:
        pipe = _from_pretrained(model, dtype)
    if spec is None:
        spec = SamplingSpec(format="pipeline", scheduler_class=type(pipe.scheduler).__name__,
                            scheduler_config=dict(pipe.scheduler.config), num_inference_steps=25, guidance_scale=7.5)
    if scheduler == "auto":  # a baseline sampler: DDIM for VP pipelines, a flow pipeline's own scheduler
        scheduler = None if samples_flow(spec.scheduler_class, spec.scheduler_config) else "ddim"
    if scheduler is not None:
        spec = dataclasses.replace(spec, scheduler_class=scheduler_class(scheduler).__name__, timesteps=None,
                                   sigmas=None)
    if guidance_scale is not None:
        spec = dataclasses.replace(spec, guidance_scale=guidance_scale)
    pipe.scheduler = make_scheduler(spec)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), spec


@contextlib.contextmanager
def scheduler_warnings_off():
    """diffusers' schedulers warn on every call with custom timesteps that are not their default grid (LCM: "The
    first timestep ... is 699, not 999"); a student's spec sets exactly those on purpose."""
    logger = logging.getLogger("diffusers.schedulers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def step_generators(scheduler, generators):
    """Hand `generators` to every `scheduler.step` call that gets none: pipelines such as SD3's and Flux's call
    `step` without their generator, so a stochastic sampler's noise (FlowMatchEuler's stochastic_sampling)
    would come from the global RNG and a seed would not fix the image."""
    if "generator" not in inspect.signature(scheduler.step).parameters:
        yield
        return
    step = scheduler.step

    def seeded(*args, **kwargs):
        if kwargs.get("generator") is None:
            kwargs["generator"] = generators
        return step(*args, **kwargs)

    scheduler.step = seeded
    try:
        yield
    finally:
        del scheduler.step  # the class's own method again


@torch.no_grad()
def generate(pipe, spec: SamplingSpec, prompts: list[str], seeds: list[int], *, steps: int | None = None,
             guidance_scale: float | None = None, height: int | None = None, width: int | None = None,
             batch_size: int = 16):
    """PIL images, one per prompt; image i depends only on (prompts[i], seeds[i], steps), not on batching."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    steps = spec.num_inference_steps if steps is None else int(steps)
    if steps < 1:
        raise StepdistillError(f"the number of sampling steps must be at least 1, got {steps}")
    g = spec.guidance_scale if guidance_scale is None else guidance_scale
    backbone = backbone_for_pipeline(type(pipe).__name__)
    net = getattr(pipe, backbone.component) if backbone else pipe.unet
    # the pipeline's default size (Flux's transformer has no sample_size: its pipeline's default_sample_size; Z-Image's
    # pipeline has neither: its __call__ defaults to 1024 px = 128 x 8)
    default = net.config.get("sample_size") or getattr(pipe, "default_sample_size", None) or 128
    size = spec.resolution or default * pipe.vae_scale_factor
    height, width = height or size, width or size
    kwargs = {"num_inference_steps": steps}
    explicit = spec.explicit_schedule(steps)
    if explicit and all(k in inspect.signature(pipe.scheduler.set_timesteps).parameters for k in explicit):
        kwargs = explicit
    elif not pipe.scheduler.config.get("use_dynamic_shifting"):  # (then only the pipeline knows its mu)
        set_timesteps_checked(pipe.scheduler, steps)  # a refused step count stops here, in one line
    if "use_resolution_binning" in inspect.signature(pipe.__call__).parameters:
        kwargs["use_resolution_binning"] = False  # PixArt, Sana: sample at height x width, as trained, not a bin's
    device = pipe.device
    images = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        channels = backbone.latent_channels(net) if backbone else net.config.in_channels
        latents = torch.stack([
            torch.randn((channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor),
                        generator=gen) for gen in gens]).to(device=device, dtype=net.dtype)
        if backbone:
            latents = backbone.pipeline_latents(latents)  # e.g. Flux takes its latents packed
        # each image's generator, past its starting noise, also draws the noise multistep samplers add between
        # steps (LCM, DDPM, ancestral): else that comes from the global RNG and a seed fixes nothing
        with scheduler_warnings_off(), step_generators(pipe.scheduler, gens):
            guidance = backbone.pipeline_guidance(g, len(gens)) if backbone else {"guidance_scale": g}
            out = pipe(prompt=list(prompts[i:i + batch_size]), height=height, width=width, latents=latents,
                       generator=gens, output_type="pil", **guidance, **kwargs)
        images.extend(out.images)
    return images

"""Loading the frozen teacher and building students from it.

Teachers are diffusers pipelines loaded with `from_pretrained` from a hub id or a local folder. The pipeline class
picks the backbone adapter (`stepdistill.backbones`): Stable Diffusion 1.x/2.x and SDXL (UNet, discrete VP
schedules) and SD3 (MMDiT, rectified flow). The schedule comes from the pipeline's scheduler config.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import json
import logging
import os
from dataclasses import dataclass, field

import torch

from .backbones import PIPELINE_BACKBONES, Backbone, backbone_for, backbone_for_pipeline
from .config import ModelConfig, StudentConfig
from .denoiser import Conditioning, Denoiser
from .errors import StepdistillError
from .schedule import FlowSchedule, NoiseSchedule, VPSchedule
from .utils import BUNDLED_ROOTS, bundled_path, load_error_line, resolve_dtype

log = logging.getLogger(__name__)

STUDENT_ADAPTER = "student"
TARGET_ADAPTER = "target"  # a frozen snapshot / EMA of the student's adapter on the same base (progressive, consistency)


class PromptEncoder:
    """Encodes prompts exactly as the teacher's diffusers pipeline does (through its backbone adapter)."""

    def __init__(self, backbone: Backbone, pipe):
        self.backbone = backbone
        self.pipe = pipe
        self.encoders = backbone.text_encoders(pipe)

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: list[str], resolution: int | None = None) -> Conditioning:
        return self.backbone.encode_prompt(self.pipe, list(prompts), resolution)


@dataclass
class Teacher:
    model_id: str
    pipeline_class: str
    backbone: Backbone
    net: torch.nn.Module  # the pipeline's denoising network (unet / transformer), frozen
    vae: torch.nn.Module
    prompt_encoder: PromptEncoder
    scheduler_config: dict
    schedule: NoiseSchedule
    components: dict = field(default_factory=dict)  # everything from_pretrained returned (for export)
    absent: tuple[str, ...] = ()  # components its folder records as None (from_pretrained needs name=None)

    @property
    def family(self) -> str:
        return self.backbone.kind

    def denoiser(self) -> Denoiser:
        return Denoiser(self.net, self.schedule, adapter=None, backbone=self.backbone)

    @property
    def latent_scale(self) -> float:
        return self.backbone.latent_norm(self.vae)[0]

    def to_latents(self, vae_latents: torch.Tensor) -> torch.Tensor:
        """What the network sees: (vae latent - shift_factor) * scaling_factor (per channel where the family's
        are tensors, Qwen-Image's latents_mean / latents_std)."""
        scale, shift = self._latent_norm(vae_latents)
        return (vae_latents - shift) * scale

    def from_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """What the VAE decodes, as the pipeline computes it: latents / scaling_factor + shift_factor."""
        scale, shift = self._latent_norm(latents)
        return latents / scale + shift

    def _latent_norm(self, like: torch.Tensor):
        """`latent_norm`, tensors cast to `like`'s device and dtype (floats stay floats)."""
        return tuple(v.to(like.device, like.dtype) if isinstance(v, torch.Tensor) else v
                     for v in self.backbone.latent_norm(self.vae))

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        size = resolution // self.backbone.vae_factor(self.vae)
        return (self.backbone.latent_channels(self.net), size, size)

    def at_resolution(self, resolution: int) -> "Teacher":
        """Fix what depends on the training resolution: a dynamically shifted flow schedule's shift."""
        if isinstance(self.schedule, FlowSchedule):
            _, h, w = self.latent_shape(resolution)
            p = self.backbone.downsampling(self.net)
            self.schedule.at_resolution((h // p) * (w // p))
        return self


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or os.sep == "\\" and "\\" in name


def read_pipeline_class(model_id: str, revision: str | None = None) -> str:
    """The pipeline class of a local folder or hub id, read from model_index.json (no weights loaded)."""
    return read_model_index(model_id, revision).get("_class_name", "?")


def absent_components(model_id: str, revision: str | None = None) -> dict:
    """`name=None` for each required component that model_index.json records as absent ([null, null], e.g. SD3
    without its T5 encoder): diffusers saves such folders but refuses to load them unless told so. (Optional
    components, which it loads as None by itself, are left out.)"""
    import diffusers

    index = read_model_index(model_id, revision)
    optional = set(getattr(getattr(diffusers, index.get("_class_name", ""), None), "_optional_components", []))
    return {name: None for name, value in index.items()
            if not name.startswith("_") and name not in optional and isinstance(value, list) and value
            and value[0] is None}


def read_model_index(model_id: str, revision: str | None = None) -> dict:
    """model_index.json of a local folder or hub id, checked (one-line errors for what is missing or corrupt)."""
    if os.path.isdir(model_id):
        index = os.path.join(model_id, "model_index.json")
        if not os.path.isfile(index):
            raise StepdistillError(f"'{model_id}' is not a diffusers pipeline folder (no model_index.json); "
                                   "point model.teacher at a folder written by save_pretrained, or a hub id")
        with open(index) as f:
            try:
                spec = json.load(f)
            except json.JSONDecodeError:
                raise StepdistillError(f"'{index}' is not valid JSON; the teacher folder is corrupt") from None
        for name, value in spec.items():  # else diffusers names some other folder than the one that is missing
            if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None \
                    and not os.path.isdir(os.path.join(model_id, name)):
                raise StepdistillError(f"pipeline folder '{model_id}' is incomplete: its '{name}/' folder is missing "
                                       f"(model_index.json lists it); restore it or give a complete pipeline folder")
        return spec
    if _looks_like_path(model_id):
        raise StepdistillError(f"teacher path '{model_id}' does not exist; give a local diffusers pipeline folder "
                               "or a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    try:
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(model_id, revision=revision))
    except Exception as err:  # hub errors vary by version; the user needs one line
        offline = _hub_offline(err)
        if offline:
            raise StepdistillError(f"could not load '{model_id}': it is not a local folder, {offline}, and it is not "
                                   "in the local hub cache; download it where the hub is reachable and give the "
                                   "local folder") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StepdistillError(f"could not load teacher '{model_id}' (not a local folder; hub lookup failed: "
                               f"{first[:200]}); check the id, or download it and give the local folder") from None


def _hub_offline(err: BaseException) -> str | None:
    """Why the hub could not be asked, when that is why a lookup failed (offline mode, no network); else None."""
    if str(os.environ.get("HF_HUB_OFFLINE", "")).upper() in ("1", "ON", "YES", "TRUE"):
        return "the model hub is offline (HF_HUB_OFFLINE=1)"
    chain, e = [], err
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    names = {c.__name__ for e in chain for c in type(e).__mro__}
    if names & {"OfflineModeIsEnabled", "ConnectionError", "ConnectTimeout", "Timeout", "LocalEntryNotFoundError"}:
        return "the model hub is unreachable (offline)"
    return None


def check_resolution(resolution: int, teacher: "Teacher", *nets) -> None:
    """Refuse, before training, an image size the VAE and the networks cannot take (else it fails at sampling)."""
    vae_factor = teacher.backbone.vae_factor(teacher.vae)
    net_factor = max([teacher.backbone.downsampling(n) for n in nets] or [1])
    multiple = vae_factor * net_factor
    if resolution % multiple:
        lower = max(multiple, resolution // multiple * multiple)
        raise StepdistillError(f"config key 'data.resolution' must be a multiple of {multiple} for this teacher (VAE "
                               f"factor {vae_factor} x network downsampling {net_factor}), got {resolution}; e.g. "
                               f"{lower} or {lower + multiple}")


def load_teacher(cfg: ModelConfig, device: torch.device | str = "cpu") -> Teacher:
    """Load and freeze the teacher pipeline's parts."""
    if cfg.trust_remote_code:
        raise StepdistillError("model.trust_remote_code=true is refused: stepdistill loads only diffusers' own "
                               "pipeline classes, which never need remote code")
    model_id = bundled_path(cfg.teacher)  # the bundled teacher from any directory
    if model_id == ModelConfig.teacher and not os.path.isdir(model_id):
        raise StepdistillError(f"the bundled teacher '{model_id}' is missing: not in this directory nor in "
                               f"{' or '.join(str(r) for r in BUNDLED_ROOTS)}; install stepdistill from its source "
                               "tree (pip install -e .) or set model.teacher")
    pipeline_class = read_pipeline_class(model_id, cfg.revision)
    backbone = backbone_for_pipeline(pipeline_class)
    if backbone is None:
        raise StepdistillError(f"unsupported teacher '{cfg.teacher}' (pipeline class {pipeline_class}); supported: "
                               f"{', '.join(sorted(PIPELINE_BACKBONES))}")
    import diffusers

    dtype = resolve_dtype(cfg.dtype, device)
    cls = getattr(diffusers, pipeline_class)
    absent = absent_components(model_id, cfg.revision)
    kwargs = {"torch_dtype": dtype, "revision": cfg.revision, "variant": cfg.variant, **absent}
    if "safety_checker" in _init_parameters(cls):
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(model_id, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        why = load_error_line(err)
        fix = "; re-download or re-save the teacher" if why.endswith("truncated or corrupt") else ""
        raise StepdistillError(f"could not load teacher '{cfg.teacher}': {why}{fix}") from None
    components = dict(pipe.components)
    net = getattr(pipe, backbone.component, None)
    if net is None:
        raise StepdistillError(f"teacher '{cfg.teacher}' has no '{backbone.component}' component")
    for module in (net, pipe.vae, *backbone.text_encoders(pipe)):
        module.to(device).eval().requires_grad_(False)
    if cfg.xformers:
        if torch.device(device).type == "cuda":
            net.enable_xformers_memory_efficient_attention()
        else:
            log.warning("model.xformers=true ignored: xformers needs a CUDA device; using torch SDPA")
    scheduler_config = dict(pipe.scheduler.config)
    schedule = schedule_from_scheduler(type(pipe.scheduler).__name__, scheduler_config, cfg.teacher)
    return Teacher(model_id, pipeline_class, backbone, net, backbone.image_vae(pipe.vae), PromptEncoder(backbone, pipe),
                   scheduler_config, schedule, components, tuple(absent))


def _init_parameters(cls) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


def samples_flow(scheduler_class: str, config: dict) -> bool:
    """Whether a scheduler samples flow matching (the FlowMatch schedulers, flow prediction types)."""
    return scheduler_class.startswith("FlowMatch") or (config.get("prediction_type") or "") in ("flow", "flow_prediction")


def schedule_from_scheduler(scheduler_class: str, config: dict, teacher: str) -> NoiseSchedule:
    """The noise schedule of the teacher's scheduler: flow matching for the FlowMatch schedulers and DPM-Solver on
    flow sigmas (Sana's; flow prediction types), the discrete VP schedule of its betas otherwise."""
    if samples_flow(scheduler_class, config):
        dpm_flow = scheduler_class == "DPMSolverMultistepScheduler" and config.get("use_flow_sigmas")
        if not scheduler_class.startswith("FlowMatch") and not dpm_flow:
            raise StepdistillError(f"teacher '{teacher}' samples flow matching with {scheduler_class}; only "
                                   "FlowMatchEulerDiscreteScheduler and DPMSolverMultistepScheduler(use_flow_sigmas="
                                   "True) configs are supported for flow teachers")
        return FlowSchedule.from_scheduler_config(config)
    return VPSchedule.from_scheduler_config(config)


def lora_config(cfg: StudentConfig, net):
    from peft import LoraConfig

    wanted = cfg.lora_targets or list(backbone_for(net).lora_targets)
    names = [name for name, _ in net.named_modules()]
    targets = [t for t in wanted if any(n == t or n.endswith("." + t) for n in names)]
    if not targets:
        raise StepdistillError(f"student.lora_targets {wanted} match no module of the teacher's "
                               f"{type(net).__name__}")
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, init_lora_weights="gaussian")


def _add_adapter(net, config, name: str) -> None:
    """`net.add_adapter`, without peft's "Already found a `peft_config`" warning: a second adapter on one base
    (fake score, snapshot) is how stepdistill keeps one copy of the weights, not a mistake."""
    import warnings

    if not hasattr(net, "add_adapter"):
        _give_peft_adapters(net)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        net.add_adapter(config, adapter_name=name)


_PEFT_CLASSES: dict[type, type] = {}


def _give_peft_adapters(net) -> None:
    """Give a diffusers network that lacks it (PixArtTransformer2DModel in diffusers 0.42) diffusers' own
    PeftAdapterMixin (add_adapter, set_adapter, unload_lora, ...): its class becomes a subclass with the mixin and
    the same name and module, so configs and saved pipelines still name the diffusers class."""
    from diffusers.loaders.peft import PeftAdapterMixin

    cls = type(net)
    if cls not in _PEFT_CLASSES:
        _PEFT_CLASSES[cls] = type(cls.__name__, (cls, PeftAdapterMixin),
                                  {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    net.__class__ = _PEFT_CLASSES[cls]


def add_lora(net, cfg: StudentConfig, adapter_name: str) -> None:
    """Add a trainable fp32 LoRA adapter to the frozen base network."""
    _add_adapter(net, lora_config(cfg, net), adapter_name)
    for name, p in net.named_parameters():
        if f".{adapter_name}." in name:
            p.data = p.data.float()
            p.requires_grad_(True)


def build_student(teacher: Teacher, cfg: StudentConfig):
    """The student network: a LoRA adapter on the teacher's own network (one copy in memory), a full fp32 copy,
    or a smaller fp32 network (`small_network`; its initialisation report is the module's `init_report`)."""
    if cfg.type == "lora":
        base = teacher.net if cfg.share_base else copy.deepcopy(teacher.net)
        add_lora(base, cfg, STUDENT_ADAPTER)
        return base
    small = cfg.type == "small"
    net = small_network(teacher.net, cfg.architecture) if small else copy.deepcopy(teacher.net).float()
    if cfg.guidance_embedding:
        net = with_guidance_embedding(net, cfg.guidance_embedding_dim)
    if small:
        net.init_report = init_report(teacher.net, net, cfg.architecture)  # after the guidance layer is added
        log.info("%s", net.init_report["summary"])
    net.requires_grad_(True).train()
    return net


# Network config keys a smaller student must share with the teacher: the pipeline's VAE, text encoders and
# conditioning fix them (the guidance input has its own switch, student.guidance_embedding).
FIXED_CONFIG_KEYS = {"in_channels": "the VAE's latent channels", "out_channels": "the VAE's latent channels",
                     "cross_attention_dim": "the text encoder's width", "joint_attention_dim": "the text encoders' width",
                     "pooled_projection_dim": "the text encoders' pooled width",
                     "addition_embed_type": "the pipeline's conditioning",
                     "addition_time_embed_dim": "the pipeline's conditioning",
                     "projection_class_embeddings_input_dim": "the pipeline's conditioning",
                     "time_cond_proj_dim": "student.guidance_embedding"}


def check_architecture(teacher_config: dict, architecture: dict, network_class=None) -> None:
    """One-line errors for overrides that are not config keys of the teacher's network, or that the pipeline
    fixes."""
    import inspect

    if network_class is None:
        from diffusers import UNet2DConditionModel as network_class
    known = {k for k in teacher_config if not k.startswith("_")}
    known |= set(inspect.signature(network_class.__init__).parameters) - {"self"}
    for key in architecture:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise StepdistillError(f"unknown {network_class.__name__} config key 'student.architecture.{key}'{hint}; "
                                   "the keys are those of the teacher network's config.json")
        if key in FIXED_CONFIG_KEYS and architecture[key] != teacher_config.get(key):
            raise StepdistillError(f"config key 'student.architecture.{key}' must stay the teacher's "
                                   f"({teacher_config.get(key)!r}): {FIXED_CONFIG_KEYS[key]} fixes it")


def small_network(teacher_net, architecture: dict, seed: int = 0):
    """The teacher network's class from its config with `architecture` overrides (BK-SDM: fewer layers per
    block, no mid-block; a transformer: fewer layers), fp32 on the teacher's device, and every state-dict tensor
    whose name and shape match the teacher's copied from it. Fresh tensors come from a fixed seed (the global RNG
    is left as it was), so the same config always builds the same student."""
    cls = type(teacher_net)
    base = {k: v for k, v in teacher_net.config.items() if not k.startswith("_")}
    check_architecture(base, architecture, cls)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = cls.from_config({**base, **architecture})
    except Exception as err:  # diffusers raises ValueError, TypeError, IndexError... for inconsistent configs
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StepdistillError(f"student.architecture {architecture} does not make a valid {cls.__name__} "
                               f"from the teacher's config: {first[:300]}") from None
    net = net.to(teacher_net.device).float()
    source = teacher_net.state_dict()
    net.load_state_dict({k: source[k] for k in _matching_keys(source, net.state_dict())}, strict=False)
    return net


def _matching_keys(source: dict, target: dict) -> list[str]:
    """Names of the `target` state-dict tensors that `source` has with the same shape."""
    return [k for k, v in target.items() if k in source and source[k].shape == v.shape]


def init_report(teacher_net, student, architecture: dict, max_names: int = 40) -> dict:
    """How a small student was initialised: tensors (and their parameter counts) copied from the teacher by
    name and shape, and the freshly initialised ones."""
    target = student.state_dict()
    copied = _matching_keys(teacher_net.state_dict(), target)
    copied_set = set(copied)
    fresh = [k for k in target if k not in copied_set]
    numel = lambda names: sum(target[k].numel() for k in names)  # noqa: E731
    student_params = sum(p.numel() for p in student.parameters())
    teacher_params = sum(p.numel() for p in teacher_net.parameters())
    summary = (f"student.type=small: {student_params:,} parameters ({student_params / teacher_params:.1%} of the "
               f"teacher's {teacher_params:,}); copied from the teacher {len(copied)} of {len(target)} tensors "
               f"({numel(copied):,} values), freshly initialised {len(fresh)} ({numel(fresh):,} values)"
               + (f": {', '.join(fresh[:5])}{', ...' if len(fresh) > 5 else ''}" if fresh else ""))
    return {"summary": summary, "architecture": dict(architecture), "teacher_parameters": teacher_params,
            "student_parameters": student_params, "tensors": len(target), "copied_tensors": len(copied),
            "fresh_tensors": len(fresh), "copied_values": numel(copied), "fresh_values": numel(fresh),
            "fresh": fresh[:max_names], "fresh_truncated": len(fresh) > max_names}


def with_guidance_embedding(net, dim: int):
    """A copy of a UNet with a guidance-scale embedding input (`time_cond_proj_dim`), zero-initialised so the
    new student starts exactly as the teacher."""
    from diffusers import UNet2DConditionModel

    if not isinstance(net, UNet2DConditionModel):
        raise StepdistillError(f"student.guidance_embedding adds a UNet's time_cond_proj_dim input; the teacher's "
                               f"{type(net).__name__} has no such input: set it to false")
    config = dict(net.config)
    config["time_cond_proj_dim"] = dim
    new = UNet2DConditionModel.from_config(config).to(device=net.device, dtype=net.dtype)
    missing, unexpected = new.load_state_dict(net.state_dict(), strict=False)
    assert not unexpected and all("cond_proj" in k for k in missing), (missing, unexpected)
    torch.nn.init.zeros_(new.time_embedding.cond_proj.weight)
    return new


def trainable_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters being trained (the LoRA weights of a LoRA student; everything of a full student)."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    params = dict(module.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state))[:3], sorted(set(state) - expected)[:3]
        raise StepdistillError(f"{what} does not match this model (missing {missing}, unexpected {extra}); "
                               "was it written by a run with another config?")
    with torch.no_grad():
        for n, v in state.items():
            if params[n].shape != v.shape:
                raise StepdistillError(f"{what}: '{n}' has shape {tuple(v.shape)}, the model expects "
                                       f"{tuple(params[n].shape)}")
            params[n].copy_(v)


@contextlib.contextmanager
def adapter_state_kept(net):
    """Keep the active adapter and every existing parameter's requires_grad across the body: peft's add_adapter
    activates the new adapter and freezes the others. A plain UNet (no adapter active before) stays plain."""
    active = net.active_adapters() if getattr(net, "_hf_peft_config_loaded", False) else []
    flags = {p: p.requires_grad for p in net.parameters()}
    try:
        yield
    finally:
        if active:
            net.set_adapter(active)
        else:
            net.disable_adapters()
        for p, flag in flags.items():
            p.requires_grad_(flag)


def add_adapter_like(net, source: str, name: str) -> None:
    """A frozen fp32 adapter `name` with adapter `source`'s LoRA config (a snapshot slot on the same base)."""
    config = copy.deepcopy(net.peft_config[source])
    with adapter_state_kept(net):
        _add_adapter(net, config, name)
    for n, p in net.named_parameters():
        if f".{name}." in n:
            p.data = p.data.float()
            p.requires_grad_(False)


@torch.no_grad()
def copy_adapter(source_net, source: str, net, name: str, weight: float = 1.0) -> None:
    """Copy adapter `source` of `source_net` into adapter `name` of `net` (the same base architecture); a `weight`
    below 1 moves `name` that fraction of the way instead (an EMA step: weight = 1 - decay)."""
    src = {n.replace(f".{source}.", f".{name}."): p for n, p in source_net.named_parameters() if f".{source}." in n}
    dst = {n: p for n, p in net.named_parameters() if f".{name}." in n}
    if set(src) != set(dst) or not dst:
        raise StepdistillError(f"adapter '{source}' and adapter '{name}' do not have the same layers")
    for n, p in dst.items():
        p.lerp_(src[n].to(p.dtype), weight) if weight < 1.0 else p.copy_(src[n])

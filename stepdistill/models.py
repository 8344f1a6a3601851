"""Loading the frozen teacher and building students from it.

Teachers are diffusers pipelines loaded with `from_pretrained` from a hub id or a local folder. Supported:
Stable-Diffusion-style (one CLIP text encoder; eps / v prediction) and SDXL-style (two text encoders, pooled
embeddings, time ids). The seam for transformer / flow-matching teachers is `TEACHER_FAMILIES` + the schedule.
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

from .config import ModelConfig, StudentConfig
from .denoiser import Conditioning, Denoiser
from .errors import StepdistillError
from .schedule import NoiseSchedule, VPSchedule
from .utils import BUNDLED_ROOTS, bundled_path, load_error_line, resolve_dtype

log = logging.getLogger(__name__)

# pipeline class name -> family; the family decides text encoding and conditioning.
TEACHER_FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "LatentConsistencyModelPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
}
STUDENT_ADAPTER = "student"


class PromptEncoder:
    """Tokenizes and encodes prompts exactly as the diffusers pipeline of the teacher's family does."""

    def __init__(self, family: str, tokenizers: list, encoders: list, force_zeros_for_empty_prompt: bool = False):
        self.family = family
        self.tokenizers = tokenizers
        self.encoders = encoders
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].parameters()).device

    @torch.no_grad()
    def __call__(self, prompts: list[str], resolution: int | None = None) -> Conditioning:
        if self.family == "sd":
            tok, enc = self.tokenizers[0], self.encoders[0]
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            return Conditioning(enc(ids)[0].float())
        # SDXL: penultimate hidden states of both encoders, concatenated; pooled output of the second.
        hidden, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(self.device)
            out = enc(ids, output_hidden_states=True)
            pooled = out[0]
            hidden.append(out.hidden_states[-2])
        embeds, pooled = torch.cat(hidden, dim=-1).float(), pooled.float()
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        res = resolution or 1024
        time_ids = torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32, device=embeds.device)
        return Conditioning(embeds, pooled, time_ids.repeat(len(prompts), 1))


@dataclass
class Teacher:
    model_id: str
    family: str
    pipeline_class: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    prompt_encoder: PromptEncoder
    scheduler_config: dict
    schedule: NoiseSchedule
    components: dict = field(default_factory=dict)  # everything from_pretrained returned (for export)

    def denoiser(self) -> Denoiser:
        return Denoiser(self.unet, self.schedule, adapter=None)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or os.sep == "\\" and "\\" in name


def read_pipeline_class(model_id: str, revision: str | None = None) -> str:
    """The pipeline class of a local folder or hub id, read from model_index.json (no weights loaded)."""
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
        return spec.get("_class_name", "?")
    if _looks_like_path(model_id):
        raise StepdistillError(f"teacher path '{model_id}' does not exist; give a local diffusers pipeline folder "
                               "or a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    try:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(model_id, revision=revision).get("_class_name", "?")
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


def check_resolution(resolution: int, vae, *unets) -> None:
    """Refuse, before training, an image size the VAE and the UNets cannot take (else it fails at sampling)."""
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet_factor = max([2 ** (len(u.config.down_block_types) - 1) for u in unets
                       if "down_block_types" in getattr(u, "config", {})] or [1])
    multiple = vae_factor * unet_factor
    if resolution % multiple:
        lower = max(multiple, resolution // multiple * multiple)
        raise StepdistillError(f"config key 'data.resolution' must be a multiple of {multiple} for this teacher (VAE "
                               f"factor {vae_factor} x UNet downsampling {unet_factor}), got {resolution}; e.g. "
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
    family = TEACHER_FAMILIES.get(pipeline_class)
    if family is None:
        raise StepdistillError(f"unsupported teacher '{cfg.teacher}' (pipeline class {pipeline_class}); supported: "
                               f"{', '.join(sorted(set(TEACHER_FAMILIES)))}")
    import diffusers

    dtype = resolve_dtype(cfg.dtype, device)
    kwargs = {"torch_dtype": dtype, "revision": cfg.revision, "variant": cfg.variant}
    if family == "sd":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = getattr(diffusers, pipeline_class).from_pretrained(model_id, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        why = load_error_line(err)
        fix = "; re-download or re-save the teacher" if why.endswith("truncated or corrupt") else ""
        raise StepdistillError(f"could not load teacher '{cfg.teacher}': {why}{fix}") from None
    components = dict(pipe.components)
    unet = pipe.unet.to(device)
    if pipe.scheduler.config.get("prediction_type", "epsilon") == "flow" or "Flow" in type(pipe.scheduler).__name__:
        raise StepdistillError(f"teacher '{cfg.teacher}' uses a flow-matching scheduler; flow teachers are not supported yet")
    for module in (unet, pipe.vae, getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    if cfg.xformers:
        if torch.device(device).type == "cuda":
            unet.enable_xformers_memory_efficient_attention()
        else:
            log.warning("model.xformers=true ignored: xformers needs a CUDA device; using torch SDPA")
    if family == "sd":
        encoder = PromptEncoder("sd", [pipe.tokenizer], [pipe.text_encoder])
    else:
        encoder = PromptEncoder("sdxl", [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                bool(pipe.config.get("force_zeros_for_empty_prompt", True)))
    scheduler_config = dict(pipe.scheduler.config)
    return Teacher(model_id, family, pipeline_class, unet, pipe.vae, encoder, scheduler_config,
                   VPSchedule.from_scheduler_config(scheduler_config), components)


def lora_config(cfg: StudentConfig, unet):
    from peft import LoraConfig

    names = [name for name, _ in unet.named_modules()]
    targets = [t for t in cfg.lora_targets if any(n == t or n.endswith("." + t) for n in names)]
    if not targets:
        raise StepdistillError(f"student.lora_targets {cfg.lora_targets} match no module of the teacher UNet")
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, init_lora_weights="gaussian")


def _add_adapter(unet, config, name: str) -> None:
    """`unet.add_adapter`, without peft's "Already found a `peft_config`" warning: a second adapter on one base
    (fake score, snapshot) is how stepdistill keeps one copy of the weights, not a mistake."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        unet.add_adapter(config, adapter_name=name)


def add_lora(unet, cfg: StudentConfig, adapter_name: str) -> None:
    """Add a trainable fp32 LoRA adapter to the frozen base UNet."""
    _add_adapter(unet, lora_config(cfg, unet), adapter_name)
    for name, p in unet.named_parameters():
        if f".{adapter_name}." in name:
            p.data = p.data.float()
            p.requires_grad_(True)


def build_student(teacher: Teacher, cfg: StudentConfig):
    """The student UNet: a LoRA adapter on the teacher's own UNet (one copy in memory), a full fp32 copy, or a
    smaller fp32 UNet (`small_unet`; its initialisation report is the module's `init_report` attribute)."""
    if cfg.type == "lora":
        base = teacher.unet if cfg.share_base else copy.deepcopy(teacher.unet)
        add_lora(base, cfg, STUDENT_ADAPTER)
        return base
    small = cfg.type == "small"
    unet = small_unet(teacher.unet, cfg.architecture) if small else copy.deepcopy(teacher.unet).float()
    if cfg.guidance_embedding:
        unet = with_guidance_embedding(unet, cfg.guidance_embedding_dim)
    if small:
        unet.init_report = init_report(teacher.unet, unet, cfg.architecture)  # after the guidance layer is added
        log.info("%s", unet.init_report["summary"])
    unet.requires_grad_(True).train()
    return unet


# UNet config keys a smaller student must share with the teacher: the pipeline's VAE, text encoders and
# SDXL conditioning fix them (the guidance input has its own switch, student.guidance_embedding).
FIXED_UNET_KEYS = {"in_channels": "the VAE's latent channels", "out_channels": "the VAE's latent channels",
                   "cross_attention_dim": "the text encoder's width", "addition_embed_type": "the pipeline's conditioning",
                   "addition_time_embed_dim": "the pipeline's conditioning",
                   "projection_class_embeddings_input_dim": "the pipeline's conditioning",
                   "time_cond_proj_dim": "student.guidance_embedding"}


def check_architecture(teacher_config: dict, architecture: dict) -> None:
    """One-line errors for overrides that are not UNet config keys, or that the pipeline fixes."""
    import inspect

    from diffusers import UNet2DConditionModel

    known = {k for k in teacher_config if not k.startswith("_")}
    known |= set(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}
    for key in architecture:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise StepdistillError(f"unknown UNet config key 'student.architecture.{key}'{hint}; the keys are those "
                                   "of the teacher's unet/config.json")
        if key in FIXED_UNET_KEYS and architecture[key] != teacher_config.get(key):
            raise StepdistillError(f"config key 'student.architecture.{key}' must stay the teacher's "
                                   f"({teacher_config.get(key)!r}): {FIXED_UNET_KEYS[key]} fixes it")


def small_unet(teacher_unet, architecture: dict, seed: int = 0):
    """A UNet2DConditionModel from the teacher's config with `architecture` overrides (BK-SDM: fewer layers per
    block, no mid-block, ...), fp32 on the teacher's device, and every state-dict tensor whose name and shape
    match the teacher's copied from it. Fresh tensors come from a fixed seed (the global RNG is left as it was),
    so the same config always builds the same student."""
    from diffusers import UNet2DConditionModel

    base = {k: v for k, v in teacher_unet.config.items() if not k.startswith("_")}
    check_architecture(base, architecture)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNet2DConditionModel.from_config({**base, **architecture})
    except Exception as err:  # diffusers raises ValueError, TypeError, IndexError... for inconsistent configs
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StepdistillError(f"student.architecture {architecture} does not make a valid UNet2DConditionModel "
                               f"from the teacher's config: {first[:300]}") from None
    unet = unet.to(teacher_unet.device).float()
    source = teacher_unet.state_dict()
    unet.load_state_dict({k: source[k] for k in _matching_keys(source, unet.state_dict())}, strict=False)
    return unet


def _matching_keys(source: dict, target: dict) -> list[str]:
    """Names of the `target` state-dict tensors that `source` has with the same shape."""
    return [k for k, v in target.items() if k in source and source[k].shape == v.shape]


def init_report(teacher_unet, student, architecture: dict, max_names: int = 40) -> dict:
    """How a small student was initialised: tensors (and their parameter counts) copied from the teacher by
    name and shape, and the freshly initialised ones."""
    target = student.state_dict()
    copied = _matching_keys(teacher_unet.state_dict(), target)
    copied_set = set(copied)
    fresh = [k for k in target if k not in copied_set]
    numel = lambda names: sum(target[k].numel() for k in names)  # noqa: E731
    student_params = sum(p.numel() for p in student.parameters())
    teacher_params = sum(p.numel() for p in teacher_unet.parameters())
    summary = (f"student.type=small: {student_params:,} parameters ({student_params / teacher_params:.1%} of the "
               f"teacher's {teacher_params:,}); copied from the teacher {len(copied)} of {len(target)} tensors "
               f"({numel(copied):,} values), freshly initialised {len(fresh)} ({numel(fresh):,} values)"
               + (f": {', '.join(fresh[:5])}{', ...' if len(fresh) > 5 else ''}" if fresh else ""))
    return {"summary": summary, "architecture": dict(architecture), "teacher_parameters": teacher_params,
            "student_parameters": student_params, "tensors": len(target), "copied_tensors": len(copied),
            "fresh_tensors": len(fresh), "copied_values": numel(copied), "fresh_values": numel(fresh),
            "fresh": fresh[:max_names], "fresh_truncated": len(fresh) > max_names}


def with_guidance_embedding(unet, dim: int):
    """A copy of `unet` with a guidance-scale embedding input (`time_cond_proj_dim`), zero-initialised so the
    new student starts exactly as the teacher."""
    from diffusers import UNet2DConditionModel

    config = dict(unet.config)
    config["time_cond_proj_dim"] = dim
    new = UNet2DConditionModel.from_config(config).to(device=unet.device, dtype=unet.dtype)
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
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
def adapter_state_kept(unet):
    """Keep the active adapter and every existing parameter's requires_grad across the body: peft's add_adapter
    activates the new adapter and freezes the others. A plain UNet (no adapter active before) stays plain."""
    active = unet.active_adapters() if getattr(unet, "_hf_peft_config_loaded", False) else []
    flags = {p: p.requires_grad for p in unet.parameters()}
    try:
        yield
    finally:
        if active:
            unet.set_adapter(active)
        else:
            unet.disable_adapters()
        for p, flag in flags.items():
            p.requires_grad_(flag)


def add_adapter_like(unet, source: str, name: str) -> None:
    """A frozen fp32 adapter `name` with adapter `source`'s LoRA config (a snapshot slot on the same base)."""
    config = copy.deepcopy(unet.peft_config[source])
    with adapter_state_kept(unet):
        _add_adapter(unet, config, name)
    for n, p in unet.named_parameters():
        if f".{name}." in n:
            p.data = p.data.float()
            p.requires_grad_(False)


@torch.no_grad()
def copy_adapter(source_unet, source: str, unet, name: str) -> None:
    """Copy adapter `source` of `source_unet` into adapter `name` of `unet` (the same base architecture)."""
    src = {n.replace(f".{source}.", f".{name}."): p for n, p in source_unet.named_parameters() if f".{source}." in n}
    dst = {n: p for n, p in unet.named_parameters() if f".{name}." in n}
    if set(src) != set(dst) or not dst:
        raise StepdistillError(f"adapter '{source}' and adapter '{name}' do not have the same layers")
    for n, p in dst.items():
        p.copy_(src[n])

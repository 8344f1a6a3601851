"""Loading the frozen teacher and building students from it.

Teachers are diffusers pipelines loaded with `from_pretrained` from a hub id or a local folder. Supported:
Stable-Diffusion-style (one CLIP text encoder; eps / v prediction) and SDXL-style (two text encoders, pooled
embeddings, time ids). The seam for transformer / flow-matching teachers is `TEACHER_FAMILIES` + the schedule.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field

import torch

from .config import ModelConfig, StudentConfig
from .denoiser import Conditioning, Denoiser
from .errors import StepdistillError
from .schedule import NoiseSchedule, VPSchedule
from .utils import resolve_dtype

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
                return json.load(f).get("_class_name", "?")
            except json.JSONDecodeError:
                raise StepdistillError(f"'{index}' is not valid JSON; the teacher folder is corrupt") from None
    if _looks_like_path(model_id):
        raise StepdistillError(f"teacher path '{model_id}' does not exist; give a local diffusers pipeline folder "
                               "or a hub id such as 'stable-diffusion-v1-5/stable-diffusion-v1-5'")
    try:
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(model_id, revision=revision).get("_class_name", "?")
    except Exception as err:  # hub errors vary by version; the user needs one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StepdistillError(f"could not load teacher '{model_id}' (not a local folder; hub lookup failed: "
                               f"{first[:200]}); check the id, or download it and give the local folder") from None


def load_teacher(cfg: ModelConfig, device: torch.device | str = "cpu") -> Teacher:
    """Load and freeze the teacher pipeline's parts."""
    if cfg.trust_remote_code:
        raise StepdistillError("model.trust_remote_code=true is refused: stepdistill loads only diffusers' own "
                               "pipeline classes, which never need remote code")
    pipeline_class = read_pipeline_class(cfg.teacher, cfg.revision)
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
        pipe = getattr(diffusers, pipeline_class).from_pretrained(cfg.teacher, **kwargs)
    except (OSError, ValueError, EnvironmentError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StepdistillError(f"could not load teacher '{cfg.teacher}': {first[:300]}") from None
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
    return Teacher(cfg.teacher, family, pipeline_class, unet, pipe.vae, encoder, scheduler_config,
                   VPSchedule.from_scheduler_config(scheduler_config), components)


def lora_config(cfg: StudentConfig, unet):
    from peft import LoraConfig

    names = [name for name, _ in unet.named_modules()]
    targets = [t for t in cfg.lora_targets if any(n == t or n.endswith("." + t) for n in names)]
    if not targets:
        raise StepdistillError(f"student.lora_targets {cfg.lora_targets} match no module of the teacher UNet")
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, init_lora_weights="gaussian")


def add_lora(unet, cfg: StudentConfig, adapter_name: str) -> None:
    """Add a trainable fp32 LoRA adapter to the frozen base UNet."""
    unet.add_adapter(lora_config(cfg, unet), adapter_name=adapter_name)
    for name, p in unet.named_parameters():
        if f".{adapter_name}." in name:
            p.data = p.data.float()
            p.requires_grad_(True)


def build_student(teacher: Teacher, cfg: StudentConfig):
    """The student UNet: a LoRA adapter on the teacher's own UNet (one copy in memory) or a full fp32 copy."""
    if cfg.type == "lora":
        add_lora(teacher.unet, cfg, STUDENT_ADAPTER)
        return teacher.unet
    unet = copy.deepcopy(teacher.unet).float()
    if cfg.guidance_embedding:
        unet = with_guidance_embedding(unet, cfg.guidance_embedding_dim)
    unet.requires_grad_(True).train()
    return unet


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

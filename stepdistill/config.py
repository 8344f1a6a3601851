"""Typed run configuration: YAML files plus `key.sub=value` overrides.

The schema is a tree of dataclasses. Every key is checked before any work starts: an unknown key, a wrong
type or an impossible value raises StepdistillError naming the key and what is allowed. Objective options
are a free dict here and are validated against the objective's own `Options` dataclass with the same rules by
`stepdistill.objectives.load_run_config` (this module sits below the objectives and never imports them).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from .errors import StepdistillError


@dataclass
class ModelConfig:
    teacher: str = "assets/shapes-teacher"  # hub id or local diffusers pipeline folder
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weight files on the hub
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # frozen weights; auto = fp32 on CPU, fp16 on GPU
    xformers: bool = False  # memory-efficient attention (GPU only; ignored with a warning on CPU)
    trust_remote_code: bool = False  # never needed for the supported teachers; refused unless set


@dataclass
class StudentConfig:
    # lora: an adapter on the teacher's network; full: an fp32 copy; small: a smaller network built from the
    # teacher's config with `architecture` overrides (BK-SDM style), initialised from the teacher where names and
    # shapes match
    type: Literal["lora", "full", "small"] = "lora"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    # module names (or name suffixes) the LoRA wraps; null: the backbone's defaults (a UNet's attention, resnet
    # and time-embedding layers; a transformer's attention and feed-forward projections)
    lora_targets: list[str] | None = None
    # Full and small students only: a guidance-scale embedding (UNet `time_cond_proj_dim`), one network for any w.
    guidance_embedding: bool = False
    guidance_embedding_dim: int = 256
    # Small students only: overrides of the teacher network's config, e.g. {layers_per_block: 1, mid_block_type:
    # null} for a UNet, {num_layers: 2} for a transformer
    architecture: dict[str, Any] = field(default_factory=dict)
    # LoRA students only: the adapter goes on the teacher's own network (one copy of the base in memory) or, false,
    # on a separate copy (more memory; kept for comparisons, e.g. `stepdistill benchmark`)
    share_base: bool = True


@dataclass
class ObjectiveConfig:
    name: str = "consistency"
    options: dict[str, Any] = field(default_factory=dict)  # validated by the objective's Options dataclass


@dataclass
class DataConfig:
    # "shapes" (the bundled world), a folder of images with metadata.jsonl, a .txt/.jsonl/.csv prompt file,
    # or a Hugging Face `datasets` name or path.
    source: str = "shapes"
    split: str = "train"
    caption_column: str = "text"
    image_column: str = "image"
    resolution: int = 32
    center_crop: bool = True
    random_flip: bool = False
    max_samples: int | None = None  # cap the dataset (also the size of the procedural shapes world)
    # encode each distinct caption once and reuse it (memory: distinct captions x tokens x width floats)
    cache_text_embeddings: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 300
    batch_size: int = 16  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    max_nonfinite_skips: int = 10  # updates with a nan/inf loss or gradient are skipped; this many in a row stop
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # forced to "no" on CPU (bf16 is ~20x slower there)
    # recompute activations in the backward pass of every trained backbone (student, fake score): less memory,
    # about one more forward per backward
    gradient_checkpointing: bool = False
    # dtype of the trained weights and their AdamW moments; bf16 halves them (a full student's, mostly)
    master_weights: Literal["fp32", "bf16"] = "fp32"
    ema_decay: float = 0.0  # EMA of the student's trained weights, exported instead of the raw weights; 0 = off
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    resume: str | None = None  # "latest" or a checkpoint folder
    log_every: int = 10
    sample_every: int = 0  # 0 = only at the end
    sample_prompts: list[str] = field(default_factory=list)
    trackers: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    export: Literal["lora", "full", "none", "auto"] = "auto"  # at the end of training; auto = the student type
    progress: bool = True


@dataclass
class Config:
    name: str = "stepdistill"
    model: ModelConfig = field(default_factory=ModelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def check(self) -> None:
        """Value checks the types alone cannot express."""
        positive = {"student.lora_rank": self.student.lora_rank, "train.max_steps": self.train.max_steps,
                    "train.batch_size": self.train.batch_size, "train.grad_accum": self.train.grad_accum,
                    "train.checkpoint_every": self.train.checkpoint_every,
                    "train.max_nonfinite_skips": self.train.max_nonfinite_skips,
                    "train.keep_checkpoints": self.train.keep_checkpoints, "train.log_every": self.train.log_every,
                    "data.resolution": self.data.resolution}
        for key, value in positive.items():
            if value <= 0:
                raise StepdistillError(f"config key '{key}' must be > 0, got {value}")
        if not 0.0 <= self.train.ema_decay < 1.0:
            raise StepdistillError(f"config key 'train.ema_decay' must be in [0, 1), got {self.train.ema_decay}")
        tc = self.train
        # key: (value, lowest allowed, open upper bound); a NaN or infinite value fails every one
        ranges = {"train.lr": (tc.lr, None, math.inf), "student.lora_alpha": (self.student.lora_alpha, None, math.inf),
                  "train.adam_beta1": (tc.adam_beta1, 0.0, 1.0), "train.adam_beta2": (tc.adam_beta2, 0.0, 1.0),
                  "train.weight_decay": (tc.weight_decay, 0.0, math.inf),
                  "train.max_grad_norm": (tc.max_grad_norm, 0.0, math.inf),
                  "student.lora_dropout": (self.student.lora_dropout, 0.0, 1.0)}
        for key, (value, low, high) in ranges.items():  # low None: must be > 0
            if not math.isfinite(value) or not (value > 0 if low is None else value >= low) or not value < high:
                want = "> 0" if low is None else f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g})"
                raise StepdistillError(f"config key '{key}' must be a finite number {want}, got {value}")
        if tc.warmup_steps < 0:
            raise StepdistillError(f"config key 'train.warmup_steps' must be >= 0, got {tc.warmup_steps}")
        if self.data.max_samples is not None and self.data.max_samples <= 0:
            raise StepdistillError(f"config key 'data.max_samples' must be > 0 (or null: no cap), got "
                                   f"{self.data.max_samples}")
        student = self.student
        if student.guidance_embedding and student.type == "lora":
            raise StepdistillError("config key 'student.guidance_embedding' needs student.type=full or small "
                                   "(a LoRA student cannot add the guidance-embedding layer to the base UNet)")
        if tc.master_weights == "bf16" and tc.ema_decay > 0:
            raise StepdistillError("train.master_weights=bf16 cannot keep an EMA (train.ema_decay > 0): bf16 loses "
                                   "updates smaller than 1/256 of a weight; use train.master_weights=fp32")
        if not student.share_base and student.type != "lora":
            raise StepdistillError(f"config key 'student.share_base' applies to LoRA students only (got student.type="
                                   f"{student.type}); a {student.type} student is always its own network")
        if student.architecture and student.type != "small":
            raise StepdistillError(f"config key 'student.architecture' needs student.type=small (got student.type="
                                   f"{student.type}); a {student.type} student has the teacher's architecture")
        if student.type == "small" and not student.architecture:
            raise StepdistillError("student.type=small needs student.architecture: overrides of the teacher UNet's "
                                   "config, e.g. {layers_per_block: 1, mid_block_type: null}")
        if any(not isinstance(k, str) for k in student.architecture):
            raise StepdistillError(f"config key 'student.architecture' must map UNet config names to values, "
                                   f"got keys {list(student.architecture)}")


# ---------------------------------------------------------------------------------------------------------
# Generic typed conversion, shared with objective Options.

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        options = typing.get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads no/off (yes/on) as false (true): `mixed_precision: no`
            spelled = [a for a in options if isinstance(a, str)
                       and a.lower() in (("yes", "on", "true") if value else ("no", "off", "false"))]
            if len(spelled) == 1:
                return spelled[0]
        if value in options:
            return value
        raise StepdistillError(f"config key '{key}' must be one of {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise StepdistillError(f"config key '{key}' must be {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except StepdistillError as err:
                errors.append(err)
        raise StepdistillError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise StepdistillError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise StepdistillError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise StepdistillError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise StepdistillError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise StepdistillError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise StepdistillError(f"config key '{key}' must be a string, got {value!r}")
    raise TypeError(f"unsupported schema type {tp} for {key}")


def from_dict(cls: type, data: Any, prefix: str = ""):
    """Build dataclass `cls` from a mapping, checking every key and type."""
    if data is None:
        data = {}
    where = f"'{prefix}'" if prefix else "the top level"
    if not isinstance(data, dict):
        raise StepdistillError(f"config section {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise StepdistillError(f"unknown config key '{full}'{hint}; allowed in {where}: {', '.join(fields)}")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def _parse_override_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_override(data: dict, override: str) -> None:
    if "=" not in override:
        raise StepdistillError(f"override '{override}' must look like key.sub=value (e.g. train.max_steps=100)")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise StepdistillError(f"override '{override}': '{part}' is not a section")
        node = nxt
    node[parts[-1]] = _parse_override_value(text)


def load_config(path: str | os.PathLike | None, overrides: list[str] = ()) -> Config:
    """Read a YAML config (or the defaults when path is None), apply overrides, validate.

    Objective options stay a free dict here; a run loads its config with `objectives.load_run_config`, which
    checks them too."""
    data: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise StepdistillError(f"config file '{path}' not found; give a YAML file such as configs/shapes/consistency_lora.yaml")
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise StepdistillError(f"config file '{path}' is not valid YAML{where}: {getattr(err, 'problem', err)}") from None
        if not isinstance(data, dict):
            raise StepdistillError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    for override in overrides:
        apply_override(data, override)
    cfg = from_dict(Config, data)
    cfg.check()
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    from .utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))

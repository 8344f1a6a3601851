"""Export a trained student: LoRA (diffusers + kohya/ComfyUI/A1111 files) or a full diffusers pipeline.

Every export folder carries the student's sampling spec (`stepdistill.json`), the scheduler config the student
needs (`scheduler/`), and a model card with a diffusers snippet. Folders are written to a temporary name and
renamed, so an interrupted export never replaces a good one with half a folder.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from .checkpoints import list_checkpoints
from .errors import StepdistillError
from .models import STUDENT_ADAPTER, Teacher
from .sampling import LORA_FILE, SPEC_FILE, SamplingSpec, make_scheduler, scheduler_timesteps
from .utils import atomic_directory, atomic_write_json, check_output_dir

KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"


def pipeline_with_net(teacher: Teacher, net, scheduler):
    """The teacher's diffusers pipeline class with its network (`unet` / `transformer`) and `scheduler` swapped in."""
    import diffusers

    cls = getattr(diffusers, teacher.pipeline_class)
    name = teacher.backbone.component
    components = {k: v for k, v in teacher.components.items() if k not in (name, "scheduler")}
    return cls(**components, **{name: net}, scheduler=scheduler)


def lora_state_dict(net, adapter: str = STUDENT_ADAPTER) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(net, adapter_name=adapter).items()}


def kohya_state_dict(teacher: Teacher, net, adapter: str = STUDENT_ADAPTER) -> dict[str, torch.Tensor]:
    """The kohya / ComfyUI LoRA file of `net`'s adapter, in the teacher family's layout (`Backbone.kohya_state_dict`)."""
    return teacher.backbone.kohya_state_dict(net, adapter)


def merged_network(net, adapter: str = STUDENT_ADAPTER):
    """A plain network (no peft layers) with the LoRA adapter folded into its weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(net)
    for module in merged.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[adapter])
    merged.unload_lora()  # drop the peft wrappers; the merged base weights stay
    return merged


def has_lora_loader(pipeline_class: str) -> bool:
    import diffusers

    return hasattr(getattr(diffusers, pipeline_class, None), "save_lora_weights")


def default_format(student_type: str, pipeline_class: str = "StableDiffusionPipeline") -> str:
    """The export format `auto` means: LoRA for a LoRA student where the family's pipeline loads LoRA files, a full
    pipeline otherwise (full and small students; PixArt, whose pipelines have no load_lora_weights)."""
    return "lora" if student_type == "lora" and has_lora_loader(pipeline_class) else "full"


def check_export_out(out: Path) -> None:
    """Refuse an export folder that is not ours to replace, or that cannot be written, before anything loads."""
    if out.exists() and not (out / SPEC_FILE).is_file():  # replacing an export is fine; anything else is not ours
        raise StepdistillError(f"'{out}' exists and is not a stepdistill export (no {SPEC_FILE}); refusing to "
                               "replace it: choose another --out or remove it yourself")
    check_output_dir(out, "--out", replaced=True)


def export_student(teacher: Teacher, net, spec: SamplingSpec, fmt: str, out: str | os.PathLike,
                   student_type: str, name: str = "stepdistill") -> Path:
    import dataclasses

    from safetensors.torch import save_file

    out = Path(out)
    check_export_out(out)
    if fmt == "lora" and student_type != "lora":
        raise StepdistillError(f"a {student_type} student cannot be exported as LoRA; use --format full "
                               "(or train with student.type=lora)")
    if fmt == "lora" and not has_lora_loader(teacher.pipeline_class):
        raise StepdistillError(f"{teacher.pipeline_class} has no load_lora_weights, so a LoRA file would not load; "
                               "export with --format full (train.export=full): the LoRA is merged into the network")
    spec = dataclasses.replace(spec, format=fmt, base_model=teacher.model_id if fmt == "lora" else None)
    with atomic_directory(out) as tmp:
        if fmt == "lora":
            import diffusers

            cls = getattr(diffusers, teacher.pipeline_class)
            metadata = net.peft_config[STUDENT_ADAPTER].to_dict()
            name = teacher.backbone.component  # unet_lora_layers / transformer_lora_layers
            cls.save_lora_weights(str(tmp), safe_serialization=True, **{f"{name}_lora_layers": lora_state_dict(net),
                                                                        f"{name}_lora_adapter_metadata": metadata})
            if teacher.backbone.kohya_prefix:
                save_file(kohya_state_dict(teacher, net), str(tmp / KOHYA_FILE))
            make_scheduler(spec).save_pretrained(str(tmp / "scheduler"))
        elif fmt == "full":
            plain = merged_network(net) if student_type == "lora" else net
            pipe = pipeline_with_net(teacher, plain, make_scheduler(spec))
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        else:
            raise StepdistillError(f"unknown export format '{fmt}'; use lora or full")
        atomic_write_json(tmp / SPEC_FILE, spec.to_json())
        (tmp / "README.md").write_text(model_card(spec, teacher, str(out), name))
    return out


def model_card(spec: SamplingSpec, teacher: Teacher, path: str, name: str) -> str:
    steps, g = spec.num_inference_steps, spec.guidance_scale
    res = spec.resolution or 512
    pipe_cls = teacher.pipeline_class
    load_kwargs = "".join(f", {k}=None" for k in teacher.absent)  # e.g. SD3 saved without its T5 encoder
    if spec.format == "lora":
        load = (f'pipe = {pipe_cls}.from_pretrained("{spec.base_model}"{load_kwargs})\n'
                f'pipe.load_lora_weights("{path}")\n'
                f'pipe.scheduler = {spec.scheduler_class}.from_pretrained("{path}", subfolder="scheduler")')
        kohya = (f"- `{KOHYA_FILE}`: the same LoRA with kohya keys and per-module alpha, for "
                 f"{teacher.backbone.kohya_readers}\n"
                 if teacher.backbone.kohya_prefix else "")
        files = (f"- `{LORA_FILE}`: diffusers / peft LoRA (`pipe.load_lora_weights`)\n{kohya}"
                 f"- `scheduler/`: the scheduler config the student needs (a base pipeline's default is wrong "
                 f"for few steps)\n")
    else:
        load = f'pipe = {pipe_cls}.from_pretrained("{path}"{load_kwargs})'
        files = (f"- a complete diffusers pipeline folder with the student {teacher.backbone.component} and its "
                 "scheduler\n")
    timesteps = (spec.timesteps or {}).get(steps)
    sigmas = (spec.sigmas or {}).get(steps)
    call = f"num_inference_steps={steps}"
    guidance = ", ".join(f"{k}={v}" if isinstance(v, (int, float)) else f"{k}={v!r}"  # the family's guidance kwargs
                         for k, v in teacher.backbone.pipeline_guidance(g, 1).items())
    if sigmas:  # a flow student: its exported scheduler's own grid is generally not the trained sigmas
        if _own_sigmas(spec, steps) != [float(s) for s in sigmas]:
            call = f"sigmas={[float(s) for s in sigmas]}"
    elif timesteps and _own_timesteps(spec, steps) != [int(t) for t in timesteps]:
        call = f"timesteps={[int(t) for t in timesteps]}"  # the scheduler's own grid is not what the student learned
    return f"""---
library_name: diffusers
tags: [stepdistill, step-distillation, {spec.objective or 'distillation'}]
base_model: {teacher.model_id}
---
# {name}: a {steps}-step student of `{teacher.model_id}`

Distilled with [stepdistill](https://pypi.org/project/stepdistill/) (objective: `{spec.objective}`).
Sample it with `{spec.scheduler_class}`, {steps} steps{f' (timesteps {timesteps})' if timesteps else ''}{f' (sigmas {sigmas})' if sigmas else ''},
guidance scale {g}.

## Files
{files}- `{SPEC_FILE}`: the sampling spec (scheduler, steps, timesteps, guidance) that `stepdistill sample` and
  `stepdistill evaluate` apply

## Use with diffusers
```python
import torch
from diffusers import {pipe_cls}, {spec.scheduler_class}

{load}
generator = torch.Generator("cpu").manual_seed(0)
image = pipe("your prompt", {call}, {guidance}, height={res}, width={res}, generator=generator).images[0]
image.save("sample.png")
```
"""


def _own_timesteps(spec: SamplingSpec, steps: int) -> list[int] | None:
    """The timesteps the exported scheduler config picks by itself for `steps` steps (None: it refuses them)."""
    try:
        return scheduler_timesteps(spec.scheduler_class, spec.scheduler_config, steps)
    except StepdistillError:
        return None


def _own_sigmas(spec: SamplingSpec, steps: int) -> list[float] | None:
    """The sigmas (without the final 0) the exported scheduler picks by itself for `steps` steps."""
    sched = make_scheduler(spec)
    try:
        sched.set_timesteps(steps)
    except ValueError:
        return None
    return [float(s) for s in sched.sigmas[:-1]]


def export_run(run_dir: str | os.PathLike, fmt: str = "auto", out: str | os.PathLike | None = None,
               checkpoint: str | None = None, device: str = "cpu") -> Path:
    """Rebuild the student of a run from its config and weights (final, or a checkpoint) and export it."""
    from safetensors.torch import load_file

    from .models import build_student, load_teacher, load_trainable_state_dict
    from .objectives import load_run_config

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise StepdistillError(f"run folder '{run_dir}' does not exist; give the train.output_dir of a run")
    if (run_dir / SPEC_FILE).is_file():
        raise StepdistillError(f"'{run_dir}' is an export, not a run folder; `stepdistill export` takes the "
                               "train.output_dir of a run (sample or evaluate an export as it is)")
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "sampling_spec.json").is_file():
        raise StepdistillError(f"'{run_dir}' is not a stepdistill run folder (no config.yaml / sampling_spec.json); "
                               "give the train.output_dir of a run")
    check_export_out(Path(out) if out is not None else run_dir / "export")  # before the teacher loads
    cfg = load_run_config(run_dir / "config.yaml")
    if checkpoint is None:
        weights = run_dir / "final" / "student.safetensors"
        if not weights.is_file():
            ckpts = list_checkpoints(run_dir)
            if not ckpts:
                raise StepdistillError(f"run '{run_dir}' has no final weights and no checkpoint to export")
            weights = ckpts[-1] / "model.safetensors"
    else:
        if not Path(checkpoint).exists():
            names = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
            raise StepdistillError(f"--checkpoint '{checkpoint}' does not exist; give a checkpoint folder of the "
                                   f"run ({run_dir / 'checkpoints'}: {names}) or its model.safetensors")
        weights = Path(checkpoint) / "model.safetensors" if Path(checkpoint).is_dir() else Path(checkpoint)
    if not weights.is_file():
        raise StepdistillError(f"weights '{weights}' not found; give a checkpoint folder that holds "
                               "model.safetensors (RUN/checkpoints/checkpoint-N)")
    teacher = load_teacher(cfg.model, device).at_resolution(cfg.data.resolution)
    net = build_student(teacher, cfg.student)
    try:
        state = load_file(str(weights))
    except Exception as err:
        raise StepdistillError(f"weights '{weights}' are corrupt ({err})") from None
    load_trainable_state_dict(net, state, f"weights '{weights}'")
    import json

    spec = SamplingSpec.from_json(json.loads((run_dir / "sampling_spec.json").read_text()))
    fmt = default_format(cfg.student.type, teacher.pipeline_class) if fmt == "auto" else fmt
    return export_student(teacher, net, spec, fmt, out or run_dir / "export", cfg.student.type, cfg.name)

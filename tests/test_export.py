"""Exports load exactly in diffusers: LoRA (peft and kohya files), full pipelines, the sampling spec."""
import json
import re

import pytest
import torch

from stepdistill.config import ModelConfig, StudentConfig
from stepdistill.errors import StepdistillError
from stepdistill.export import KOHYA_FILE, export_student
from stepdistill.models import build_student, load_teacher
from stepdistill.objectives import DistillSetup, get_objective
from stepdistill.sampling import SamplingSpec, load_pipeline


def _trained_student(teacher_path, student_type="lora"):
    torch.manual_seed(0)
    teacher = load_teacher(ModelConfig(teacher=teacher_path), "cpu")
    # rank 4, alpha 12: alpha != rank, so a loader that assumes alpha = rank is off by 3x
    student = build_student(teacher, StudentConfig(type=student_type, lora_rank=4, lora_alpha=12))
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    cls = get_objective("consistency")
    obj = cls(DistillSetup(teacher, student, student_type, 1e-4, 32, torch.device("cpu")),
              cls.parse_options({"num_ddim_timesteps": 20, "num_inference_steps": 2}))
    return teacher, student, obj.sampling_spec()


def _unet_out(unet, cond, adapter_on=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999, 499])
    from stepdistill.backbones import UNetBackbone

    with torch.no_grad():  # the UNet's own call, SDXL's added conditions included
        return UNetBackbone().predict(unet, unet, x, t, cond, None)


def _targets_mix_attention_and_conv(unet):
    from peft.tuners.lora import LoraLayer

    names = [n for n, m in unet.named_modules() if isinstance(m, LoraLayer)]
    return any("attn" in n for n in names) and any(n.endswith(("conv1", "conv2")) for n in names)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_lora_export_round_trips_through_load_lora_weights(family, tiny_sd, tiny_sdxl, tmp_path):
    path = tiny_sd if family == "sd" else tiny_sdxl
    teacher, student, spec = _trained_student(path)
    assert _targets_mix_attention_and_conv(student)
    cond = teacher.prompt_encoder(["a red circle", "blue"], 32)
    expected = _unet_out(student, cond)
    base_out = None
    from stepdistill.denoiser import adapter_scope

    with adapter_scope(student, None):
        base_out = _unet_out(student, cond)
    out = export_student(teacher, student, spec, "lora", tmp_path / "lora", "lora")

    pipe, loaded_spec = load_pipeline(str(out))
    got = _unet_out(pipe.unet, cond)
    assert (got - expected).abs().max() < 1e-5
    assert (base_out - expected).abs().max() > 1e-3  # the LoRA really changes the output
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    assert loaded_spec.base_model == path and loaded_spec.format == "lora"

    # the kohya file: per-module alpha, and diffusers' own kohya converter loads it to the same weights
    from safetensors.torch import load_file

    kohya = load_file(str(out / KOHYA_FILE))
    alphas = {k: v for k, v in kohya.items() if k.endswith(".alpha")}
    assert alphas and all(float(v) == 12.0 for v in alphas.values())
    assert all(re.match(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$", k) for k in kohya)
    import diffusers

    cls = getattr(diffusers, teacher.pipeline_class)
    pipe_k = cls.from_pretrained(path, **({"safety_checker": None} if family == "sd" else {}))
    pipe_k.load_lora_weights(str(out), weight_name=KOHYA_FILE)
    assert (_unet_out(pipe_k.unet, cond) - expected).abs().max() < 1e-5


def test_full_export_loads_with_from_pretrained_and_carries_the_schedule(tiny_sd, tmp_path):
    teacher, student, spec = _trained_student(tiny_sd, "lora")
    cond = teacher.prompt_encoder(["a red circle", "blue"], 32)
    expected = _unet_out(student, cond)
    out = export_student(teacher, student, spec, "full", tmp_path / "full", "lora")  # LoRA merged into a full UNet
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    assert not getattr(pipe.unet, "_hf_peft_config_loaded", False)
    assert (_unet_out(pipe.unet, cond) - expected).abs().max() < 1e-4
    saved = SamplingSpec.read(str(out))
    pipe.scheduler.set_timesteps(2)
    assert [int(t) for t in pipe.scheduler.timesteps] == saved.timesteps[2] == spec.timesteps[2]
    assert type(pipe.scheduler).__name__ == saved.scheduler_class == "LCMScheduler"


def test_export_replaces_atomically_and_keeps_old_on_failure(tiny_sd, tmp_path, monkeypatch):
    teacher, student, spec = _trained_student(tiny_sd)
    out = export_student(teacher, student, spec, "lora", tmp_path / "exp", "lora")
    before = (out / "pytorch_lora_weights.safetensors").read_bytes()
    import stepdistill.export as ex

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "kohya_state_dict", boom)
    with pytest.raises(RuntimeError):
        export_student(teacher, student, spec, "lora", out, "lora")
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]  # no temporary folder left behind


def test_model_card_snippet_runs_as_written(tiny_sd, tmp_path):
    teacher, student, spec = _trained_student(tiny_sd)
    out = export_student(teacher, student, spec, "lora", tmp_path / "card", "lora")
    card = (out / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    code = code.replace(".from_pretrained(\"" + tiny_sd + "\")",
                        ".from_pretrained(\"" + tiny_sd + "\", safety_checker=None)")
    code = code.replace('image.save("sample.png")', f'image.save("{tmp_path}/sample.png")')
    exec(compile(code, "model-card", "exec"), {})
    from PIL import Image

    assert Image.open(tmp_path / "sample.png").size == (32, 32)


def test_export_run_command(tiny_sd, tmp_path):
    from conftest import run_config
    from stepdistill.cli import main
    from stepdistill.trainer import Trainer

    Trainer(run_config(tiny_sd, tmp_path / "run", **{"train.max_steps": 2})).train()
    assert main(["export", str(tmp_path / "run"), "--format", "full", "--out", str(tmp_path / "ex")]) == 0
    spec = json.loads((tmp_path / "ex" / "stepdistill.json").read_text())
    assert spec["format"] == "full" and spec["objective"] == "consistency"
    assert main(["sample", str(tmp_path / "ex"), "--prompt", "a red circle", "--num-images", "2",
                 "--out", str(tmp_path / "g.png"), "--steps", "1"]) == 0
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (64, 32)


def test_teacher_errors_are_one_line(tmp_path, tiny_sd, capsys):
    with pytest.raises(StepdistillError, match="does not exist"):
        load_teacher(ModelConfig(teacher=str(tmp_path / "missing")), "cpu")
    with pytest.raises(StepdistillError, match="no model_index.json"):
        load_teacher(ModelConfig(teacher=str(tmp_path)), "cpu")
    fake = tmp_path / "flux"
    fake.mkdir()
    (fake / "model_index.json").write_text(json.dumps({"_class_name": "WuerstchenDecoderPipeline"}))
    with pytest.raises(StepdistillError, match="unsupported teacher .* WuerstchenDecoderPipeline"):
        load_teacher(ModelConfig(teacher=str(fake)), "cpu")
    with pytest.raises(StepdistillError, match="trust_remote_code"):
        load_teacher(ModelConfig(teacher=tiny_sd, trust_remote_code=True), "cpu")
    from stepdistill.cli import main

    assert main(["train", "configs/shapes/consistency_lora.yaml", f"model.teacher={tmp_path}/missing"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: teacher path") and "\n" not in err
    assert main(["train", "configs/shapes/consistency_lora.yaml", "train.batch_size=-1"]) == 2
    assert "train.batch_size" in capsys.readouterr().err

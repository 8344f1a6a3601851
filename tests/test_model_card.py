"""Students sampled as they were trained, everywhere a user samples them (issue 14, item 4): the exported scheduler
config, the model card's diffusers snippet, `stepdistill sample` and the trainer's own rollout agree."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_config

PROMPT = "a small red circle at the center on a black background"


@pytest.fixture(scope="module")
def dmd_699(tiny_sd, tmp_path_factory):
    """A one-step DMD LoRA student trained at t = 699 (two steps: the weights only need to be the trained ones)."""
    from stepdistill.trainer import Trainer

    out = tmp_path_factory.mktemp("dmd699") / "run"
    cfg = run_config(tiny_sd, out, **{"objective.name": "dmd", "objective.options.num_ddim_timesteps": None,
                                      "objective.options.student_timesteps": "[699]", "train.max_steps": 2,
                                      "train.export": "lora", "objective.options.fake_lora_rank": 4})
    trainer = Trainer(cfg)
    trainer.train()
    return trainer, out / "export"


def test_exported_scheduler_alone_gives_the_trained_timestep(dmd_699):
    from stepdistill.sampling import scheduler_timesteps

    _, export = dmd_699
    config = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler_timesteps("LCMScheduler", config, 1) == [699]  # a plain num_inference_steps=1 call


def test_model_card_snippet_reproduces_the_trainers_rollout(dmd_699, tmp_path):
    trainer, export = dmd_699
    card = (export / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1).replace("your prompt", PROMPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "first timestep" not in res.stderr  # diffusers' warning about custom timesteps: none are needed
    snippet = np.asarray(Image.open(tmp_path / "sample.png").convert("RGB")).astype(int)

    # the trainer's own rollout from the same starting noise: x0 = G(x_T) at t = 699, decoded by the VAE
    obj, teacher = trainer.objective, trainer.teacher
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(0))
    with torch.no_grad():
        x0 = obj.student_x0(noise, 699, teacher.prompt_encoder([PROMPT], 32))
        pixels = teacher.vae.decode(x0 / teacher.vae.config.scaling_factor).sample
    rollout = ((pixels[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(int)
    assert np.abs(snippet - rollout).max() <= 1

    # and stepdistill sample gives the same image
    from stepdistill.cli import main

    assert main(["sample", str(export), "--prompt", PROMPT, "--num-images", "1", "--out", str(tmp_path / "s.png")]) == 0
    sampled = np.asarray(Image.open(tmp_path / "s.png").convert("RGB")).astype(int)
    assert np.abs(sampled - snippet).max() <= 1


def test_model_card_passes_timesteps_when_the_scheduler_cannot_give_them(tiny_sd):
    """[899, 599] is on no LCMScheduler grid: the snippet must name the timesteps itself."""
    from stepdistill.config import ModelConfig
    from stepdistill.export import model_card
    from stepdistill.models import load_teacher
    from stepdistill.sampling import SamplingSpec, lcm_config_for

    teacher = load_teacher(ModelConfig(teacher=tiny_sd), torch.device("cpu"))
    config = {**teacher.scheduler_config, "timestep_scaling": 1000.0}
    assert lcm_config_for(config, [899, 599]) is None
    spec = SamplingSpec(format="full", scheduler_class="LCMScheduler", scheduler_config=config,
                        num_inference_steps=2, timesteps={2: [899, 599], 1: [899]}, guidance_scale=1.0)
    card = model_card(spec, teacher, "EXPORT", "x")
    assert "timesteps=[899, 599]" in card and "num_inference_steps" not in card.split("```python")[1]
    spec.timesteps = {2: [999, 499]}  # LCMScheduler's own two-step grid: a plain call is right
    assert "num_inference_steps=2" in model_card(spec, teacher, "EXPORT", "x")

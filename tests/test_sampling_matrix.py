"""The exported sampling spec reproduces the training-time timesteps and rollout for eps, v and x0 teachers on
linear, scaled_linear and squaredcos schedules (issue 14, item 6, the sampling half)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

PROMPT = "a red circle"


@pytest.mark.parametrize("timesteps", [[699], [699, 299]], ids=["1step-699", "2step-699-299"])
@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_dmd_spec_samples_the_trained_rollout(tmp_path, prediction_type, beta_schedule, timesteps):
    from stepdistill.config import ModelConfig, StudentConfig
    from stepdistill.export import pipeline_with_net
    from stepdistill.models import build_student, load_teacher
    from stepdistill.objectives import DistillSetup, get_objective
    from stepdistill.sampling import generate, make_scheduler, scheduler_timesteps
    from stepdistill.testing import build_tiny_pipeline

    path = build_tiny_pipeline(tmp_path / "pipe", prediction_type=prediction_type, beta_schedule=beta_schedule)
    teacher = load_teacher(ModelConfig(teacher=str(path)), torch.device("cpu"))
    assert teacher.schedule.prediction_type == {"epsilon": "epsilon", "v_prediction": "v_prediction",
                                                "sample": "sample"}[prediction_type]
    student = build_student(teacher, StudentConfig(type="full"))
    cls = get_objective("dmd")
    obj = cls(DistillSetup(teacher, student, "full", 1e-4, 32, torch.device("cpu")),
              cls.parse_options({"num_steps": len(timesteps), "student_timesteps": timesteps}))
    spec = obj.sampling_spec()
    n = len(timesteps)
    explicit = (spec.timesteps or {}).get(n)
    own = scheduler_timesteps(spec.scheduler_class, spec.scheduler_config, n)
    assert (explicit or own) == timesteps and (explicit == timesteps or own == timesteps)
    if n == 1:  # on LCMScheduler's own grid: a plain num_inference_steps call is right
        assert own == timesteps

    pipe = pipeline_with_net(teacher, student.eval(), make_scheduler(spec))
    pipe.set_progress_bar_config(disable=True)
    image = np.asarray(generate(pipe, spec, [PROMPT], [7])[0]).astype(int)

    # the objective's own rollout (what training feeds the student), from the same seed's noise stream
    gen = torch.Generator("cpu").manual_seed(7)
    x = torch.randn((4, 8, 8), generator=gen)[None]
    cond = teacher.prompt_encoder([PROMPT], 32)
    with torch.no_grad():
        for j, t in enumerate(timesteps):
            x0 = obj.student_x0(x, t, cond)
            if j + 1 < n:  # re-noised with fresh noise to the next timestep, as LCMScheduler does
                noise = torch.randn((1, 4, 8, 8), generator=gen)
                x = obj.schedule.add_noise(x0, noise, torch.tensor([timesteps[j + 1]]))
        pixels = teacher.vae.decode(x0 / teacher.vae.config.scaling_factor).sample
    rollout = ((pixels[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(int)
    assert np.abs(image - rollout).max() <= 1

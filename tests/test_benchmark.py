"""`stepdistill benchmark` and the memory options it reports on (issue 13, item 2)."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from conftest import run_config


def _dmd_config(teacher, out, **overrides):
    base = {"objective.name": "dmd", "objective.options.gan_weight": 0.1, "objective.options.fake_lora_rank": 4,
            "objective.options.fake_lora_alpha": 8, "objective.options.ttur": 2, "data.max_samples": 32,
            "objective.options.num_ddim_timesteps": None}
    base.update(overrides)
    return run_config(teacher, out, **base)


def _trained(trainer) -> dict[str, torch.Tensor]:
    return {f"{name}/{i}": p.detach().clone() for name, ps in trainer.params.items() for i, p in enumerate(ps)}


def _steps_then_weights(trainer, steps: int) -> dict[str, torch.Tensor]:
    """`steps` training steps, then the trained weights; the trainer is closed."""
    for _ in range(steps):
        trainer._train_step()
        trainer.state.step += 1
    weights = _trained(trainer)
    trainer.close()
    return weights


def test_profiled_steps_compute_what_unprofiled_steps_compute(tiny_sd, tmp_path):
    """The profiler only times: after the same steps, every trained weight is bitwise what an unprofiled run has."""
    from stepdistill.benchmark import StepProfiler
    from stepdistill.trainer import Trainer

    def run(profiled: bool, out):
        trainer = Trainer(_dmd_config(tiny_sd, out))
        with StepProfiler(trainer) if profiled else contextlib.nullcontext():
            return _steps_then_weights(trainer, 3)

    plain, profiled = run(False, tmp_path / "a"), run(True, tmp_path / "b")
    assert plain.keys() == profiled.keys()
    assert all(torch.equal(plain[k], profiled[k]) for k in plain)


def test_benchmark_accounts_for_every_pass_of_a_dmd2_step(tiny_sd, tmp_path):
    from stepdistill.benchmark import run_benchmark

    result = run_benchmark(_dmd_config(tiny_sd, tmp_path / "run"), warmup=1, steps=4, repeats=1,
                           teacher_memory=False, label="dmd2")
    phases = {(p["update"], p["phase"]): p for p in result.phases}
    # ttur=2 over 4 steps: the student updates twice, fake score and discriminator four times each
    assert phases[("student", "backward")]["calls_per_step"] == pytest.approx(0.5)
    assert phases[("fake", "backward")]["calls_per_step"] == pytest.approx(1.0)
    assert phases[("disc", "backward")]["calls_per_step"] == pytest.approx(1.0)
    # one student sample with grad per student update, none in the other networks' updates
    assert phases[("student", "student forward (grad)")]["calls_per_step"] == pytest.approx(0.5)
    assert ("fake", "student forward (grad)") not in phases
    assert ("fake", "fake score forward (grad)") in phases and ("student", "teacher forward") in phases
    # exclusive phases never count a second more than the step took
    assert sum(p["ms_per_step"] for p in result.phases if p["phase"] != "framework (rest)") <= result.step_ms * 1.001
    labels = {b["pass"] for b in result.bare}
    assert {"student forward + backward", "teacher forward", "fake score forward + backward",
            "text encoder forward"} <= labels
    assert any(label.startswith("disc forward") for label in labels)
    assert result.bare_ms_per_step > 0 and 0.3 < result.overhead_ratio < 20
    assert result.trained_params.keys() == {"student", "fake", "disc"}


def test_benchmark_command_writes_json_and_markdown(tiny_sd, tmp_path, capsys):
    from stepdistill.cli import main

    cfg_overrides = [f"model.teacher={tiny_sd}", "train.batch_size=2", "data.max_samples=16", "student.lora_rank=4",
                     "objective.options.num_ddim_timesteps=10"]
    out = tmp_path / "bench"
    assert main(["benchmark", "configs/shapes/consistency_lora.yaml", *cfg_overrides, "--steps", "2", "--warmup",
                 "1", "--repeats", "1", "--out", str(out)]) == 0
    data = json.loads((out / "benchmark.json").read_text())
    assert data["overhead_ratio"] > 0 and data["peak_memory_mib"] > 0
    assert data["teacher_peak_memory_mib"] > 0 and data["memory_ratio_to_teacher"] > 0
    assert "overhead ratio" in (out / "benchmark.md").read_text()
    assert not (tmp_path / "runs").exists()  # nothing of the trainer's run folder is kept


def test_gradient_checkpointing_recomputes_under_the_forward_adapter(tiny_sd, tmp_path):
    """With student and fake score as adapters on one base, a checkpointed block is recomputed in the backward pass,
    after the adapter scope has exited: the gradients must still be those of the adapter that ran forward."""
    from stepdistill.trainer import Trainer

    def grads(checkpointing: str):
        cfg = _dmd_config(tiny_sd, tmp_path / checkpointing, **{"objective.options.gan_weight": 0.0,
                                                                   "objective.options.ttur": 1})
        trainer = Trainer(cfg)
        unet = trainer.teacher.net
        if checkpointing == "ours":
            from stepdistill.denoiser import enable_gradient_checkpointing

            enable_gradient_checkpointing(unet)
        elif checkpointing == "plain":
            unet.enable_gradient_checkpointing()
        out = {}
        for name in ("student", "fake"):
            for p in trainer.params[name]:
                p.grad = None
            gen = trainer._generator(0, 0, 1000)
            batch = trainer._batch(trainer._generator(0, 0, 0))
            trainer.objective.losses(name, batch, gen)["loss"].backward()
            out[name] = torch.cat([p.grad.flatten() for p in trainer.params[name]])
        trainer.close()
        return out

    reference, ours, plain = grads("none"), grads("ours"), grads("plain")
    for name in ("student", "fake"):
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-5, atol=1e-7)
    # the test can fail: diffusers' own checkpointing recomputes the fake score's blocks with the student adapter
    assert not torch.allclose(plain["fake"], reference["fake"], rtol=1e-3, atol=1e-6)


def test_gradient_checkpointing_option_trains_the_same_as_without(tiny_sd, tmp_path):
    from stepdistill.trainer import Trainer

    def run(flag: bool):
        trainer = Trainer(run_config(tiny_sd, tmp_path / str(flag), **{"train.gradient_checkpointing": flag}))
        assert trainer.student.is_gradient_checkpointing == flag
        return _steps_then_weights(trainer, 2)

    a, b = run(False), run(True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_text_embedding_cache_gives_each_caption_its_own_encoding(tiny_sd, tmp_path):
    from stepdistill.trainer import Trainer

    trainer = Trainer(run_config(tiny_sd, tmp_path / "run", **{"data.cache_text_embeddings": True}))
    calls = []
    encoder = trainer.teacher.prompt_encoder
    original = type(encoder).__call__

    class Counting(type(encoder)):
        def __call__(self, prompts, resolution=None):
            calls.append(list(prompts))
            return original(self, prompts, resolution)

    encoder.__class__ = Counting
    prompts = ["a red circle", "a blue square", "a red circle"]
    cond = trainer._encode_cached(prompts)
    again = trainer._encode_cached(list(reversed(prompts)))
    assert calls == [["a red circle"], ["a blue square"]]  # each distinct caption once, alone; then reused
    direct = original(encoder, prompts, trainer.cfg.data.resolution)
    torch.testing.assert_close(cond.embeds, direct.embeds, rtol=1e-5, atol=1e-6)
    assert torch.equal(again.embeds, cond.embeds.flip(0))
    trainer.close()


def test_bf16_master_weights_train(tiny_sd, tmp_path):
    from stepdistill.trainer import Trainer

    trainer = Trainer(run_config(tiny_sd, tmp_path / "run", **{"train.master_weights": "bf16"}))
    assert {p.dtype for p in trainer.params["student"]} == {torch.bfloat16}
    before = _trained(trainer)
    logs = trainer._train_step()
    assert torch.isfinite(torch.tensor(logs["loss"])) and logs["nonfinite_skips"] == 0
    after = _trained(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    trainer.close()


def test_lora_student_on_its_own_base(tiny_sd, tmp_path):
    from stepdistill.trainer import Trainer

    trainer = Trainer(run_config(tiny_sd, tmp_path / "run", **{"student.share_base": False}))
    assert trainer.student is not trainer.teacher.net
    assert not getattr(trainer.teacher.net, "_hf_peft_config_loaded", False)  # the teacher holds no adapter
    trainer._train_step()
    trainer.close()

"""student.type=small: a smaller UNet from the teacher's config with overrides (BK-SDM style), initialised from
the teacher where names and shapes match, trained as a full student and exported as a full pipeline."""
import json

import pytest
import torch

from conftest import run_config
from stepdistill.config import ModelConfig, StudentConfig
from stepdistill.errors import StepdistillError
from stepdistill.models import build_student, load_teacher, small_network

SHAPES = "assets/shapes-teacher"
# the architecture of configs/shapes/small_student_dmd2.yaml
SHAPES_HALF = {"mid_block_type": None, "layers_per_block": [1, 1, 0],
               "up_block_types": ["UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]}
# on the tiny SD teacher (block_out_channels 32, 64): no mid-block, a narrower second block (partly fresh)
TINY_SMALL = {"mid_block_type": None, "block_out_channels": [32, 48]}


def _n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def _unet_out(unet, cond, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(cond), 4, 8, 8, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([999, 400][:len(cond)]), encoder_hidden_states=cond.embeds).sample


def _small(teacher_path, architecture, **kwargs):
    teacher = load_teacher(ModelConfig(teacher=teacher_path))
    return teacher, build_student(teacher, StudentConfig(type="small", architecture=architecture, **kwargs))


def test_copied_tensors_equal_the_teachers_and_the_counts_add_up(tiny_sd):
    teacher, student = _small(tiny_sd, TINY_SMALL)
    source, target = teacher.net.state_dict(), student.state_dict()
    report = student.init_report
    fresh = set(report["fresh"])
    assert not report["fresh_truncated"] and report["fresh_tensors"] == len(fresh) > 0
    copied = [k for k in target if k not in fresh]
    assert report["copied_tensors"] == len(copied) > 0
    for k in copied:  # name and shape match, values exactly the teacher's
        assert source[k].shape == target[k].shape and torch.equal(source[k].float(), target[k]), k
    for k in fresh:  # only tensors the teacher lacks, or has with another shape
        assert k not in source or source[k].shape != target[k].shape, k
    assert report["copied_tensors"] + report["fresh_tensors"] == report["tensors"] == len(target)
    values = sum(v.numel() for v in target.values())
    assert report["copied_values"] + report["fresh_values"] == values
    assert report["copied_values"] == sum(target[k].numel() for k in copied)
    assert report["student_parameters"] == _n_params(student) and report["teacher_parameters"] == _n_params(teacher.net)
    assert "copied from the teacher" in report["summary"] and "down_blocks.1" in report["summary"]
    assert all(p.requires_grad and p.dtype == torch.float32 for p in student.parameters())


def test_fewer_layers_keep_the_first_layer_of_each_block_as_bk_sdm_does():
    from diffusers import UNet2DConditionModel

    from stepdistill.testing import tiny_unet_config

    torch.manual_seed(0)
    teacher = UNet2DConditionModel(**{**tiny_unet_config(32), "layers_per_block": 2})
    student = small_network(teacher, {"layers_per_block": 1})
    assert [len(b.resnets) for b in student.down_blocks] == [1, 1] and [len(b.resnets) for b in student.up_blocks] == [2, 2]
    source = teacher.state_dict()
    for k, v in student.state_dict().items():
        if k.startswith("down_blocks.") and (".resnets.0." in k or ".attentions.0." in k):
            assert torch.equal(source[k], v), k  # the first layer of each block is the teacher's
    assert not any(".resnets.2." in k for k in student.state_dict())


def test_smaller_student_has_fewer_parameters_and_runs(tmp_path):
    teacher, student = _small(SHAPES, SHAPES_HALF)
    n, n_teacher = _n_params(student), _n_params(teacher.net)
    assert (n, n_teacher) == (865_540, 1_539_204)  # the numbers in configs/shapes/small_student_dmd2.yaml
    assert student.mid_block is None and student.init_report["fresh_tensors"] == 0
    cond = teacher.prompt_encoder(["a small red circle", "a blue square"], 32)
    out = _unet_out(student, cond)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    # the same config builds the same student (export_run rebuilds it), and leaves the global RNG alone
    state = torch.random.get_rng_state()
    narrower = StudentConfig(type="small", architecture={"block_out_channels": [32, 48, 64]})
    again = build_student(teacher, narrower)
    assert torch.equal(torch.random.get_rng_state(), state)
    twice = build_student(teacher, narrower)
    assert again.init_report["fresh_tensors"] > 0
    b = twice.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in again.state_dict().items())


def test_small_student_with_guidance_embedding(tiny_sd):
    _, student = _small(tiny_sd, {"mid_block_type": None}, guidance_embedding=True, guidance_embedding_dim=16)
    assert student.config.time_cond_proj_dim == 16 and student.mid_block is None
    assert student.init_report["fresh"] == ["time_embedding.cond_proj.weight"]
    assert not student.time_embedding.cond_proj.weight.detach().any()


@pytest.mark.parametrize("objective,opts", [
    ("consistency", {}),
    ("dmd", {"objective.options.num_steps": 2, "objective.options.fake_lora_rank": 4}),
])
def test_small_student_trains_and_exports_a_full_pipeline(tiny_sd, tmp_path, objective, opts):
    from diffusers import StableDiffusionPipeline

    from stepdistill.export import export_run
    from stepdistill.trainer import Trainer

    # objective.options is reset (to the defaults) before the objective's own options: run_config's are LCM's
    over = {"student.type": "small", "student.architecture": json.dumps(TINY_SMALL), "train.export": "auto",
            "train.batch_size": 2, "objective.name": objective, "objective.options": "{}", **opts}
    trainer = Trainer(run_config(tiny_sd, tmp_path / "run", **over))
    teacher_unet = {k: v.clone() for k, v in trainer.teacher.net.state_dict().items()}
    trainer.train()
    run = tmp_path / "run"
    init = json.loads((run / "student_init.json").read_text())
    assert init["architecture"] == TINY_SMALL and init["copied_tensors"] + init["fresh_tensors"] == init["tensors"]
    assert json.loads((run / "export" / "stepdistill.json").read_text())["format"] == "full"
    trained = trainer.student_for_export()
    assert any(not torch.equal(v, teacher_unet[k]) for k, v in trained.state_dict().items()
               if k in teacher_unet and v.shape == teacher_unet[k].shape)  # it did train
    cond = trainer.teacher.prompt_encoder(["a red circle", "blue"], 32)
    expected = _unet_out(trained, cond)
    pipe = StableDiffusionPipeline.from_pretrained(str(run / "export"), safety_checker=None)
    assert pipe.unet.mid_block is None and list(pipe.unet.config.block_out_channels) == [32, 48]
    assert torch.equal(_unet_out(pipe.unet, cond), expected)
    # the run folder exports again from its config and weights (the student is rebuilt, then loaded)
    again = export_run(run, out=tmp_path / "again")
    reloaded = StableDiffusionPipeline.from_pretrained(str(again), safety_checker=None)
    assert torch.equal(_unet_out(reloaded.unet, cond), expected)
    with pytest.raises(StepdistillError, match="a small student cannot be exported as LoRA"):
        export_run(run, fmt="lora", out=tmp_path / "lora")


@pytest.mark.parametrize("overrides,message", [
    ({"student.type": "full", "student.architecture": "{layers_per_block: 1}"},
     "config key 'student.architecture' needs student.type=small"),
    ({"student.architecture.mid_block_type": "null"}, "config key 'student.architecture' needs student.type=small"),
    ({"student.type": "small"}, "student.type=small needs student.architecture"),
    ({"student.type": "lora", "student.guidance_embedding": "true"}, "needs student.type=full or small"),
])
def test_config_errors_are_one_line(tmp_path, overrides, message):
    from stepdistill.config import load_config

    with pytest.raises(StepdistillError, match=message) as err:
        load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("architecture,message", [
    ({"layers_per_blok": 1}, "unknown UNet2DConditionModel config key 'student.architecture.layers_per_blok' "
                             r"\(did you mean 'layers_per_block'\?\)"),
    ({"cross_attention_dim": 64}, "'student.architecture.cross_attention_dim' must stay the teacher's"),
    ({"block_out_channels": [32]}, "student.architecture .* does not make a valid UNet2DConditionModel"),
    ({"down_block_types": ["NoSuchBlock2D", "DownBlock2D"]}, "student.architecture .* does not make a valid"),
])
def test_bad_architectures_are_one_line_errors(tiny_sd, architecture, message):
    with pytest.raises(StepdistillError, match=message) as err:
        _small(tiny_sd, architecture)
    assert "\n" not in str(err.value)

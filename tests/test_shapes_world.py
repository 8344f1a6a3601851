"""The bundled shapes world: deterministic data, the committed teacher, and the evaluation models."""
import numpy as np
import pytest
import torch

from stepdistill.data import shapes
from stepdistill.shapes_eval import EVAL_DIR, FLOW_TEACHER_DIR, TEACHER_DIR, TEACHER_V_DIR


def _pixels(item):
    return np.asarray(item["image"])


def test_samples_are_deterministic_and_order_free():
    a = shapes.ShapesDataset("train", length=50)
    b = shapes.ShapesDataset("train", length=50)
    for i in (49, 3, 17):  # any order, fresh objects: same sample
        assert a[i]["caption"] == b[i]["caption"] and np.array_equal(_pixels(a[i]), _pixels(b[i]))
    other_seed = shapes.ShapesDataset("train", length=50, seed=1)
    assert any(other_seed[i]["caption"] != a[i]["caption"] for i in range(10))


def test_splits_are_disjoint():
    seen = {}
    for split in shapes.SPLITS:
        ds = shapes.ShapesDataset(split, length=300)
        for i in range(len(ds)):
            key = _pixels(ds[i]).tobytes()
            assert seen.setdefault(key, split) == split, f"an image of {split} is also in {seen[key]}"


def test_captions_parse_back_to_labels_and_vocabulary_is_covered():
    ds = shapes.ShapesDataset("val", length=200)
    seen = {name: set() for name in shapes.ATTRIBUTE_NAMES}
    for i in range(len(ds)):
        item = ds[i]
        parsed = shapes.parse_caption(item["caption"])
        for name in shapes.ATTRIBUTE_NAMES:
            assert parsed[name] == item["labels"][name], (item["caption"], name)
            seen[name].add(item["labels"][name])
        assert item["image"].size == (32, 32)
    assert len(seen["shape"]) >= 4 and len(seen["color"]) >= 6 and len(seen["background"]) >= 4
    assert len(seen["position"]) == 9
    with pytest.raises(ValueError):
        shapes.parse_caption("a tiny teal hexagon")


def test_prompts_come_from_the_grammar():
    prompts = shapes.shapes_prompts("test", n=20)
    assert len(prompts) == 20 and all(shapes.parse_caption(p) for p in prompts)
    assert shapes.shapes_prompts("test", n=20) == prompts


needs_teacher = pytest.mark.skipif(not (TEACHER_DIR / "model_index.json").is_file(),
                                   reason="assets/shapes-teacher not built (tools/shapes/train_teacher.py)")
# both bundled UNet teachers: eps on linear betas, v-prediction on scaled_linear (SD2.1-like)
BUNDLED_TEACHERS = pytest.mark.parametrize("teacher_dir", [TEACHER_DIR, TEACHER_V_DIR], ids=["eps", "v"])
needs_eval = pytest.mark.skipif(not (EVAL_DIR / "shapes_encoder.safetensors").is_file(),
                                reason="assets/shapes-eval not built (tools/shapes/build_eval_models.py)")


@needs_teacher
@BUNDLED_TEACHERS
def test_committed_teacher_loads_offline_and_generates(teacher_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(teacher_dir), safety_checker=None)
    tok = pipe.tokenizer
    for word in shapes.all_words():  # every world word is one token
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    out = pipe(["a large red circle at the center on a black background"], num_inference_steps=4,
               guidance_scale=3.0, height=32, width=32, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (1, 32, 32, 3) and out.std() > 0.05


@needs_teacher
@needs_eval
@BUNDLED_TEACHERS
def test_committed_teacher_follows_its_prompts_at_25_steps_and_not_at_1(teacher_dir):
    """The gap distillation closes: the teacher draws what the prompt says with DDIM 25 steps, not with 1."""
    from diffusers import StableDiffusionPipeline

    from stepdistill.shapes_eval import attribute_accuracy

    pipe = StableDiffusionPipeline.from_pretrained(str(teacher_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    prompts = shapes.shapes_prompts("test", 48)

    def accuracy(steps):
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=3.0, height=32, width=32,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
        return attribute_accuracy(torch.from_numpy(images).permute(0, 3, 1, 2), prompts)

    good, one_step = accuracy(25), accuracy(1)
    assert min(good[name] for name in shapes.ATTRIBUTE_NAMES) >= 0.85 and good["all"] >= 0.75, good
    assert one_step["all"] < good["all"] - 0.3, (one_step, good)


@needs_teacher
def test_the_v_teacher_is_v_prediction_on_scaled_linear_and_shares_the_first_teachers_parts():
    from stepdistill.config import ModelConfig
    from stepdistill.models import load_teacher

    eps, v = (load_teacher(ModelConfig(teacher=str(d))) for d in (TEACHER_DIR, TEACHER_V_DIR))
    assert eps.schedule.prediction_type == "epsilon" and v.schedule.prediction_type == "v_prediction"
    assert eps.scheduler_config["beta_schedule"] == "linear" and v.scheduler_config["beta_schedule"] == "scaled_linear"
    for name in ("text_encoder", "vae"):  # the same weights (linked folders), a different UNet
        a, b = eps.components[name].state_dict(), v.components[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(next(eps.net.parameters()), next(v.net.parameters()))


@pytest.mark.skipif(not (FLOW_TEACHER_DIR / "model_index.json").is_file(),
                    reason="assets/shapes-flow-teacher not built (tools/shapes/train_flow_teacher.py)")
@needs_eval
def test_the_flow_teacher_loads_through_stepdistill_and_follows_its_prompts():
    """The bundled SD3-layout teacher: a flow schedule, loaded offline (its absent T5 passed as None), and at 25
    Euler steps with CFG it draws the prompt's position and background far better than at 1 step."""
    from stepdistill.sampling import generate, load_pipeline
    from stepdistill.schedule import FlowSchedule
    from stepdistill.shapes_eval import attribute_accuracy

    from stepdistill.config import ModelConfig
    from stepdistill.models import load_teacher

    teacher = load_teacher(ModelConfig(teacher=str(FLOW_TEACHER_DIR)))
    assert teacher.family == "sd3" and isinstance(teacher.schedule, FlowSchedule)
    pipe, spec = load_pipeline(str(FLOW_TEACHER_DIR))
    prompts = shapes.shapes_prompts("test", 32)
    good = attribute_accuracy(generate(pipe, spec, prompts, list(range(32)), steps=25, guidance_scale=3.0), prompts)
    one = attribute_accuracy(generate(pipe, spec, prompts, list(range(32)), steps=1, guidance_scale=3.0), prompts)
    assert good["position"] >= 0.8 and good["background"] >= 0.8, good
    assert good["all"] > one["all"], (one, good)


@needs_eval
def test_eval_models_score_real_images_far_better_than_noise():
    from stepdistill.shapes_eval import attribute_accuracy, shapes_fid

    ds = shapes.ShapesDataset("test", length=256)
    images = [ds[i]["image"] for i in range(len(ds))]
    prompts = [ds[i]["caption"] for i in range(len(ds))]
    real = attribute_accuracy(images, prompts)
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.integers(0, 256, (256, 3, 32, 32), dtype=np.uint8))
    fake = attribute_accuracy(noise, prompts)
    assert min(real[name] for name in shapes.ATTRIBUTE_NAMES) > 0.9, real
    assert fake["all"] < 0.1 and real["all"] > 0.8
    val = shapes.ShapesDataset("val", length=256)
    floor = shapes_fid(images, [val[i]["image"] for i in range(len(val))])
    assert floor * 10 < shapes_fid(images, noise)


@needs_eval
def test_shapes_clip_ranks_matched_captions_above_shuffled():
    from stepdistill.shapes_eval import clip_score

    ds = shapes.ShapesDataset("test", length=128)
    images = [ds[i]["image"] for i in range(len(ds))]
    prompts = [ds[i]["caption"] for i in range(len(ds))]
    shuffled = prompts[1:] + prompts[:1]
    assert clip_score(images, prompts) > clip_score(images, shuffled) + 10


@needs_teacher
def test_quick_start_job_runs_on_the_bundled_teacher(tmp_path, capsys):
    """The README's main job (`stepdistill train`, default config), shortened: trains, samples, exports."""
    from stepdistill.cli import main

    out = tmp_path / "run"
    code = main(["train", "configs/shapes/consistency_lora.yaml", f"train.output_dir={out}", "train.max_steps=2",
                 "train.batch_size=4", "train.progress=false", "train.checkpoint_every=2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "sample grid:" in printed and "export:" in printed
    from stepdistill.sampling import generate, load_pipeline

    pipe, spec = load_pipeline(str(out / "export"))
    assert spec.base_model == "assets/shapes-teacher" and spec.scheduler_class == "LCMScheduler"
    images = generate(pipe, spec, ["a small blue square at the top left on a white background"], [0])
    assert images[0].size == (32, 32)
    # more steps than the quick start's 10-point grid has: one line from the CLI, not diffusers' traceback
    assert main(["sample", str(out / "export"), "--prompt", "a red circle", "--steps", "20",
                 "--out", str(tmp_path / "g.png")]) == 2
    assert "cannot sample in 20 steps" in capsys.readouterr().err and not (tmp_path / "g.png").exists()

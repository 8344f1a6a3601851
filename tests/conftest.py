import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random StableDiffusionPipeline folder (32x32 images, 8x8x4 latents)."""
    from stepdistill.testing import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipe"))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    """tiny_sd's v-prediction twin (same seed, so the same random weights; scaled_linear betas like tiny_sd)."""
    from stepdistill.testing import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-v") / "pipe", prediction_type="v_prediction"))


@pytest.fixture(scope="session")
def tiny_sd_linear(tmp_path_factory):
    """tiny_sd on the linear-beta DDPM schedule (eps, like the bundled shapes teacher): sigma/alpha = 157 at t = 999."""
    from stepdistill.testing import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-linear") / "pipe", beta_schedule="linear"))


@pytest.fixture(scope="session")
def tiny_sd_v_linear(tmp_path_factory):
    """A v-prediction teacher on the linear-beta DDPM schedule (alpha_bar(999) = 4e-5, where scaled_linear's is
    5e-3): a second beta schedule, so that the package's own rebuild of alphas_cumprod is checked as well."""
    from stepdistill.testing import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-v-linear") / "pipe",
                                   prediction_type="v_prediction", beta_schedule="linear"))


# The teachers the hand-written loss tests run on: eps, v, and v on another beta schedule.
HAND_WRITTEN_TEACHERS = {"eps": "tiny_sd", "v": "tiny_sd_v", "v-linear": "tiny_sd_v_linear"}


@pytest.fixture(params=list(HAND_WRITTEN_TEACHERS))
def any_tiny_sd(request):
    """Each of HAND_WRITTEN_TEACHERS' pipeline folders in turn (test ids: eps, v, v-linear)."""
    return request.getfixturevalue(HAND_WRITTEN_TEACHERS[request.param])


def hand_schedule(path):
    """(alphas_cumprod, prediction_type) as diffusers' own DDIMScheduler reads them from the pipeline folder: the
    hand-written side of the loss tests never asks the package's schedule."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    return sched.alphas_cumprod, sched.config.prediction_type


def hand_x0_eps(out, x_t, a, s, prediction_type):
    """(x0, eps) from a raw network output, converted by hand; a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t).
    epsilon: eps = out, x0 = (x_t - s eps) / a.  v_prediction (v = a eps - s x0): x0 = a x_t - s v, eps = s x_t + a v.
    """
    if prediction_type == "epsilon":
        return (x_t - s * out) / a, out
    if prediction_type == "v_prediction":
        return a * x_t - s * out, s * x_t + a * out
    raise ValueError(f"no hand-written conversion for {prediction_type!r}")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from stepdistill.testing import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "pipe", sdxl=True))


def run_config(teacher, out, **overrides):
    """A small consistency-LoRA config on the shapes data for `teacher`."""
    from stepdistill.objectives import load_run_config

    base = {"model.teacher": teacher, "train.output_dir": str(out), "train.max_steps": 4, "train.batch_size": 4,
            "train.progress": False, "train.checkpoint_every": 2, "train.log_every": 1,
            "train.sample_prompts": ["a small red circle at the center on a black background"],
            "train.export": "none", "data.max_samples": 64, "student.lora_rank": 4, "student.lora_alpha": 8,
            "objective.options.num_ddim_timesteps": 10}
    base.update(overrides)  # a value of None drops the key
    return load_run_config(None, [f"{k}={v}" for k, v in base.items() if v is not None])


def free_port() -> int:
    """A free TCP port for a two-process accelerate launch (its default 29500 may be taken by another run)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and far steadier on a CPU shared with other jobs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def white_image_folder(root, n: int):
    """An image-caption folder of n all-white 32x32 images captioned "a white image": a real distribution that
    any discriminator separates trivially from a student's samples."""
    import json

    from PIL import Image

    root.mkdir()
    for i in range(n):
        Image.new("RGB", (32, 32), (255, 255, 255)).save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "a white image"}) + "\n"
                                                 for i in range(n)))
    return root

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

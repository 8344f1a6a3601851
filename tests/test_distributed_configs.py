"""The accelerate configs in configs/accelerate/ (issue 13, item 1): a dry start of each on this CPU machine."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "accelerate"


@pytest.mark.parametrize("name,kind", [("ddp.yaml", "MULTI_GPU"), ("fsdp.yaml", "FSDP"),
                                       ("deepspeed_zero2.yaml", "DEEPSPEED"), ("deepspeed_zero3.yaml", "DEEPSPEED")])
def test_accelerate_config_parses(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / name))
    assert cfg.distributed_type.value == kind
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_reshard_after_forward"] is True
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == int(name[-6])


def test_fsdp_wrap_classes_are_blocks_of_the_bundled_teacher():
    import json

    classes = __import__("yaml").safe_load((CONFIGS / "fsdp.yaml").read_text())["fsdp_config"][
        "fsdp_transformer_layer_cls_to_wrap"].split(",")
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(json.loads((ROOT / "assets/shapes-teacher/unet/config.json").read_text()))
    present = {type(m).__name__ for m in unet.modules()}
    assert set(classes) <= present


@pytest.mark.parametrize("env", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_fsdp_and_deepspeed_are_refused_in_one_line(tiny_sd, tmp_path, monkeypatch, capsys, env):
    from stepdistill.cli import main

    monkeypatch.setenv(env, "true")
    rc = main(["train", f"model.teacher={tiny_sd}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is not supported yet" in err[0] and "configs/accelerate/ddp.yaml" in err[0]
    assert not (tmp_path / "run").exists()


def test_fsdp_launch_on_cpu_is_refused_not_run_as_ddp(tiny_sd, tmp_path):
    """accelerate itself runs CPU processes of an FSDP config as plain DDP, silently; the trainer says so."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp.yaml"),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           "-m", "stepdistill", "train", f"model.teacher={tiny_sd}", f"train.output_dir={tmp_path / 'run'}",
           "train.max_steps=1", "train.progress=false"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode != 0
    assert "error: FSDP is not supported yet" in res.stderr
    assert not (tmp_path / "run").exists()

"""tools/peer_lcm_sdxl.py without running either trainer: our command is a valid config, the progress bars parse."""
import importlib.util
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("peer_lcm_sdxl", ROOT / "tools" / "peer_lcm_sdxl.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(**kw):
    base = dict(lora_rank=16, lora_alpha=16, num_ddim_timesteps=50, w_min=3.0, w_max=15.0, resolution=64,
                batch_size=4, lr=1e-4, weight_decay=0.01, launcher="python", device="cpu")
    return types.SimpleNamespace(**{**base, **kw})


def test_our_command_is_a_valid_matching_config(peer, tmp_path):
    from stepdistill.objectives import load_run_config

    cmd = peer.ours_cmd(_args(), tmp_path / "teacher", tmp_path / "data", 7, tmp_path / "run")
    i = cmd.index("train")
    cfg = load_run_config(cmd[i + 1], cmd[i + 2:])
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.data.resolution) == (7, 4, 64)
    assert (cfg.student.type, cfg.student.lora_rank, cfg.student.lora_alpha) == ("lora", 16, 16.0)
    assert cfg.objective.name == "consistency" and cfg.objective.options["num_ddim_timesteps"] == 50
    assert (cfg.train.sample_every, cfg.train.export, cfg.train.ema_decay) == (0, "none", 0.0)
    assert cfg.train.checkpoint_every > 7 and cfg.model.dtype == "fp32"


def test_their_command_trains_the_same_run(peer, tmp_path):
    cmd = peer.theirs_cmd(_args(), "train.py", tmp_path / "t", tmp_path / "d", 7, tmp_path / "r")
    text = " ".join(cmd)
    for want in ("--max_train_steps 7", "--train_batch_size 4", "--resolution 64", "--lora_rank 16",
                 "--lora_alpha 16", "--num_ddim_timesteps 50", "--loss_type huber", "--mixed_precision no"):
        assert want in text


def test_progress_times_and_step_check(peer, tmp_path):
    log = tmp_path / "theirs.log"
    body = (b"loading\nSteps:   0%|          | 0/3 [00:00<?, ?it/s]\rSteps:  33%|###       | 1/3 [00:01<00:02]"
            b"\rSteps:  67%|######    | 2/3 [00:02<00:01]\rSteps: 100%|##########| 3/3 [00:03<00:00, loss=0.1]\ndone\n")
    log.write_bytes(b"$ cmd\n\n" + body)
    cut = [body.index(b"1/3"), body.index(b"2/3"), body.index(b"3/3"), len(body)]
    chunks = [(1.0, cut[0]), (2.0, cut[1]), (3.5, cut[2]), (6.0, cut[3])]
    assert peer.progress_times("theirs", log, chunks) == {0: 1.0, 1: 2.0, 2: 3.5, 3: 6.0}
    assert peer.check_steps("theirs", tmp_path, log, 3) == "no pytorch_lora_weights.safetensors written"
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    assert peer.check_steps("theirs", tmp_path, log, 3) is None
    assert "not 4/4" in peer.check_steps("theirs", tmp_path, log, 4)

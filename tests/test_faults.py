"""Faults survived with nothing lost: signals, SIGKILL at random moments, corrupt checkpoints, non-finite updates.

Bit-exact resume holds at a fixed thread count: the subprocess runs here pin OMP/MKL and torch to one thread.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_config
from stepdistill.checkpoints import checkpoint_problem, list_checkpoints, resolve_resume
from stepdistill.errors import StepdistillError, TrainingInterrupted
from stepdistill.trainer import Trainer

REPO = Path(__file__).parent.parent


def _weights(path: Path) -> dict:
    return load_file(str(path))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)


def _signal_at(monkeypatch, signum: int, at_step: int) -> None:
    """Send `signum` to this process in the middle of step `at_step` (0-based), as a user or a scheduler would."""
    original = Trainer._train_step

    def step(self):
        if self.state.step == at_step:
            os.kill(os.getpid(), signum)
        return original(self)

    monkeypatch.setattr(Trainer, "_train_step", step)


# --- SIGTERM / SIGINT --------------------------------------------------------------------------------------------

def test_sigterm_checkpoints_at_the_next_step_and_resume_is_exact(tiny_sd, tmp_path, monkeypatch, capsys, one_thread):
    from stepdistill.cli import main
    from stepdistill.config import save_config

    over = {"train.max_steps": 4, "train.checkpoint_every": 100}
    Trainer(run_config(tiny_sd, tmp_path / "a", **over)).train()
    save_config(run_config(tiny_sd, tmp_path / "b", **over), tmp_path / "b.yaml")
    before = signal.getsignal(signal.SIGTERM)
    _signal_at(monkeypatch, signal.SIGTERM, 1)  # during the second step: nothing checkpointed yet
    assert main(["train", str(tmp_path / "b.yaml")]) == 143
    assert signal.getsignal(signal.SIGTERM) is before  # the trainer's handler is gone
    err = capsys.readouterr().err
    ckpt = tmp_path / "b" / "checkpoints" / "checkpoint-2"
    assert f"interrupted by SIGTERM at step 2: checkpoint {ckpt}; resume with train.resume=latest" in err
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-2"]
    assert not (tmp_path / "b" / "final").exists()
    monkeypatch.undo()
    Trainer(run_config(tiny_sd, tmp_path / "b", **over, **{"train.resume": "latest"})).train()
    assert _same(_weights(tmp_path / "a" / "final" / "student.safetensors"),
                 _weights(tmp_path / "b" / "final" / "student.safetensors"))


def test_sigint_stops_with_130_at_a_checkpoint_step_without_a_second_checkpoint(tiny_sd, tmp_path, monkeypatch,
                                                                                 one_thread):
    before = signal.getsignal(signal.SIGINT)
    _signal_at(monkeypatch, signal.SIGINT, 1)  # step 2 writes its own checkpoint (checkpoint_every 2)
    with pytest.raises(TrainingInterrupted) as info:
        Trainer(run_config(tiny_sd, tmp_path / "r")).train()
    assert info.value.exit_code == 130 and info.value.step == 2 and info.value.signal_name == "SIGINT"
    assert info.value.checkpoint == tmp_path / "r" / "checkpoints" / "checkpoint-2"
    assert signal.getsignal(signal.SIGINT) is before
    assert checkpoint_problem(info.value.checkpoint) is None
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


# --- corrupt checkpoints -----------------------------------------------------------------------------------------

def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


DAMAGES = {
    "model.safetensors": _truncate,
    "optimizer.bin": lambda p: p.unlink(),
    "scheduler.bin": lambda p: p.write_bytes(b""),
    "random_states_0.pkl": _truncate,
    "custom_checkpoint_0.pkl": lambda p: p.write_bytes(b"\x00garbage"),
    "trainer_state.json": lambda p: p.write_text("{\"st"),
}


@pytest.fixture(scope="module")
def three_checkpoints(tiny_sd, tmp_path_factory):
    """A 3-step run with a checkpoint after every step, and a straight 4-step run to compare resumes with."""
    root = tmp_path_factory.mktemp("ckpts")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        over = {"train.checkpoint_every": 1, "train.keep_checkpoints": 3}
        Trainer(run_config(tiny_sd, root / "run", **over, **{"train.max_steps": 3})).train()
        trainer = Trainer(run_config(tiny_sd, root / "straight", **over, **{"train.max_steps": 4}))
        expected = trainer._checkpoint_files()
        trainer.train()
    finally:
        torch.set_num_threads(before)
    return root, expected


@pytest.mark.parametrize("name", sorted(DAMAGES))
def test_a_damaged_latest_checkpoint_is_reported_and_the_previous_one_used(three_checkpoints, tmp_path, name):
    root, expected = three_checkpoints
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    DAMAGES[name](run / "checkpoints" / "checkpoint-3" / name)
    lines = []
    assert resolve_resume(run, "latest", expected, lines.append) == run / "checkpoints" / "checkpoint-2"
    assert len(lines) == 1 and "checkpoint-3" in lines[0] and name in lines[0], lines
    assert (run / "checkpoints" / "checkpoint-3" / "trainer_state.json").exists() or name == "trainer_state.json"
    assert (run / "checkpoints" / "checkpoint-3").is_dir()  # never deleted
    with pytest.raises(StepdistillError, match=f"corrupt or incomplete: {name}"):
        resolve_resume(run, str(run / "checkpoints" / "checkpoint-3"), expected, lines.append)


def test_resume_falls_back_exactly_and_stops_when_nothing_loads(tiny_sd, three_checkpoints, tmp_path, capsys,
                                                               one_thread):
    root, expected = three_checkpoints
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    _truncate(run / "checkpoints" / "checkpoint-3" / "optimizer.bin")
    over = {"train.checkpoint_every": 1, "train.keep_checkpoints": 3, "train.max_steps": 4, "train.resume": "latest"}
    Trainer(run_config(tiny_sd, run, **over)).train()
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "optimizer.bin is truncated or corrupt" in out
    assert f"resumed from {run / 'checkpoints' / 'checkpoint-2'} at step 2" in out
    assert (run / "checkpoints" / "checkpoint-3.corrupt" / "optimizer.bin").is_file()  # kept, not overwritten
    assert _same(_weights(root / "straight" / "final" / "student.safetensors"),
                 _weights(run / "final" / "student.safetensors"))
    # every checkpoint damaged: one line, no silent fresh start, nothing deleted
    for ckpt in list_checkpoints(run):
        (ckpt / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(StepdistillError, match="corrupt or incomplete"):
        Trainer(run_config(tiny_sd, run, **{**over, "train.max_steps": 5})).train()
    assert len(list_checkpoints(run)) == 3


# --- non-finite losses and gradients -------------------------------------------------------------------------

def _poison(trainer: Trainer, network: str, steps, kind: str = "loss") -> None:
    """Make `network`'s loss (kind=loss) or only its gradient (kind=grad: the loss stays finite) non-finite on
    `steps` (0-based)."""
    original = trainer.objective.losses

    def losses(name, batch, gen):
        out = original(name, batch, gen)
        if name == network and trainer.state.step in steps:
            if kind == "loss":
                out = {**out, "loss": out["loss"] * float("nan")}
            else:  # d/dx sqrt(x) at 0 is inf, times the 0 of `* 0`: nan; the value sqrt(0) = 0 is finite
                p = trainer.params[name][0]
                out = {**out, "loss": out["loss"] + (p.sum() * 0).sqrt()}
        return out

    trainer.objective.losses = losses


def _dmd2_config(tiny_sd, out, **over):
    from stepdistill.objectives import load_run_config

    base = {"model.teacher": tiny_sd, "train.output_dir": str(out), "train.max_steps": 3, "train.batch_size": 2,
            "train.progress": False, "train.checkpoint_every": 1, "train.keep_checkpoints": 5, "train.log_every": 1,
            "train.sample_prompts": ["a small red circle"], "train.export": "none", "data.max_samples": 16,
            "student.lora_rank": 4, "student.lora_alpha": 8, "objective.name": "dmd",
            "objective.options.fake_lora_rank": 4, "objective.options.gan_weight": 0.1, **over}
    return load_run_config(None, [f"{k}={v}" for k, v in base.items()])


def _optimizer_states(ckpt: Path) -> list[dict]:
    return [torch.load(ckpt / ("optimizer.bin" if i == 0 else f"optimizer_{i}.bin"), weights_only=False)["state"]
            for i in range(3)]


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[i][k]), torch.as_tensor(b[i][k]))
                                        for i in a for k in a[i])


@pytest.mark.parametrize("network,kind", [("student", "loss"), ("fake", "grad"), ("disc", "loss")])
def test_a_nonfinite_update_of_any_network_is_skipped_and_counted(tiny_sd, tmp_path, network, kind, one_thread):
    trainer = Trainer(_dmd2_config(tiny_sd, tmp_path / "r"))
    assert list(trainer.networks) == ["student", "fake", "disc"]
    _poison(trainer, network, {1}, kind)  # the second step
    trainer.train()
    one, two, three = (_optimizer_states(tmp_path / "r" / "checkpoints" / f"checkpoint-{i}") for i in (1, 2, 3))
    mine = list(trainer.networks).index(network)
    assert _same_state(one[mine], two[mine])  # the poisoned network's update was skipped: no Adam step, moments
    assert not _same_state(two[mine], three[mine])  # and it trains again afterwards
    assert all(not _same_state(one[i], two[i]) for i in range(3) if i != mine)  # the others were not skipped
    if network == "disc":
        disc = [_weights(tmp_path / "r" / "checkpoints" / f"checkpoint-{i}" / "model_1.safetensors") for i in (1, 2)]
        assert _same(*disc)
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())}
    key = "nonfinite_skips" if network == "student" else f"{network}/nonfinite_skips"
    assert [rows[s][key] for s in (1, 2, 3)] == [0, 1, 0]
    assert all(v == v for r in rows.values() for v in r.values() if isinstance(v, float))  # no nan in the logs


def test_consecutive_nonfinite_updates_stop_the_run_keeping_the_good_checkpoints(tiny_sd, tmp_path, one_thread):
    cfg = run_config(tiny_sd, tmp_path / "r", **{"train.max_steps": 8, "train.checkpoint_every": 1,
                                                  "train.keep_checkpoints": 10, "train.max_nonfinite_skips": 3})
    trainer = Trainer(cfg)
    _poison(trainer, "student", set(range(2, 8)))  # steps 3.. (1-based)
    with pytest.raises(StepdistillError, match="3 consecutive non-finite") as info:
        trainer.train()
    assert "step 5" in str(info.value) and "checkpoint-4" in str(info.value)
    ckpts = list_checkpoints(tmp_path / "r")
    assert [p.name for p in ckpts] == [f"checkpoint-{i}" for i in (1, 2, 3, 4)]
    good = _weights(ckpts[1] / "model.safetensors")
    for ckpt in ckpts[2:]:  # the skipped steps wrote the same, good, weights
        assert _same(good, _weights(ckpt / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())


# --- SIGKILL at random moments ---------------------------------------------------------------------------------

KILL_STEPS = 6


def _train_cmd(tiny_sd, out) -> list[str]:
    over = [f"model.teacher={tiny_sd}", f"train.output_dir={out}", f"train.max_steps={KILL_STEPS}",
            "train.batch_size=2", "train.progress=false", "train.checkpoint_every=1", "train.keep_checkpoints=2",
            "train.log_every=1", "train.export=lora", "data.max_samples=16", "student.lora_rank=4",
            "objective.options.num_ddim_timesteps=10", "train.sample_prompts=[a red circle]", "train.resume=latest"]
    return [sys.executable, "-m", "stepdistill", "train", "configs/shapes/consistency_lora.yaml", *over]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def _complete_checkpoints_load(run: Path, expected: list[str]) -> list[int]:
    steps = []
    for ckpt in list_checkpoints(run):
        if not (ckpt / "trainer_state.json").is_file():
            continue  # does not look complete
        assert checkpoint_problem(ckpt, expected) is None, ckpt
        for f in ckpt.glob("*.safetensors"):
            load_file(str(f))
        for f in [*ckpt.glob("*.bin"), *ckpt.glob("*.pkl")]:
            torch.load(f, weights_only=False)
        steps.append(json.loads((ckpt / "trainer_state.json").read_text())["step"])
    return steps


def _latest_step(run: Path) -> int:
    ckpts = list_checkpoints(run)
    return int(ckpts[-1].name.split("-")[1]) if ckpts else 0


def _fresh(folder: Path, pattern: str, since: float) -> bool:
    """A `pattern` entry made since `since` (earlier kills leave their temporary folders behind)."""
    for p in folder.glob(pattern):
        try:
            if p.stat().st_mtime >= since:
                return True
        except FileNotFoundError:  # renamed or removed meanwhile
            pass
    return False


def _wait(proc, condition, timeout: float = 300.0) -> bool:
    """Poll `condition` every few ms until it holds (True) or the process exits (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.003)
    raise AssertionError("training subprocess made no progress in time")


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tiny_sd, tmp_path):
    """A real `stepdistill train` killed with SIGKILL at >= 10 seeded random moments (mid-step, mid-checkpoint,
    mid-removal of an old checkpoint, while writing final/ and the export) and once stopped with SIGTERM, each time
    resumed with train.resume=latest: every complete-looking checkpoint loads, and the final weights and export
    equal an uninterrupted run's bit for bit."""
    ref = subprocess.run(_train_cmd(tiny_sd, tmp_path / "ref"), env=ENV, cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = Trainer(run_config(tiny_sd, tmp_path / "probe"))._checkpoint_files()  # builds, never trains
    run, rng = tmp_path / "run", random.Random(13)
    moments, kills = [], 0
    training = ["checkpoint", "step", "startup", "checkpoint", "step"]  # in turn; the delays are random
    for launch in range(40):
        start = _latest_step(run)
        seen = {k for k, _ in moments}
        if launch == 0:
            kind = "sigterm"
        elif start < KILL_STEPS:
            kind = training[launch % len(training)]
        elif kills < 10 or "export" not in seen:  # the finish: final/ (a short window), then the export
            kind = "export" if launch % 2 or "export" not in seen else "final"
        else:
            kind = "none"
        launched = time.time()
        proc = subprocess.Popen(_train_cmd(tiny_sd, run), env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if kind == "startup":  # anywhere from importing to the first steps
            time.sleep(rng.uniform(0.5, 8.0))
            hit = proc.poll() is None
        elif kind in ("step", "sigterm"):  # a random moment after the next checkpoint: mid-step or mid-save
            hit = _wait(proc, lambda: _latest_step(run) > start)
            time.sleep(rng.uniform(0, 0.05 if kind == "sigterm" else 0.3))
        elif kind == "checkpoint":  # mid-save: the temporary folder this process is writing
            hit = _wait(proc, lambda: _fresh(run / "checkpoints", ".checkpoint-*.tmp", launched))
        elif kind == "final":
            hit = _wait(proc, lambda: _fresh(run, ".final.*.tmp", launched))
        elif kind == "export":  # written after final/
            hit = _wait(proc, lambda: _fresh(run, ".export.*.tmp", launched))
        else:
            hit = False
        if hit and kind == "sigterm":
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 143, err[-3000:]
            assert "interrupted by SIGTERM at step" in err and "resume with train.resume=latest" in err, err
            moments.append((kind, start))
        elif hit and proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=600)
            kills += 1
            moments.append((kind, start))
        else:  # the moment was missed and the run finished
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err[-3000:]
            assert launch > 0
            if kind == "none":
                break
            # final/ and export/ are derived from the last checkpoint: drop them to go on killing the finish
            shutil.rmtree(run / "final")
            shutil.rmtree(run / "export")
        steps = _complete_checkpoints_load(run, expected)
        assert steps == sorted(steps) and len(steps) <= 3, steps
    else:
        raise AssertionError(f"did not finish: {moments}")
    assert kills >= 10 and moments[0][0] == "sigterm", moments
    assert {k for k, _ in moments} >= {"step", "export"}, moments
    assert _same(_weights(tmp_path / "ref" / "final" / "student.safetensors"),
                 _weights(run / "final" / "student.safetensors")), moments
    ref_lora = tmp_path / "ref" / "export" / "pytorch_lora_weights.safetensors"
    assert _same(_weights(ref_lora), _weights(run / "export" / "pytorch_lora_weights.safetensors"))
    print(moments)


def test_an_export_killed_between_its_two_renames_gets_the_previous_one_back(tmp_path):
    from stepdistill.utils import atomic_directory

    (tmp_path / ".export.old").mkdir()  # a kill after `export` was moved aside, before the new one took its place
    (tmp_path / ".export.old" / "weights").write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "export") as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("disk full")
    assert (tmp_path / "export" / "weights").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

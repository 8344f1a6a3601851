"""tools/shapes_results.py flags multi-step students whose FID worsens with steps (issue 14), and evaluates each student
at the step counts its export lists."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import json  # noqa: E402

import pytest  # noqa: E402
from shapes_results import export_steps, main, stage_exports, step_reversals  # noqa: E402


def test_a_student_worse_at_more_steps_is_flagged_and_the_teacher_is_not():
    rows = [{"label": "dmd2_4step", "role": "student", "steps": s, "fid": f} for s, f in [(4, 24.2), (1, 16.1), (2, 18.2)]]
    rows += [{"label": "lcm", "role": "student", "steps": s, "fid": f} for s, f in [(1, 30.0), (2, 20.0), (4, 19.9)]]
    rows += [{"label": "teacher", "role": "teacher", "steps": s, "fid": f} for s, f in [(4, 10.0), (25, 12.0)]]
    rows += [{"label": "real", "role": "real", "steps": None, "fid": 96.2}]
    assert step_reversals(rows) == ["reversal: dmd2_4step FID 16.1 at 1 steps -> 18.2 at 2 steps",
                                    "reversal: dmd2_4step FID 18.2 at 2 steps -> 24.2 at 4 steps"]


def test_each_student_is_evaluated_at_the_step_counts_its_export_lists(tmp_path):
    def export(name, **spec):
        folder = tmp_path / name / "export"
        folder.mkdir(parents=True)
        (folder / "stepdistill.json").write_text(json.dumps({"num_inference_steps": 4, "timesteps": None,
                                                             "sigmas": None, **spec}))
        return folder

    assert export_steps(export("one", num_inference_steps=1, timesteps={"1": [699]})) == [1]
    assert export_steps(export("dmd4", timesteps={"1": [699], "2": [699, 349], "4": [699, 524, 349, 174]})) == [1, 2, 4]
    assert export_steps(export("lcm", timesteps={str(n): [] for n in (1, 2, 4, 8)})) == [1, 2, 4]  # 8: not asked
    assert export_steps(export("flow", sigmas={"1": [1.0], "2": [1.0, 0.5], "4": [1.0, 0.75, 0.5, 0.25]})) == [1, 2, 4]
    assert export_steps(export("plain", num_inference_steps=3)) == [3]
    assert stage_exports(tmp_path / "dmd4", "dmd4") == [(tmp_path / "dmd4" / "export", "dmd4", [1, 2, 4])]


def test_an_override_after_configs_is_refused_before_anything_is_written(tmp_path):
    """`--configs A.yaml train.seed=1` would train A, then the defaults under a config named 'train.seed=1'."""
    with pytest.raises(SystemExit, match="'train.seed=1' is not a config file; put overrides before --configs"):
        main(["--out", str(tmp_path / "out"), "--configs", "configs/shapes/dmd2_1step.yaml", "train.seed=1"])
    assert not (tmp_path / "out").exists()

"""tools/shapes_results.py flags multi-step students whose FID worsens with steps (issue 14)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from shapes_results import step_reversals  # noqa: E402


def test_a_student_worse_at_more_steps_is_flagged_and_the_teacher_is_not():
    rows = [{"label": "dmd2_4step", "role": "student", "steps": s, "fid": f} for s, f in [(4, 24.2), (1, 16.1), (2, 18.2)]]
    rows += [{"label": "lcm", "role": "student", "steps": s, "fid": f} for s, f in [(1, 30.0), (2, 20.0), (4, 19.9)]]
    rows += [{"label": "teacher", "role": "teacher", "steps": s, "fid": f} for s, f in [(4, 10.0), (25, 12.0)]]
    rows += [{"label": "real", "role": "real", "steps": None, "fid": 96.2}]
    assert step_reversals(rows) == ["reversal: dmd2_4step FID 16.1 at 1 steps -> 18.2 at 2 steps",
                                    "reversal: dmd2_4step FID 18.2 at 2 steps -> 24.2 at 4 steps"]

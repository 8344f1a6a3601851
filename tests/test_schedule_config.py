import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepdistill.config import load_config
from stepdistill.errors import StepdistillError
from stepdistill.objectives import load_run_config
from stepdistill.schedule import FlowSchedule, VPSchedule

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_vp_schedule_matches_diffusers_alphas_cumprod():
    from diffusers import DDIMScheduler, DDPMScheduler

    for cfg in (SD_SCHEDULER, dict(beta_schedule="linear"), dict(beta_schedule="squaredcos_cap_v2")):
        ours = VPSchedule.from_scheduler_config(cfg).alphas_cumprod.float()
        assert torch.allclose(ours, DDPMScheduler(**cfg).alphas_cumprod, atol=1e-7)
        assert torch.allclose(ours, DDIMScheduler(**cfg).alphas_cumprod, atol=1e-7)


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_vp_conversions_round_trip(kind):
    torch.manual_seed(0)
    sched = VPSchedule.from_scheduler_config({**SD_SCHEDULER, "prediction_type": kind})
    x0, eps = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 900, 999])
    x_t = sched.add_noise(x0, eps, t)
    out = sched.from_x0_eps(x0, eps, t, kind)
    x0_back, eps_back = sched.to_x0_eps(out, x_t, t)
    assert torch.allclose(x0_back, x0, atol=2e-4) and torch.allclose(eps_back, eps, atol=2e-4)


def test_v_prediction_matches_diffusers_velocity():
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    ref = DDPMScheduler(**SD_SCHEDULER, prediction_type="v_prediction")
    sched = VPSchedule.from_scheduler_config({**SD_SCHEDULER, "prediction_type": "v_prediction"})
    x0, eps, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([5, 400, 990])
    assert torch.allclose(sched.from_x0_eps(x0, eps, t, "v_prediction"), ref.get_velocity(x0, eps, t), atol=1e-5)
    assert torch.allclose(sched.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), atol=1e-5)


def test_flow_conversions_round_trip():
    sched = FlowSchedule(shift=3.0)
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([1, 250, 750, 999])
    x_t = sched.add_noise(x0, eps, t)
    x0_back, eps_back = sched.to_x0_eps(eps - x0, x_t, t)
    assert torch.allclose(x0_back, x0, atol=1e-5) and torch.allclose(eps_back, eps, atol=1e-5)
    # the shifted sigma grows with t and is 1 at t = T
    s = sched.sigma(torch.tensor([0, 500, 1000]))
    assert s[0] == 0 and s[1] == pytest.approx(0.75) and s[2] == pytest.approx(1.0)


def test_ddim_step_matches_diffusers_ddim():
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    ref = DDIMScheduler(**SD_SCHEDULER, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
    ref.set_timesteps(4)
    sched = VPSchedule.from_scheduler_config(SD_SCHEDULER)
    x_t, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, t_next = int(ref.timesteps[0]), int(ref.timesteps[1])
    expected = ref.step(eps, t, x_t).prev_sample
    x0, eps_ = sched.to_x0_eps(eps, x_t, torch.tensor([t, t]))
    assert torch.allclose(sched.ddim_step(x0, eps_, torch.tensor([t_next, t_next])), expected, atol=1e-5)


# --- config ----------------------------------------------------------------------------------------------

def test_defaults_and_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["train.max_steps=12", "train.lr=3e-4", "student.type=full",
                             "objective.options.w_max=6", "train.sample_prompts=[a, b]"])
    assert cfg.train.max_steps == 12 and cfg.train.lr == 3e-4 and cfg.student.type == "full"
    assert cfg.objective.options["w_max"] == 6 and cfg.train.sample_prompts == ["a", "b"]


def test_yaml_booleans_spelled_as_a_choice_are_read_as_that_choice(tmp_path):
    # YAML 1.1 reads `no` as false: `mixed_precision: no` (file or override) must still mean "no"
    (tmp_path / "c.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config(str(tmp_path / "c.yaml"), []).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    with pytest.raises(StepdistillError, match=re.escape("must be one of 'lora' | 'full' | 'small', got False")):
        load_config(None, ["student.type=no"])


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", "unknown config key 'train.max_stepz' (did you mean 'max_steps'?)"),
    ("train.max_steps=lots", "config key 'train.max_steps' must be an integer, got 'lots'"),
    ("train.max_steps=0", "config key 'train.max_steps' must be > 0"),
    ("student.type=half", "config key 'student.type' must be one of 'lora' | 'full' | 'small', got 'half'"),
    ("objective.name=dmdx", "unknown objective 'dmdx'"),
    ("objective.options.w_maxx=3", "unknown config key 'objective.options.w_maxx'"),
    ("objective.options.w_min=9", "w_min <= w_max"),
    ("train.ema_decay=1.5", "train.ema_decay' must be in [0, 1)"),
    ("student.guidance_embedding=true", "needs student.type=full"),
    ("nonsense", "must look like key.sub=value"),
])
def test_bad_config_gives_one_line_error(override, message):
    with pytest.raises(StepdistillError) as err:
        load_run_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(StepdistillError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(StepdistillError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("train: 3\n")
    with pytest.raises(StepdistillError, match="section 'train' must be a mapping"):
        load_config(bad)


def test_shipped_configs_validate():
    root = Path(__file__).parent.parent / "configs"
    configs = sorted(p for p in root.glob("**/*.yaml") if p.parent.name != "accelerate")  # those are accelerate's
    assert configs
    for path in configs:
        load_run_config(path)
        if path.parent.name != "shapes":  # a config for a real teacher says in its header that it was not run here
            header = path.read_text().split("\nname:")[0]
            assert "NOT RUN HERE" in header or "UNTESTED HERE" in header or "not run" in header, path


def test_config_sits_below_the_objectives():
    # the objectives import config; config.load_config never imports them (load_run_config checks their options)
    code = ("import sys; from stepdistill.config import load_config; "
            "load_config(None, ['objective.options.w_maxx=3']); "
            "assert not [m for m in sys.modules if m.startswith('stepdistill.objectives')]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parent.parent)


def test_train_stops_on_an_objective_option_typo_before_loading_a_model(tmp_path, capsys):
    from stepdistill.cli import main

    # the teacher does not exist either: the objective's options must be what stops the run, in one line
    config = Path(__file__).resolve().parent.parent / "configs" / "shapes" / "consistency_lora.yaml"
    assert main(["train", str(config), "objective.options.w_maxx=3",
                 f"model.teacher={tmp_path / 'no-teacher'}", f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown config key 'objective.options.w_maxx'") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_shapes_noise_students_take_their_timesteps_from_each_teachers_schedule():
    """The shipped UNet configs of noise-to-sample students (dmd, vsd, adversarial, and compositions led by one)
    name no timesteps: the rule gives 699 (and its trailing grid) on the eps / linear-beta teacher and 999 on the
    v / scaled_linear one, from the same file (issue 14, item 3)."""
    import json

    from stepdistill.objectives import get_objective
    from stepdistill.objectives.noise_student import NoiseStudentOptions, default_student_timesteps

    schedules = {t: VPSchedule.from_scheduler_config(json.loads(Path(f"assets/{t}/scheduler/scheduler_config.json")
                                                                 .read_text()))
                 for t in ("shapes-teacher", "shapes-teacher-v")}
    seen = 0
    for path in sorted(Path("configs/shapes").glob("*.yaml")):
        cfg = load_run_config(str(path))
        name, options = cfg.objective.name, cfg.objective.options
        if name == "compose":
            name, options = options["terms"][0]["name"], options["terms"][0].get("options", {})
        opts = get_objective(name).parse_options(options)
        if not isinstance(opts, NoiseStudentOptions) or "flow" in cfg.model.teacher:
            continue
        seen += 1
        assert opts.student_timesteps is None, f"{path.name} names its timesteps"
        n = opts.num_student_steps()
        eps = default_student_timesteps(schedules["shapes-teacher"], n, opts.max_noise_amplification)
        v = default_student_timesteps(schedules["shapes-teacher-v"], n, opts.max_noise_amplification)
        assert eps[0] == 699 and v[0] == 999 and len(eps) == len(v) == n, (path.name, eps, v)
    assert seen >= 8


def test_shapes_progressive_top_step_comes_from_each_teachers_schedule():
    """progressive.yaml's one- and two-step rounds are told t = 699 at their top on the eps / linear-beta teacher
    (sigma/alpha = 160 at 999) and keep 999 on the v teacher, by the same rule and bound as the dmd / vsd configs;
    its exports' timesteps say so."""
    import torch

    from stepdistill.config import ModelConfig, StudentConfig
    from stepdistill.models import build_student, load_teacher
    from stepdistill.objectives import DistillSetup, get_objective

    cls = get_objective("progressive")
    opts = cls.parse_options(load_run_config("configs/shapes/progressive.yaml").objective.options)
    assert opts.top_timestep is None
    for teacher_dir, t_top in (("shapes-teacher", 699), ("shapes-teacher-v", 999)):
        teacher = load_teacher(ModelConfig(teacher=f"assets/{teacher_dir}"), "cpu")
        student = build_student(teacher, StudentConfig(type="full"))
        obj = cls(DistillSetup(teacher, student, "full", 1e-4, 32, torch.device("cpu"), 100), opts)
        specs = {}
        for stage in range(len(obj.stages())):
            obj.begin_stage(stage, student)
            specs.update(obj.sampling_spec().timesteps)
        assert specs[1] == [t_top] and specs[2] == [t_top, 499] and specs[4] == [999, 749, 499, 249], (teacher_dir, specs)

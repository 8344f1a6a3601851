"""FlowSchedule against diffusers' FlowMatchEulerDiscreteScheduler: tables, steps and the forward process."""
import numpy as np
import pytest
import torch

from stepdistill.errors import StepdistillError
from stepdistill.schedule import FlowSchedule

FLUX = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
            max_image_seq_len=4096)
LTX = dict(shift=1.0, use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
           max_image_seq_len=4096, shift_terminal=0.1)
# (scheduler config, image_seq_len): the seq len only matters with dynamic shifting
CASES = {
    "shift1": (dict(shift=1.0), None),
    "sd3": (dict(shift=3.0), None),
    "flux-512px": (FLUX, 1024),
    "flux-1024px": (FLUX, 4096),
    "flux-linear": ({**FLUX, "time_shift_type": "linear", "base_shift": 2.0, "max_shift": 4.0}, 2048),
    "ltx-terminal": (LTX, 2048),
    "sd3-terminal": (dict(shift=3.0, shift_terminal=0.05), None),
}


def reference(cfg, **extra):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**cfg, **extra)


def both_tables(case, steps, style):
    """Our (sigmas, timesteps) and the scheduler after set_timesteps, called the way the pipelines call it."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg, seq_len = CASES[case]
    ref = reference(cfg)
    sched = FlowSchedule.from_scheduler_config(ref.config)
    sigmas = np.linspace(1.0, 1 / steps, steps) if style == "flux" else None  # SD3 passes none
    c = ref.config
    mu = None if seq_len is None else calculate_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len,
                                                      c.base_shift, c.max_shift)
    ref.set_timesteps(steps, sigmas=sigmas, mu=mu)
    return sched.sigmas_for_inference(steps, image_seq_len=seq_len, sigmas=sigmas), ref


@pytest.mark.parametrize("case", CASES)
def test_training_sigmas_match_the_scheduler_after_construction(case):
    ref = reference(CASES[case][0])
    sched = FlowSchedule.from_scheduler_config(ref.config)
    u = torch.arange(sched.num_train_timesteps, 0, -1)  # diffusers' table runs T .. 1
    assert torch.equal(sched.sigma(u), ref.sigmas)
    assert torch.equal(sched.sigma(u) * sched.num_train_timesteps, ref.timesteps)


@pytest.mark.parametrize("style", ["sd3", "flux"])
@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("case", CASES)
def test_inference_sigmas_and_timesteps_equal_set_timesteps(case, steps, style):
    if steps == 1 and CASES[case][0].get("shift_terminal"):  # diffusers stretches 0 / 0 here: NaN sigmas
        with pytest.raises(StepdistillError, match="shift_terminal needs a last sigma below 1"):
            FlowSchedule.from_scheduler_config(CASES[case][0]).sigmas_for_inference(1, image_seq_len=CASES[case][1])
        return
    (sigmas, timesteps), ref = both_tables(case, steps, style)
    assert torch.equal(sigmas, ref.sigmas) and torch.equal(timesteps, ref.timesteps)
    assert sigmas[-1] == 0 and len(timesteps) == steps


def velocity(x, t):
    """A stand-in network whose output depends on x and t, so an error in one step would carry through."""
    return 0.7 * x - torch.cos(x) * (t / 1000) + 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("case", ["shift1", "sd3", "flux-512px", "flux-1024px", "ltx-terminal"])
def test_steps_equal_scheduler_step_over_a_whole_loop(case, stochastic, dtype):
    from diffusers import FlowMatchEulerDiscreteScheduler

    (sigmas, timesteps), ref = both_tables(case, 6, "flux" if CASES[case][1] else "sd3")
    ref = FlowMatchEulerDiscreteScheduler.from_config(ref.config, stochastic_sampling=stochastic)
    ref.sigmas, ref.timesteps = sigmas.clone(), timesteps.clone()  # the table is checked above
    sched = FlowSchedule.from_scheduler_config(ref.config)
    assert sched.stochastic_sampling == stochastic
    x_ref = x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    gen_ref, gen = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i, t in enumerate(timesteps):
        x_ref = ref.step(velocity(x_ref, t), t, x_ref, generator=gen_ref).prev_sample
        v = velocity(x, t)
        if stochastic:
            x = sched.stochastic_step(x, v, sigmas[i], sigmas[i + 1], torch.randn(x.shape, generator=gen))
        else:
            x = sched.euler_step(x, v, sigmas[i], sigmas[i + 1])
        assert x.dtype == x_ref.dtype and torch.equal(x, x_ref), f"step {i}"


def test_per_sample_sigmas_step_each_sample_by_its_own_sigma():
    sched = FlowSchedule(shift=3.0)
    x, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = sched.euler_step(x, v, torch.tensor([0.9, 0.5]), torch.tensor([0.6, 0.0]))
    assert torch.allclose(out[1], sched.euler_step(x[1:], v[1:], 0.5, 0.0)[0])


@pytest.mark.parametrize("case", ["sd3", "flux-1024px"])
def test_schedule_time_is_the_training_table(case):
    """Schedule time t (what objectives draw, 0..T-1) is entry T-1-t of the scheduler's training table: the same
    timestep handed to the network, and add_noise equal to scale_noise there (t = T-1 is pure noise)."""
    train = reference(CASES[case][0])
    sched = FlowSchedule.from_scheduler_config(train.config)
    T = sched.num_train_timesteps
    t = torch.randint(0, T, (8,), generator=torch.Generator().manual_seed(0))
    t[0] = T - 1
    assert torch.equal(sched.timestep(t), train.timesteps[T - 1 - t])
    x0, eps = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
    assert torch.allclose(sched.add_noise(x0, eps, t), train.scale_noise(x0, train.timesteps[T - 1 - t], eps),
                          atol=1e-6, rtol=0)
    assert torch.equal(sched.add_noise(x0, eps, t)[0], eps[0])  # sigma 1
    assert torch.equal(sched.add_noise(x0, eps, torch.tensor([-1]).expand(8))[0], x0[0])  # t = -1 is clean


@pytest.mark.parametrize("kind", ["flow", "epsilon", "sample"])
def test_conversions_round_trip(kind):
    sched = FlowSchedule.from_scheduler_config(dict(shift=3.0))
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([1.0, 249.5, 750.0, 1000.0])
    x_t = sched.add_noise(x0, eps, t)
    out = sched.from_x0_eps(x0, eps, t, kind)
    if kind == "flow":
        assert torch.equal(out, eps - x0)
    x0_back, eps_back = sched.to_x0_eps(out, x_t, t, kind)
    ok = slice(None) if kind == "flow" else slice(1, 3)  # eps from x0 needs sigma > 0, x0 from eps needs sigma < 1
    assert torch.allclose(x0_back[ok], x0[ok], atol=1e-5) and torch.allclose(eps_back[ok], eps[ok], atol=1e-5)


def test_ddim_step_is_the_euler_step_and_its_x0_target_inverts_it():
    sched = FlowSchedule(shift=3.0)
    x_t, v = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t, t_next = torch.tensor([800.0, 800.0]), torch.tensor([300.0, -1.0])
    x0, eps = sched.to_x0_eps(v, x_t, t)
    x_next = sched.ddim_step(x0, eps, t_next)
    sigma, sigma_next = sched.alpha_sigma(t)[1], sched.alpha_sigma(t_next)[1]
    assert sigma_next[1] == 0
    assert torch.allclose(x_next, sched.euler_step(x_t, v, sigma, sigma_next), atol=1e-5)
    assert torch.allclose(sched.ddim_x0_target(x_t, t, x_next, t_next), x0, atol=1e-4)


def test_mu_is_the_pipelines_calculate_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowSchedule.from_scheduler_config(FLUX)
    for n in (256, 1024, 4096, 6000):
        assert sched.mu(n) == calculate_shift(n, 256, 4096, 0.5, 1.15)


@pytest.mark.parametrize("cfg, message", [
    (dict(use_karras_sigmas=True), "use_karras_sigmas"),
    (dict(invert_sigmas=True), "invert_sigmas"),
    (dict(prediction_type="epsilon"), "prediction_type 'epsilon'"),
    (dict(time_shift_type="cubic"), "time_shift_type"),
])
def test_unsupported_scheduler_options_are_one_line_errors(cfg, message):
    with pytest.raises(StepdistillError, match=message):
        FlowSchedule.from_scheduler_config(cfg)


def test_dynamic_shifting_needs_a_resolution():
    with pytest.raises(StepdistillError, match="image_seq_len or mu"):
        FlowSchedule.from_scheduler_config(FLUX).sigmas_for_inference(4)

"""The consistency objective's loss and gradients against an independent hand-written LCM computation."""
import math

import pytest
import torch
from conftest import hand_schedule, hand_x0_eps

from stepdistill.config import ModelConfig, StudentConfig
from stepdistill.models import build_student, load_teacher
from stepdistill.objectives import Batch, DistillSetup, get_objective


def _setup(teacher_path, student_type, **student_kwargs):
    torch.manual_seed(0)
    teacher = load_teacher(ModelConfig(teacher=teacher_path), "cpu")
    student = build_student(teacher, StudentConfig(type=student_type, lora_rank=4, lora_alpha=8, **student_kwargs))
    if student_type == "lora":  # LoRA B starts at zero; perturb so student != teacher and the test means something
        with torch.no_grad():
            for n, p in student.named_parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p))
    return teacher, student


def _batch(teacher):
    g = torch.Generator().manual_seed(1)
    prompts = ["a red circle", "a blue square", "green", ""]
    cond = teacher.prompt_encoder(prompts)
    uncond = teacher.prompt_encoder([""] * 4)
    return Batch(prompts, cond, uncond, torch.randn(4, 4, 8, 8, generator=g))


def _hand_written_lcm_loss(teacher_unet, student_call, target_call, teacher_path, batch, gen, o):
    """LCM's loss written out from the paper/reference script, with the diffusers scheduler's alphas_cumprod and
    the raw outputs (eps or v, as the teacher's scheduler says) converted by hand."""
    alphas_cumprod, prediction_type = hand_schedule(teacher_path)
    T, N = 1000, o["num_ddim_timesteps"]
    k = T // N
    ddim_timesteps = torch.arange(1, N + 1) * k - 1
    b = batch.latents.shape[0]
    # same draws, same order as the objective: timestep index, noise, guidance weight
    t = ddim_timesteps[torch.randint(0, N, (b,), generator=gen)]
    noise = torch.randn(batch.latents.shape, generator=gen)
    w = o["w_min"] + (o["w_max"] - o["w_min"]) * torch.rand(b, generator=gen)
    t_prev = torch.clamp(t - k, min=0)
    a = lambda tt: alphas_cumprod[tt].sqrt().view(-1, 1, 1, 1)  # noqa: E731
    s = lambda tt: (1 - alphas_cumprod[tt]).sqrt().view(-1, 1, 1, 1)  # noqa: E731

    def scalings(tt):
        st = tt.float() * 10.0
        return (0.25 / (st**2 + 0.25)).view(-1, 1, 1, 1), (st / (st**2 + 0.25) ** 0.5).view(-1, 1, 1, 1)

    x_t = a(t) * batch.latents + s(t) * noise
    x0, _ = hand_x0_eps(student_call(x_t, t, batch.cond.embeds, w), x_t, a(t), s(t), prediction_type)
    cs, co = scalings(t)
    pred = cs * x_t + co * x0
    with torch.no_grad():
        out_c = teacher_unet(x_t, t, encoder_hidden_states=batch.cond.embeds).sample
        out_u = teacher_unet(x_t, t, encoder_hidden_states=batch.uncond.embeds).sample
        wv = w.view(-1, 1, 1, 1)
        x0_g, eps_g = hand_x0_eps(out_c + wv * (out_c - out_u), x_t, a(t), s(t), prediction_type)  # CFG 1 + w
        x_prev = a(t_prev) * x0_g + s(t_prev) * eps_g
        x0_tgt, _ = hand_x0_eps(target_call(x_prev, t_prev, batch.cond.embeds, w), x_prev, a(t_prev), s(t_prev),
                                prediction_type)
        cs_p, co_p = scalings(t_prev)
        target = cs_p * x_prev + co_p * x0_tgt
    c = o["huber_c"]
    return (torch.sqrt((pred - target) ** 2 + c * c) - c).mean()


OPTS = dict(num_ddim_timesteps=20, w_min=2.0, w_max=6.0, loss="huber", huber_c=0.001)


def test_consistency_lora_loss_and_grads_match_hand_written(any_tiny_sd):
    """LCM-LoRA's own target (the student itself, lora_ema_target false); the EMA target: the test below."""
    teacher, student = _setup(any_tiny_sd, "lora")
    assert teacher.schedule.prediction_type == hand_schedule(any_tiny_sd)[1]
    cls = get_objective("consistency")
    obj = cls(DistillSetup(teacher, student, "lora", 1e-4, 32, torch.device("cpu")),
              cls.parse_options({**OPTS, "lora_ema_target": False}))
    batch = _batch(teacher)
    loss = obj.losses("student", batch, torch.Generator().manual_seed(7))["loss"]
    params = [p for p in student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)

    unet = teacher.net

    def student_call(x, t, emb, w):  # LoRA student: adapters on
        unet.enable_adapters()
        return unet(x, t, encoder_hidden_states=emb).sample

    class TeacherView:  # the frozen base: adapters off
        def __call__(self, *args, **kwargs):
            unet.disable_adapters()
            try:
                return unet(*args, **kwargs)
            finally:
                unet.enable_adapters()

    ref = _hand_written_lcm_loss(TeacherView(), student_call, student_call, any_tiny_sd, batch,
                                 torch.Generator().manual_seed(7), OPTS)
    for p in params:  # peft's enable/disable toggles requires_grad; the objective's own call already ran
        p.requires_grad_(True)
    ref_grads = torch.autograd.grad(ref, params)
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert abs(loss.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))
    for g, rg in zip(grads, ref_grads):  # fp32 op-order noise only: relative to the gradient's scale
        assert (g - rg).abs().max() <= 1e-3 * rg.abs().max() + 1e-8
    assert sum(g.abs().sum() for g in grads) > 0


def test_consistency_full_student_with_guidance_embedding_uses_ema_target(tiny_sd):
    from stepdistill.denoiser import guidance_scale_embedding

    teacher, student = _setup(tiny_sd, "full", guidance_embedding=True, guidance_embedding_dim=32)
    with torch.no_grad():  # make student, target and teacher all different
        student.time_embedding.cond_proj.weight.normal_(0, 0.02)
    cls = get_objective("consistency")
    obj = cls(DistillSetup(teacher, student, "full", 1e-4, 32, torch.device("cpu")), cls.parse_options(OPTS))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = _batch(teacher)
    loss = obj.losses("student", batch, torch.Generator().manual_seed(3))["loss"]

    call = lambda net: (lambda x, t, emb, w: net(x, t, encoder_hidden_states=emb,  # noqa: E731
                                                  timestep_cond=guidance_scale_embedding(w, 32)).sample)
    ref = _hand_written_lcm_loss(teacher.net, call(student), call(obj.ema.shadow), tiny_sd, batch,
                                 torch.Generator().manual_seed(3), OPTS)
    assert abs(loss.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))
    # the EMA target moves towards the student after an update
    before = obj.ema.shadow.conv_in.weight.clone()
    obj.after_update("student")
    expected = before + (1 - OPTS.get("ema_decay", 0.95)) * (student.conv_in.weight - before)
    assert torch.allclose(obj.ema.shadow.conv_in.weight, expected, atol=1e-7)


def test_consistency_sampling_spec_uses_lcm_grid(tiny_sd):
    teacher, student = _setup(tiny_sd, "lora")
    cls = get_objective("consistency")
    obj = cls(DistillSetup(teacher, student, "lora", 1e-4, 32, torch.device("cpu")),
              cls.parse_options({**OPTS, "num_inference_steps": 4}))
    spec = obj.sampling_spec()
    assert spec.scheduler_class == "LCMScheduler" and spec.guidance_scale == 1.0
    # the student's timesteps lie on the training grid (k = 1000 / 20 = 50: 49, 99, ...)
    grid = set((torch.arange(1, 21) * 50 - 1).tolist())
    for n, ts in spec.timesteps.items():
        assert len(ts) == n and set(ts) <= grid
    assert spec.timesteps[1] == [999]


def test_coarse_grid_spec_lists_only_step_counts_the_grid_has(tiny_sd):
    # a 5-point grid cannot be sampled in 8 steps: the spec must leave 8 out, not fail at export time
    teacher, student = _setup(tiny_sd, "lora")
    cls = get_objective("consistency")
    obj = cls(DistillSetup(teacher, student, "lora", 1e-4, 32, torch.device("cpu")),
              cls.parse_options({**OPTS, "num_ddim_timesteps": 5, "num_inference_steps": 4}))
    spec = obj.sampling_spec()
    assert sorted(spec.timesteps) == [1, 2, 4]
    assert spec.timesteps[4] == [999, 799, 599, 399]
    # asked directly, the scheduler's refusal is one line, not a traceback
    from stepdistill.errors import StepdistillError
    from stepdistill.sampling import scheduler_timesteps

    with pytest.raises(StepdistillError, match="cannot sample in 8 steps"):
        scheduler_timesteps("LCMScheduler", spec.scheduler_config, 8)


@pytest.mark.parametrize("loss", ["l2", "huber"])
def test_distance_primitives(loss):
    from stepdistill.losses import distance

    a, b = torch.zeros(2, 3), torch.tensor([[3.0, 0, 0], [0, 0, 0]])
    d = distance(a, b, loss, huber_c=1.0)
    expected = [3.0, 0.0] if loss == "l2" else [(math.sqrt(10) - 1) / 3, 0.0]
    assert torch.allclose(d, torch.tensor(expected))


def test_guidance_embedded_student_runs_one_network_evaluation_per_step(tiny_sd):
    from stepdistill.sampling import SamplingSpec

    teacher, student = _setup(tiny_sd, "full", guidance_embedding=True, guidance_embedding_dim=32)
    cls = get_objective("consistency")
    spec = cls(DistillSetup(teacher, student, "full", 1e-4, 32, torch.device("cpu")),
               cls.parse_options(OPTS)).sampling_spec()
    assert spec.embedded_guidance and spec.guidance_scale > 1.0
    assert spec.nfe(4) == 4 and spec.nfe(4, guidance_scale=7.5) == 4  # no classifier-free guidance pass
    assert SamplingSpec.from_json(spec.to_json()).embedded_guidance
    old = {k: v for k, v in spec.to_json().items() if k != "embedded_guidance"}  # a spec written before the field
    assert not SamplingSpec.from_json(old).embedded_guidance and SamplingSpec.from_json(old).nfe(4) == 8


def test_consistency_lora_ema_target_is_a_trailing_adapter(tiny_sd):
    """lora_ema_target: the target is the base with a second adapter holding an EMA of the student's adapter
    (hand-written loss with that target), it gets no gradient, and after an update it moves (1 - decay) of the
    way to the student."""
    from stepdistill.denoiser import adapter_scope

    teacher, student = _setup(tiny_sd, "lora")
    opts = {**OPTS, "lora_ema_target": True, "ema_decay": 0.9}
    cls = get_objective("consistency")
    obj = cls(DistillSetup(teacher, student, "lora", 1e-4, 32, torch.device("cpu")), cls.parse_options(opts))
    target_params = {n: p for n, p in student.named_parameters() if ".target." in n}
    student_params = {n: p for n, p in student.named_parameters() if ".student." in n}
    assert target_params and not any(p.requires_grad for p in target_params.values())
    with torch.no_grad():  # the target trails: make it differ from the student
        for n, p in student_params.items():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch(teacher)
    loss = obj.losses("student", batch, torch.Generator().manual_seed(7))["loss"]

    def call(adapter):
        def run(x, t, emb, w):
            with adapter_scope(student, adapter):
                return student(x, t, encoder_hidden_states=emb).sample
        return run

    class TeacherView:
        def __call__(self, *args, **kwargs):
            with adapter_scope(student, None):
                return student(*args, **kwargs)

    ref = _hand_written_lcm_loss(TeacherView(), call("student"), call("target"), tiny_sd, batch,
                                 torch.Generator().manual_seed(7), opts)
    assert abs(loss.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item()))
    own = _hand_written_lcm_loss(TeacherView(), call("student"), call("student"), tiny_sd, batch,
                                 torch.Generator().manual_seed(7), opts)
    assert abs(loss.item() - own.item()) > 1e-4 * abs(own.item())  # the target is not the student itself
    loss.backward()
    assert all(p.grad is None for p in target_params.values())
    name = next(iter(target_params))
    before, live = target_params[name].clone(), student_params[name.replace(".target.", ".student.")]
    obj.after_update("student")
    assert torch.allclose(target_params[name], before + 0.1 * (live - before), atol=1e-7)
    state = obj.state_dict()
    with torch.no_grad():
        target_params[name].zero_()
    obj.load_state_dict(state)
    assert torch.equal(target_params[name], state["target"][name])

"""Teacher loading, prompt encoding parity with diffusers, LoRA students sharing the teacher's weights."""
import torch

from stepdistill.config import ModelConfig, StudentConfig
from stepdistill.denoiser import adapter_scope
from stepdistill.models import build_student, load_teacher


def test_prompt_encoder_matches_pipeline_encode_prompt(tiny_sd, tiny_sdxl):
    import diffusers

    prompts = ["a red circle", "blue square at the top"]
    for path in (tiny_sd, tiny_sdxl):
        teacher = load_teacher(ModelConfig(teacher=path), "cpu")
        pipe = getattr(diffusers, teacher.pipeline_class)(**teacher.components)
        cond = teacher.prompt_encoder(prompts, 32)
        if teacher.pipeline_class == "StableDiffusionPipeline":
            ref, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
            assert torch.allclose(cond.embeds, ref, atol=1e-6)
        else:
            ref, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
            assert torch.allclose(cond.embeds, ref, atol=1e-6) and torch.allclose(cond.pooled, pooled, atol=1e-6)
            assert cond.time_ids.tolist()[0] == [32, 32, 0, 0, 32, 32]
            empty = teacher.prompt_encoder([""], 32)  # SDXL zeroes the empty prompt (force_zeros_for_empty_prompt)
            assert empty.embeds.abs().sum() == 0 and empty.pooled.abs().sum() == 0


def test_lora_student_shares_the_teacher_weights(tiny_sd):
    teacher = load_teacher(ModelConfig(teacher=tiny_sd), "cpu")
    frozen = {n: p.clone() for n, p in teacher.net.named_parameters()}
    student = build_student(teacher, StudentConfig(type="lora", lora_rank=4))
    assert student is teacher.net  # one copy of the base weights
    trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n in trainable)
    with torch.no_grad():
        for n, p in student.named_parameters():
            if "lora_B" in n:
                p.normal_()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    emb = teacher.prompt_encoder(["red"]).embeds
    with torch.no_grad():
        with adapter_scope(student, None):
            as_teacher = student(x, t, encoder_hidden_states=emb).sample
        as_student = student(x, t, encoder_hidden_states=emb).sample
    # a fresh teacher with the original weights gives the adapter-off output
    fresh = load_teacher(ModelConfig(teacher=tiny_sd), "cpu")
    with torch.no_grad():
        ref = fresh.net(x, t, encoder_hidden_states=emb).sample
    assert torch.allclose(as_teacher, ref, atol=1e-6) and not torch.allclose(as_student, ref, atol=1e-3)
    # switching to the teacher keeps the student's parameters trainable
    assert all(p.requires_grad for n, p in student.named_parameters() if n in trainable)
    assert all(torch.equal(p, frozen[n.replace(".base_layer", "")]) for n, p in student.named_parameters()
               if not p.requires_grad and n.replace(".base_layer", "") in frozen)


def test_full_student_is_a_separate_fp32_copy_and_guidance_embedding_starts_as_teacher(tiny_sd):
    teacher = load_teacher(ModelConfig(teacher=tiny_sd), "cpu")
    student = build_student(teacher, StudentConfig(type="full", guidance_embedding=True, guidance_embedding_dim=32))
    assert student is not teacher.net and student.config.time_cond_proj_dim == 32
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.requires_grad for p in teacher.net.parameters())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 900])
    emb = teacher.prompt_encoder(["red", "blue"]).embeds
    from stepdistill.denoiser import guidance_scale_embedding

    with torch.no_grad():
        a = student(x, t, encoder_hidden_states=emb, timestep_cond=guidance_scale_embedding(torch.tensor([3.0, 7.0]), 32)).sample
        b = teacher.net(x, t, encoder_hidden_states=emb).sample
    assert torch.allclose(a, b, atol=1e-5)


def test_adapter_scope_matches_peft_switching_and_restores_state(tiny_sd):
    import pytest

    from stepdistill.objectives.fake_score import FAKE_ADAPTER, add_fake_adapter

    teacher = load_teacher(ModelConfig(teacher=tiny_sd), "cpu")
    unet = build_student(teacher, StudentConfig(type="lora", lora_rank=4))
    add_fake_adapter(unet, rank=2, alpha=2.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_()
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    emb = teacher.prompt_encoder(["red", "blue"]).embeds

    def run():
        with torch.no_grad():
            return unet(x, t, encoder_hidden_states=emb).sample

    outside = run()
    with adapter_scope(unet, FAKE_ADAPTER):
        fake = run()
        with adapter_scope(unet, None):  # nested: the teacher, then back to the fake score
            base = run()
        assert torch.equal(run(), fake)
    assert torch.equal(run(), outside)  # the student adapter is active again
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
    # the same outputs through peft's own switching
    unet.set_adapter(FAKE_ADAPTER)
    assert torch.allclose(run(), fake, atol=1e-6)
    unet.disable_adapters()
    assert torch.allclose(run(), base, atol=1e-6)
    unet.enable_adapters()
    unet.set_adapter("student")
    assert torch.allclose(run(), outside, atol=1e-6) and not torch.allclose(fake, outside, atol=1e-3)
    with pytest.raises(ValueError, match="adapter 'nope'"):
        with adapter_scope(unet, "nope"):
            pass

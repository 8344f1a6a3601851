"""stepdistill.tiny_pipelines: each tiny transformer / flow-matching pipeline builds offline, loads back with its
pipeline class's from_pretrained, samples a finite image in 2 steps, and calls its transformer the way the builder's
docstring says (first call's latent shape and timestep value)."""
import pytest
import torch

from stepdistill import tiny_pipelines as tp

# family: (builder, builder options, pipeline class, call kwargs, image size, first transformer call check)
# The check gets (args, kwargs) of the first transformer call, and the pipeline.


def _sd3(args, kw, pipe):
    assert kw["hidden_states"].shape == (2, 16, 4, 4)  # CFG batch, unpacked latents
    assert float(kw["timestep"][0]) == pytest.approx(1000.0)  # sigma * 1000
    assert kw["pooled_projections"].shape == (2, 16 + 32)


def _flux(args, kw, pipe):
    assert kw["hidden_states"].shape == (1, 4, 64)  # packed 2x2: (32/16)^2 tokens, 4 * 16 channels
    assert float(kw["timestep"][0]) == pytest.approx(1.0)  # sigma (pipeline divides t by 1000)
    assert kw["guidance"] is not None and kw["img_ids"].shape == (4, 3)


def _pixart(args, kw, pipe):
    assert args[0].shape == (2, 4, 4, 4)
    assert kw["timestep"].dtype == torch.int64 and int(kw["timestep"][0]) == 999  # integer DDPM t


def _sana(args, kw, pipe):
    assert args[0].shape == (2, 32, 4, 4)  # 128 px / 32
    assert float(kw["timestep"][0]) == 999.0  # int64(sigma * 1000) (sigma 0.9997) * timestep_scale 1.0 -> float


def _qwen(args, kw, pipe):
    prefix = pipe.prompt_template_encode.split("{}")[0]  # system turn + "<|im_start|>user\n"
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    assert kw["hidden_states"].shape == (1, 4, 64)
    assert float(kw["timestep"][0]) == pytest.approx(1.0)
    assert kw["img_shapes"] == [[(1, 2, 2)]]


def _zimage(args, kw, pipe):
    x_list, t = args[0], args[1]
    assert len(x_list) == 2 and x_list[0].shape == (16, 1, 4, 4)  # list of (C, 1, h, w), CFG doubles the list
    assert float(t[0]) == pytest.approx(0.0)  # 1 - sigma


CASES = {
    "sd3": (tp.build_tiny_sd3, {}, "StableDiffusion3Pipeline", {}, 32, _sd3),
    "sd3-t5-4ch-p1": (tp.build_tiny_sd3, dict(t5=True, latent_channels=4, patch_size=1), "StableDiffusion3Pipeline",
                      dict(max_sequence_length=32), 32, None),
    "flux": (tp.build_tiny_flux, {}, "FluxPipeline", dict(max_sequence_length=32), 32, _flux),
    "pixart-sigma": (tp.build_tiny_pixart_sigma, {}, "PixArtSigmaPipeline",
                     dict(use_resolution_binning=False, max_sequence_length=32), 32, _pixart),
    "sana": (tp.build_tiny_sana, {}, "SanaPipeline", dict(use_resolution_binning=False, max_sequence_length=32),
             128, _sana),
    "qwenimage": (tp.build_tiny_qwenimage, {}, "QwenImagePipeline", dict(max_sequence_length=64), 32, _qwen),
    "zimage": (tp.build_tiny_zimage, {}, "ZImagePipeline", dict(max_sequence_length=64), 32, _zimage),
}


@pytest.mark.parametrize("family", list(CASES))
def test_tiny_pipeline_builds_loads_and_samples(family, tmp_path):
    import diffusers

    torch.set_num_threads(1)
    builder, options, cls_name, call_kw, size, check = CASES[family]
    folder = builder(tmp_path / family, seed=0, **options)
    cls = getattr(diffusers, cls_name)
    pipe = cls.from_pretrained(str(folder), **tp.load_kwargs(folder))
    assert type(pipe) is cls
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    out = pipe("a red square", num_inference_steps=2, height=size, width=size, output_type="pt",
               generator=torch.Generator().manual_seed(0), **call_kw).images
    assert out.shape == (1, 3, size, size)
    assert torch.isfinite(out).all()
    assert len(calls) == 2
    if check is not None:
        check(*calls[0], pipe)


def test_sd3_without_t5_needs_explicit_none_components(tmp_path):
    folder = tp.build_tiny_sd3(tmp_path / "sd3")
    assert tp.load_kwargs(folder)["text_encoder_3"] is None and tp.load_kwargs(folder)["tokenizer_3"] is None
    assert "text_encoder_3" not in tp.load_kwargs(tp.build_tiny_sd3(tmp_path / "sd3-t5", t5=True))

"""stepdistill evaluate: Frechet distance, FID statistics, CLIP score, prompts, generation (resume, 2 processes).

Fast, CPU, offline. A tiny random StableDiffusionPipeline (`stepdistill.testing.build_tiny_pipeline`, 32x32 images)
is built from configs; the shapes world's evaluation models are used where assets/shapes-eval is present (skipped
with a reason otherwise).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import free_port
from stepdistill.errors import StepdistillError
from stepdistill.evaluate import fid as fidmod
from stepdistill.evaluate.fid import FeatureStats, frechet_distance
from stepdistill.frechet import _trace_sqrt_product
from stepdistill.testing import build_tiny_pipeline

REPO = Path(__file__).resolve().parent.parent


def _shapes_models() -> bool:
    from stepdistill.evaluate.core import shapes_eval_available

    if not shapes_eval_available():
        return False
    from stepdistill import shapes_eval

    return (Path(shapes_eval.EVAL_DIR) / shapes_eval.CLIP_CONFIG).is_file()


needs_shapes = pytest.mark.skipif(not _shapes_models(), reason="shapes evaluation models (assets/shapes-eval) "
                                                                 "not built yet")


# ----------------------------------------------------------------------------------------------------------------
# Frechet distance
def _features(seed, n=200, d=16, shift=0.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a + shift


def test_frechet_distance_matches_independent_scipy():
    from scipy import linalg

    f1, f2 = _features(0), _features(1, shift=0.3)
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    # independent formulation: Tr sqrt(S1^1/2 S2 S1^1/2) via a symmetric eigendecomposition
    r1 = linalg.sqrtm(s1).real
    w = linalg.eigvalsh(r1 @ s2 @ r1)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(w, 0, None))))
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-6)
    st1 = FeatureStats.from_features(f1, "test")
    st2 = FeatureStats.from_features(f2, "test")
    assert st1.fid(st2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_self_is_zero_and_handles_singular():
    f = _features(2)
    st = FeatureStats.from_features(f, "test")
    assert abs(frechet_distance(st.mu, st.sigma, st.mu, st.sigma)) < 1e-6
    # fewer samples than dimensions: singular covariances still give a finite, real value
    g1, g2 = _features(3, n=5, d=32), _features(4, n=5, d=32)
    a, b = FeatureStats.from_features(g1, "t"), FeatureStats.from_features(g2, "t")
    v = a.fid(b)
    assert np.isfinite(v) and v > 0
    with pytest.raises(StepdistillError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_fid_matches_torchmetrics_with_custom_feature_module():
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance

    class Feat(torch.nn.Module):
        num_features = 12

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = torch.nn.Linear(3 * 8 * 8, 12)

        def forward(self, x):
            return self.proj(x.float().flatten(1) / 255.0)

    net = Feat().eval()
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.integers(0, 256, (64, 3, 8, 8), dtype=np.uint8))
    fake = torch.from_numpy(rng.integers(40, 200, (64, 3, 8, 8), dtype=np.uint8))
    tm = FrechetInceptionDistance(feature=net)
    tm.update(real, real=True)
    tm.update(fake, real=False)
    expected = float(tm.compute())
    bb = fidmod.Backbone("feat", net, 8, 12)
    got = FeatureStats.from_features(bb.features(real.numpy()), "feat").fid(
        FeatureStats.from_features(bb.features(fake.numpy()), "feat"))
    assert got == pytest.approx(expected, rel=1e-3)


def test_stats_npz_roundtrip_and_backbone_mismatch(tmp_path):
    st = FeatureStats.from_features(_features(5), "shapes-encoder", 32, "x")
    st.save(tmp_path / "s.npz")
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.n == 200 and back.backbone == "shapes-encoder" and np.array_equal(back.sigma, st.sigma)
    other = FeatureStats.from_features(_features(6), "inception-v3-2048")
    with pytest.raises(StepdistillError, match="backbone"):
        back.fid(other)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(StepdistillError):
        FeatureStats.load(tmp_path / "bad.npz")


def test_preprocess_center_crops_and_resizes_bicubic():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # a blue left band that the center crop removes
    x = fidmod.preprocess(img, 8)
    assert x.shape == (3, 8, 8) and x.dtype == np.uint8
    assert x[2].max() == 0 and x[0].min() == 255


def test_inception_without_weights_is_a_clear_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("STEPDISTILL_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(StepdistillError) as e:
        fidmod.load_backbone("inception")
    msg = str(e.value)
    assert "\n" not in msg and "--inception-weights" in msg
    with pytest.raises(StepdistillError, match="does not exist"):
        fidmod.load_backbone("inception", inception_weights=str(tmp_path / "missing.pth"))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A weights file in the format of the real pt_inception weights (random values: no download)."""
    pytest.importorskip("torch_fidelity")
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    mp = pytest.MonkeyPatch()
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    torch.manual_seed(0)
    sd = fe.FeatureExtractorInceptionV3("x", ["2048"]).state_dict()
    mp.undo()
    path = tmp_path_factory.mktemp("inception") / "inception.pth"
    torch.save(sd, path)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# prompts
def test_prompt_files(tmp_path):
    from stepdistill.evaluate.prompts import load_prompts

    (tmp_path / "p.txt").write_text("a cat\n\n# comment\na dog\n")
    assert load_prompts(str(tmp_path / "p.txt")).prompts == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"caption": "x", "id": 1}\n"y"\n')
    assert load_prompts(str(tmp_path / "p.jsonl")).prompts == ["x", "y"]
    (tmp_path / "p.csv").write_text("id,text,other\n1,hello,zz\n2,world,zz\n")
    assert load_prompts(str(tmp_path / "p.csv")).prompts == ["hello", "world"]
    assert load_prompts(str(tmp_path / "p.csv"), column="other").prompts == ["zz", "zz"]
    with pytest.raises(StepdistillError, match="--prompt-column"):
        load_prompts(str(tmp_path / "p.csv"), column="nope")
    with pytest.raises(StepdistillError):
        load_prompts(str(tmp_path / "missing.txt"))
    ps = load_prompts("shapes:test", num=5)
    assert ps.shapes_split == "test" and len(ps.take(7)) == 7 and ps.take(7)[5] == ps.prompts[0]


def test_coco_subset_is_seeded_one_caption_per_image(tmp_path):
    from stepdistill.evaluate.prompts import load_prompts

    ann = {"images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(50)],
           "annotations": [{"image_id": i, "id": 10 * i + k, "caption": f"image {i} caption {k}"}
                           for i in range(50) for k in range(5)]}
    (tmp_path / "captions_val2014.json").write_text(json.dumps(ann))
    a = load_prompts(str(tmp_path / "captions_val2014.json"), coco_subset_size=20, seed=3)
    b = load_prompts(str(tmp_path / "captions_val2014.json"), coco_subset_size=20, seed=3)
    c = load_prompts(str(tmp_path / "captions_val2014.json"), coco_subset_size=20, seed=4)
    assert a.prompts == b.prompts and a.prompts != c.prompts and len(a.prompts) == 20
    ids = [im["id"] for im in a.coco_images]
    assert len(set(ids)) == 20
    assert all(p.startswith(f"image {i} ") for p, i in zip(a.prompts, ids))
    assert len(load_prompts(str(tmp_path / "captions_val2014.json")).prompts) == 250
    with pytest.raises(StepdistillError, match="larger"):
        load_prompts(str(tmp_path / "captions_val2014.json"), coco_subset_size=51)


# ----------------------------------------------------------------------------------------------------------------
# the shapes world (skipped until helper-1's evaluation models are committed)
@needs_shapes
def test_shapes_real_images_score_far_better_than_noise():
    from stepdistill.data.shapes import sample
    from stepdistill.evaluate.core import reference_stats
    from stepdistill.evaluate.dist import Dist

    bb = fidmod.load_backbone("shapes")
    n = 192
    ref = reference_stats("shapes:test", bb, Dist(), image_size=32, n=n, use_cache=False, log=lambda *a: None)
    val = reference_stats("shapes:val", bb, Dist(), image_size=32, n=n, use_cache=False, log=lambda *a: None)
    rng = np.random.default_rng(0)
    noise = np.stack([fidmod.preprocess(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
                                        bb.image_size) for _ in range(n)])
    fid_noise = FeatureStats.from_features(bb.features(noise), bb.name).fid(ref)
    fid_real = val.fid(ref)
    assert fid_real * 5 < fid_noise, (fid_real, fid_noise)
    # the same images against themselves
    imgs = np.stack([fidmod.preprocess(sample("test", i, 32)["image"], bb.image_size) for i in range(n // 2)])
    half = FeatureStats.from_features(bb.features(imgs), bb.name)
    assert abs(half.fid(half)) < 1e-3 * fid_real  # ~0 (96 images < 128 features: singular covariance)


@needs_shapes
def test_clip_score_ranks_matched_captions_above_shuffled():
    from stepdistill.data.shapes import sample
    from stepdistill.evaluate.clip_score import load_clip

    scorer = load_clip("shapes")
    items = [sample("test", i, 32) for i in range(64)]
    images, caps = [it["image"] for it in items], [it["caption"] for it in items]
    matched = scorer.scores(images, caps).mean()
    shuffled = scorer.scores(images, caps[1:] + caps[:1]).mean()
    assert matched > shuffled + 1.0, (matched, shuffled)
    assert "shapes" in scorer.name


def test_clip_model_errors_are_clear():
    from stepdistill.evaluate.clip_score import load_clip

    with pytest.raises(StepdistillError, match="unknown open_clip model"):
        load_clip("NoSuchModel")
    with pytest.raises(StepdistillError, match="neither a file nor a tag"):
        load_clip("ViT-B-32", "no-such-tag")


# ----------------------------------------------------------------------------------------------------------------
# end to end: generation, resume, two processes
NUM = 8
STEPS = "1,2"


def _eval_args(model, out, extra=()):
    metrics = (["--clip-model", "shapes"] if _shapes_models() else ["--reference", "none", "--clip-model", "none"])
    return ["evaluate", model, "--steps", STEPS, "--num-images", str(NUM), "--batch-size", "4",
            "--eval-batch-size", "4", "--speed-batches", "1", "--out", str(out), "--device", "cpu", "--quiet",
            *metrics, *extra]


def _run_inprocess(argv):
    from stepdistill.evaluate.cli import main

    assert main(argv) == 0


def _metrics(report):
    keys = ("label", "steps", "nfe", "fid", "clip_score", "attribute_accuracy")
    return [{k: r.get(k) for k in keys} for r in report["rows"]]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    mp = pytest.MonkeyPatch()
    mp.setenv("STEPDISTILL_CACHE", str(root / "cache"))  # reference statistics cache, shared by the runs here
    model = str(build_tiny_pipeline(root / "tiny"))
    out = root / "single"
    _run_inprocess(_eval_args(model, out))
    yield model, out, json.loads((out / "report.json").read_text())
    mp.undo()


def test_evaluate_writes_images_report_plots_and_grids(evaluated):
    model, out, report = evaluated
    for s in (1, 2):
        pngs = sorted((out / "tiny" / f"steps_{s}").glob("0*.png"))
        assert [p.name for p in pngs] == [f"{i:05d}.png" for i in range(NUM)]
        assert (out / "tiny" / f"steps_{s}" / "grid.png").is_file()
    rows = [r for r in report["rows"] if r["role"] != "real"]
    assert [(r["steps"], r["nfe"]) for r in rows] == [(1, 2), (2, 4)]  # guidance 7.5 -> CFG doubles NFE
    for r in rows:
        assert r["speed"]["ms_per_image"] > 0 and r["speed"]["timed_images"] == 4
    md = (out / "report.md").read_text()
    assert "| model | steps | NFE |" in md and "ms/img" in md and report["device"]
    if _shapes_models():
        assert (out / "fid_vs_nfe.png").is_file() and (out / "clip_vs_nfe.png").is_file()
        assert all(r["fid"] is not None and r["clip_score"] is not None for r in rows)
        assert report["fid"]["floor"]["fid"] >= 0


def test_resume_half_finished_evaluation_gives_same_report(evaluated, tmp_path):
    model, out, report = evaluated
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for f in ("report.json", "report.md"):
        (resumed / f).unlink()
    shutil.rmtree(resumed / "tiny" / "steps_2")
    for i in range(4, NUM):  # the second batch of steps_1 never got written
        (resumed / "tiny" / "steps_1" / f"{i:05d}.png").unlink()
    (resumed / "tiny" / "steps_1" / ".00005.png.tmp").write_bytes(b"half")  # a write cut off by the kill
    _run_inprocess(_eval_args(model, resumed, ["--speed-batches", "0"]))
    again = json.loads((resumed / "report.json").read_text())
    assert _metrics(again) == _metrics(report)
    assert [r["generated_now"] for r in again["rows"] if r["role"] != "real"] == [4, NUM]
    for s in (1, 2):
        for i in range(NUM):
            a = (out / "tiny" / f"steps_{s}" / f"{i:05d}.png").read_bytes()
            assert a == (resumed / "tiny" / f"steps_{s}" / f"{i:05d}.png").read_bytes()


def test_rerun_with_other_settings_refuses_to_mix_images(evaluated, tmp_path):
    model, out, _ = evaluated
    other = tmp_path / "other"
    shutil.copytree(out / "tiny", other / "tiny")
    from stepdistill.evaluate.cli import main

    assert main(_eval_args(model, other, ["--guidance", "3.0", "--steps", "1"])) == 2


def test_two_processes_give_the_same_images_and_report(evaluated, tmp_path):
    model, out, report = evaluated
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate launcher not found beside the python executable")
    import torch

    out2 = tmp_path / "two"
    # each process with this process's thread count: conv results depend on it in the last bits, sharding must not
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO) + os.pathsep +
           os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "stepdistill", *_eval_args(model, out2, ["--speed-batches", "0"])]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    two = json.loads((out2 / "report.json").read_text())
    assert two["processes"] == 2
    assert _metrics(two) == _metrics(report)
    for s in (1, 2):
        for i in range(NUM):
            assert (out / "tiny" / f"steps_{s}" / f"{i:05d}.png").read_bytes() == \
                (out2 / "tiny" / f"steps_{s}" / f"{i:05d}.png").read_bytes(), (s, i)


def _fast_trace_sqrt_product(s1, s2, eps):
    """Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2) with symmetric eigensolvers (seconds, not minutes, at 2048-d)."""
    from scipy import linalg

    w, v = linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(np.sum(np.sqrt(np.clip(linalg.eigvalsh(r @ s2 @ r), 0, None))))


def test_fast_trace_sqrt_matches_sqrtm():
    f1, f2 = _features(7), _features(8, shift=1.0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    assert _fast_trace_sqrt_product(s1, s2, 1e-6) == pytest.approx(_trace_sqrt_product(s1, s2, 1e-6), rel=1e-8)


def test_fid_stats_on_a_folder_with_inception(inception_weights, tmp_path):
    """fid-stats on a folder of non-square images -> .npz with mu, sigma, n and the backbone name."""
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(ref / f"{i}.jpg")
    _run_inprocess(["fid-stats", str(ref), "-o", str(tmp_path / "ref.npz"), "--backbone", "inception",
                    "--inception-weights", inception_weights, "--batch-size", "3", "--device", "cpu"])
    st = FeatureStats.load(tmp_path / "ref.npz")
    assert st.n == 6 and st.backbone == "inception-v3-2048" and st.mu.shape == (2048,)
    assert st.sigma.shape == (2048, 2048) and st.sigma.dtype == np.float64 and np.isfinite(st.sigma).all()
    bb = fidmod.load_backbone("inception", inception_weights=inception_weights)
    assert bb.name == "inception-v3-2048" and bb.image_size == 299 and bb.num_features == 2048


@needs_shapes
def test_evaluate_against_precomputed_stats(evaluated, tmp_path):
    """fid-stats shapes:test -> .npz; evaluate --reference stats.npz; a stats file of another backbone is refused."""
    model, _, _ = evaluated
    _run_inprocess(["fid-stats", "shapes:test", "-o", str(tmp_path / "ref.npz"), "--backbone", "shapes",
                    "--image-size", "32", "--num-images", "16", "--device", "cpu"])
    out = tmp_path / "eval"
    (tmp_path / "prompts.txt").write_text("a large red circle at the center on a black background\n")
    args = ["evaluate", model, "--steps", "1", "--num-images", "4", "--batch-size", "4", "--prompts",
            str(tmp_path / "prompts.txt"), "--reference", str(tmp_path / "ref.npz"), "--backbone", "shapes",
            "--clip-model", "none", "--speed-batches", "0", "--out", str(out), "--device", "cpu", "--quiet"]
    _run_inprocess(args)
    report = json.loads((out / "report.json").read_text())
    assert report["fid"]["backbone"] == "shapes-encoder" and report["fid"]["reference_images"] == 16
    assert np.isfinite(report["rows"][0]["fid"]) and (out / "fid_vs_nfe.png").is_file()
    FeatureStats.from_features(_features(9, d=4), "inception-v3-2048").save(tmp_path / "other.npz")
    from stepdistill.evaluate.cli import main

    args[args.index(str(tmp_path / "ref.npz"))] = str(tmp_path / "other.npz")
    assert main(args) == 2


def test_evaluate_a_lora_export_with_its_sampling_spec(evaluated, tmp_path):
    """An export folder (LoRA + stepdistill.json) is sampled with its own scheduler, step count and guidance."""
    import torch

    from stepdistill.config import ModelConfig, StudentConfig
    from stepdistill.export import export_student
    from stepdistill.models import build_student, load_teacher
    from stepdistill.objectives import DistillSetup, get_objective

    model, _, _ = evaluated
    torch.manual_seed(0)
    teacher = load_teacher(ModelConfig(teacher=model), "cpu")
    student = build_student(teacher, StudentConfig(type="lora", lora_rank=4, lora_alpha=8))
    cls = get_objective("consistency")
    obj = cls(DistillSetup(teacher, student, "lora", 1e-4, 32, torch.device("cpu")),
              cls.parse_options({"num_ddim_timesteps": 20, "num_inference_steps": 2}))
    spec = obj.sampling_spec()
    export = export_student(teacher, student, spec, "lora", tmp_path / "lcm-lora", "lora")
    out = tmp_path / "eval"
    _run_inprocess(["evaluate", str(export), "--num-images", "4", "--batch-size", "4", "--reference", "none",
                    "--clip-model", "none", "--speed-batches", "0", "--out", str(out), "--device", "cpu",
                    "--quiet"])
    rows = json.loads((out / "report.json").read_text())["rows"]
    gen = [r for r in rows if r["role"] != "real"]
    assert [(r["label"], r["steps"], r["nfe"]) for r in gen] == [("lcm-lora", spec.num_inference_steps,
                                                                  spec.nfe(spec.num_inference_steps))]
    assert gen[0]["scheduler"] == spec.scheduler_class and gen[0]["format"] == "lora"
    assert len(list((out / "lcm-lora" / f"steps_{spec.num_inference_steps}").glob("0*.png"))) == 4


def test_cli_errors_are_one_line(tmp_path, capsys):
    from stepdistill.evaluate.cli import main

    assert main(["evaluate", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert main(["evaluate", str(tmp_path / "nope"), "--prompts", str(tmp_path / "none.txt"),
                 "--out", str(tmp_path / "o")]) == 2


def test_missing_inception_weights_stop_the_run_before_generation(evaluated, tmp_path, monkeypatch, capsys):
    from stepdistill.evaluate.cli import main

    model, _, _ = evaluated
    monkeypatch.delenv("STEPDISTILL_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "ref").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "ref" / "a.png")
    out = tmp_path / "o"
    assert main(["evaluate", model, "--steps", "1", "--num-images", "2", "--reference", str(tmp_path / "ref"),
                 "--backbone", "inception", "--clip-model", "none", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--inception-weights" in err and "\n" not in err
    assert not list(out.rglob("*.png"))

"""Is a consistency student's second step worse because of what it is handed, or because of the step itself?

A 2-step LCM sample is: x0_1 = f(noise, T - 1); x_t = alpha_t x0_1 + sigma_t eps; x0 = f(x_t, t). This probe
replaces x0_1 by other images of the same prompts and scores f(x_t, t) alone (FID in the shapes encoder's features
against shapes:test, as `stepdistill evaluate` does for the same number of images):

    student   x0_1 from the student's own first step (the ordinary 2-step sample)
    teacher   the teacher's sample for the same prompt and seed (a folder of evaluate's PNGs, VAE-encoded)
    real      the real test image of that prompt (VAE-encoded)

If the student's step from re-noised teacher or real images is as good as its one-step sample, the loss at two
steps comes from re-noising its own (slightly off) samples; if not, the step at t itself is weaker.

    python tools/lcm_restart_probe.py EXPORT --teacher-images EVAL/teacher/steps_25 --t 749 499 --n 300
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from stepdistill.data.shapes import sample as shapes_sample
from stepdistill.evaluate import fid as fidmod
from stepdistill.evaluate.core import _load_rgb, reference_stats
from stepdistill.evaluate.dist import Dist
from stepdistill.evaluate.generate import image_path
from stepdistill.evaluate.prompts import load_prompts
from stepdistill.losses import consistency_boundary_scalings
from stepdistill.sampling import load_pipeline


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--teacher-images", required=True)
    ap.add_argument("--t", type=int, nargs="+", default=[749, 499])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--batch", type=int, default=50)
    a = ap.parse_args()
    torch.manual_seed(0)
    pipe, spec = load_pipeline(a.export)
    unet, vae, sched = pipe.unet, pipe.vae, pipe.scheduler
    sf = vae.config.scaling_factor
    ac = sched.alphas_cumprod.double()
    kind = sched.config.prediction_type
    prompts = load_prompts("shapes:test", num=a.n).take(a.n)
    backbone = fidmod.load_backbone("shapes")
    ref = reference_stats("shapes:test", backbone, Dist("cpu"), image_size=32, n=a.n, log=lambda *x: None)
    scaling = spec.scheduler_config.get("timestep_scaling", 10.0)

    def f(x, t, emb):
        """The consistency function as LCMScheduler applies it: c_skip x + c_out x0_pred(x, t)."""
        tt = torch.full((x.shape[0],), t)
        out = unet(x, tt, encoder_hidden_states=emb).sample
        al, si = ac[t].sqrt().float(), (1 - ac[t]).sqrt().float()
        x0 = al * x - si * out if kind == "v_prediction" else (x - si * out) / al if kind == "epsilon" else out
        c_skip, c_out = consistency_boundary_scalings(tt, timestep_scaling=scaling)
        return c_skip.reshape(-1, 1, 1, 1) * x + c_out.reshape(-1, 1, 1, 1) * x0

    def encode(images):
        px = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
                          for im in images]) / 127.5 - 1
        return vae.encode(px).latent_dist.mean * sf

    def score(latents):
        ims = pipe.image_processor.postprocess(vae.decode(latents / sf).sample, output_type="pil")
        feats = backbone.features(np.stack([fidmod.preprocess(im, backbone.image_size) for im in ims]))
        return feats

    rows = {}
    with torch.no_grad():
        for i in range(0, a.n, a.batch):
            idx = list(range(i, min(i + a.batch, a.n)))
            emb = pipe.encode_prompt([prompts[j] for j in idx], "cpu", 1, False)[0]
            gens = [torch.Generator().manual_seed(j) for j in idx]
            z = torch.stack([torch.randn((4, 8, 8), generator=g) for g in gens])
            starts = {"student": f(z, 999, emb),
                      "teacher": encode([_load_rgb(image_path(Path(a.teacher_images), j)) for j in idx]),
                      "real": encode([shapes_sample("test", j, 32, 0)["image"] for j in idx])}
            rows.setdefault("one step (t = 999)", []).append(score(starts["student"]))
            for t in a.t:
                eps = torch.stack([torch.randn((4, 8, 8), generator=g) for g in gens])
                al, si = ac[t].sqrt().float(), (1 - ac[t]).sqrt().float()
                for name, x0 in starts.items():
                    rows.setdefault(f"{name} re-noised to t = {t}, one step", []).append(
                        score(f(al * x0 + si * eps, t, emb)))
            for name in ("teacher", "real"):
                rows.setdefault(f"{name} images themselves", []).append(score(starts[name]))
    print(f"| start (x0_1) | FID ({a.n} images) |\n|---|---|")
    for name, feats in rows.items():
        st = fidmod.FeatureStats.from_features(np.concatenate(feats), backbone.name, backbone.image_size or 0)
        print(f"| {name} | {st.fid(ref):.1f} |")


if __name__ == "__main__":
    main()

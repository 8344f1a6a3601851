"""Per timestep: how far a consistency (LCM-LoRA) student's x0 is from the teacher's own DDIM-25 solution of its
(CFG 1 / 3 / 4 / 5) ODE from the same x_t (64 noised test latents), and the std of each.

    python tools/lcm_per_timestep.py RUN_DIR      # a finished consistency run (RUN_DIR/final/student.safetensors)

Also prints the teacher's own one-step x0 error against its CFG-3 ODE at each t: what a student should beat.
"""
import sys, torch
from safetensors.torch import load_file
from stepdistill.objectives import load_run_config, DistillSetup, get_objective
from stepdistill.models import load_teacher, build_student, load_trainable_state_dict
from stepdistill.data.shapes import ShapesDataset
torch.set_num_threads(1)
run = sys.argv[1]
cfg = load_run_config(f"{run}/config.yaml")
teacher = load_teacher(cfg.model, "cpu")
student = build_student(teacher, cfg.student)
load_trainable_state_dict(student, load_file(f"{run}/final/student.safetensors"), "w")
cls = get_objective("consistency")
obj = cls(DistillSetup(teacher, student, cfg.student.type, 1e-4, 32, torch.device("cpu")),
          cls.parse_options(cfg.objective.options))
ds = ShapesDataset("test", length=64)
items = [ds[i] for i in range(64)]
import numpy as np
px = torch.stack([torch.from_numpy(np.asarray(it["image"])).permute(2,0,1).float()/127.5-1 for it in items])
with torch.no_grad():
    z0 = teacher.to_latents(teacher.vae.encode(px).latent_dist.mean)
prompts = [it["caption"] for it in items]
cond, uncond = teacher.prompt_encoder(prompts, 32), teacher.prompt_encoder([""]*64, 32)
sched, T = teacher.schedule, 1000
g = torch.Generator().manual_seed(0)
w = torch.full((64,), 2.0)  # CFG 3 (LCM w = scale - 1)
for t0 in [999, 799, 499, 299, 99]:
    t = torch.full((64,), t0)
    x = sched.add_noise(z0, torch.randn(z0.shape, generator=g), t)
    with torch.no_grad():
        s = obj.consistency_fn(obj.student_eval, x, t, cond, w)
        x0t, _ = obj.teacher.guided_x0_eps(x, t, cond, uncond, 3.0)
        # teacher DDIM from t on a 25-point trailing grid below t
        ts = [int(v) for v in torch.linspace(t0, 0, 25).round()]
        ys = {}
        for scale in (1.0, 3.0, 4.0, 5.0):
            y = x
            for j, tt in enumerate(ts):
                a0, e0 = obj.teacher.guided_x0_eps(y, torch.full((64,), tt), cond, uncond, scale)
                y = a0 if j == len(ts) - 1 else sched.ddim_step(a0, e0, torch.full((64,), ts[j+1]))
            ys[scale] = y
    mse = lambda a, y: ((a - y) ** 2).mean().item()
    print(f"t={t0}: student vs ODE cfg1/3/4/5 " + " ".join(f"{mse(s, y):.4f}" for y in ys.values()) +
          f" | std student {s.std():.3f} ode " + " ".join(f"{y.std():.3f}" for y in ys.values()) + f" data {z0.std():.3f}"
          f" | teacher one-step x0 vs ODE cfg3 {mse(x0t, ys[3.0]):.4f}")

"""`model.teacher=org/name` loads from a local Hugging Face cache laid out as the hub's, with HF_HUB_OFFLINE=1
(revision and variant included), and a hub id that is not cached says so in one line."""
import json
import os
import subprocess
import sys
import textwrap

CHECK = textwrap.dedent("""
    import json
    from stepdistill.config import ModelConfig
    from stepdistill.errors import StepdistillError
    from stepdistill.models import load_teacher

    out = {}
    main = load_teacher(ModelConfig(teacher="org/tiny-sd"))
    out["main"] = [main.pipeline_class, float(next(main.net.parameters()).flatten()[0])]
    v2 = load_teacher(ModelConfig(teacher="org/tiny-sd", revision="v2", variant="fp16"))
    out["v2"] = [v2.pipeline_class, float(next(v2.net.parameters()).flatten()[0])]
    try:
        load_teacher(ModelConfig(teacher="org/not-cached"))
    except StepdistillError as err:
        out["missing"] = str(err)
    print("RESULT " + json.dumps(out))
""")


def _hub_cache(root, pipe):
    """models--org--tiny-sd with refs main -> snapshot a (plain weights), v2 -> snapshot b (fp16 variant files)."""
    import torch

    repo = root / "hub" / "models--org--tiny-sd"
    pipe.save_pretrained(str(repo / "snapshots" / ("a" * 40)))
    with torch.no_grad():  # the v2 snapshot's weights differ, so the test sees which one was loaded
        next(pipe.unet.parameters()).add_(1.0)
    pipe.save_pretrained(str(repo / "snapshots" / ("b" * 40)), variant="fp16")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    (repo / "refs" / "v2").write_text("b" * 40)
    return repo


def test_hub_id_loads_from_the_local_cache_offline(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    first = float(next(pipe.unet.parameters()).flatten()[0])
    repo = _hub_cache(tmp_path / "hf", pipe)
    assert sorted(os.listdir(repo / "snapshots" / ("b" * 40) / "unet")) == ["config.json",
                                                                           "diffusion_pytorch_model.fp16.safetensors"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result["main"] == ["StableDiffusionPipeline", first]
    assert result["v2"][0] == "StableDiffusionPipeline" and abs(result["v2"][1] - (first + 1.0)) < 1e-6
    assert "offline" in result["missing"] and "\n" not in result["missing"]

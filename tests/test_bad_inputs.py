"""Bad input refused (issue 13, item 4): every kind of bad input a user can give, driven through the real CLI entry
point `stepdistill.cli.main`, gets exit code 2 and exactly one line `error: <what is wrong>; <how to fix it>` on
stderr (no traceback), and leaves everything on disk as it was: the test's own folder (the bad config, the existing
output files), the trained run and its export, and the teacher are compared byte for byte before and after.

`CASES` is the table; docs/bad_inputs.md lists every case (`test_doc_lists_every_case` keeps the two in step).
To refresh the messages shown there:

    STEPDISTILL_RECORD_BAD_INPUTS=/tmp/bad.json python -m pytest -q tests/test_bad_inputs.py
    python tests/test_bad_inputs.py /tmp/bad.json > docs/bad_inputs.md
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "bad_inputs.md"
RECORD = os.environ.get("STEPDISTILL_RECORD_BAD_INPUTS")


def _writes_read_only_folders() -> bool:
    """True when this process may write into a mode-0555 folder anyway (root with CAP_DAC_OVERRIDE)."""
    import tempfile

    folder = tempfile.mkdtemp()
    try:
        os.chmod(folder, 0o555)
        return os.access(folder, os.W_OK)
    finally:
        os.chmod(folder, 0o755)
        os.rmdir(folder)


WRITES_READ_ONLY = _writes_read_only_folders()


@dataclass
class Case:
    id: str
    kind: str
    what: str  # the bad input, as the doc shows it
    argv: list[str]  # {teacher} {run} {export} {tmp} are filled in
    phrase: str  # must be in the error line (formatted like argv)
    setup: Callable[[Path, "Ctx"], None] | None = None
    marks: tuple = ()
    env: dict = field(default_factory=dict)
    today: str | None = None  # xfail rows: what the user gets now, and the fix it needs


@dataclass
class Ctx:
    teacher: Path
    run: Path  # a trained 2-step LoRA run with its export and a checkpoint


# A small, valid training command line; a case adds the one bad override (later overrides win).
TRAIN = ["train", "model.teacher={teacher}", "train.output_dir={tmp}/run", "train.max_steps=1", "train.batch_size=2",
         "train.progress=false", "train.export=none", "data.max_samples=8", "student.lora_rank=4",
         "train.sample_prompts=[a red circle]", "objective.options.num_ddim_timesteps=10"]
SAMPLE = ["sample", "{export}", "--prompt", "a red circle", "--num-images", "1", "--out", "{tmp}/grid.png"]
EVALUATE = ["evaluate", "{export}", "--num-images", "2", "--out", "{tmp}/eval", "--quiet"]


def train(*extra: str) -> list[str]:
    return [*TRAIN, *extra]


def sample(*extra: str) -> list[str]:
    return [*SAMPLE, *extra]


def evaluate(*extra: str) -> list[str]:
    return [*EVALUATE, *extra]


def write(name: str, data: str | bytes) -> Callable:
    def setup(tmp: Path, ctx: Ctx) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return setup


def setups(*fns: Callable) -> Callable:
    def setup(tmp: Path, ctx: Ctx) -> None:
        for fn in fns:
            fn(tmp, ctx)
    return setup


def existing_grid(tmp: Path, ctx: Ctx) -> None:
    (tmp / "grid.png").write_bytes(b"an earlier grid the user keeps")


def teacher_copy(change: Callable[[Path], None]) -> Callable:
    def setup(tmp: Path, ctx: Ctx) -> None:
        shutil.copytree(ctx.teacher, tmp / "teacher")
        change(tmp / "teacher")
    return setup


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def export_copy(change: Callable[[Path], None]) -> Callable:
    def setup(tmp: Path, ctx: Ctx) -> None:
        shutil.copytree(ctx.run / "export", tmp / "export")
        change(tmp / "export")
    return setup


def read_only(name: str) -> Callable:
    def setup(tmp: Path, ctx: Ctx) -> None:
        (tmp / name).mkdir()
        (tmp / name / "keep.txt").write_text("the user's")
        os.chmod(tmp / name, 0o555)
    return setup


def image_folder(files: dict[str, bytes], lines: list[dict]) -> Callable:
    def setup(tmp: Path, ctx: Ctx) -> None:
        folder = tmp / "images"
        folder.mkdir()
        for name, data in files.items():
            (folder / name).write_bytes(data)
        (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return setup


NOT_AS_ROOT = pytest.mark.skipif(WRITES_READ_ONLY, reason="this user (root) writes into read-only folders: nothing to "
                                                           "refuse")

CASES = [
    # --- config keys, types and values ------------------------------------------------------------------------
    Case("config-unknown-key", "config key", "unknown key: `train.max_step=5`", train("train.max_step=5"),
         "unknown config key 'train.max_step' (did you mean 'max_steps'?)"),
    Case("config-unknown-section", "config key", "unknown section: `trian.max_steps=5`", train("trian.max_steps=5"),
         "unknown config key 'trian' (did you mean 'train'?)"),
    Case("config-wrong-type", "config type", "a string where an integer goes: `train.max_steps=abc`",
         train("train.max_steps=abc"), "config key 'train.max_steps' must be an integer, got 'abc'"),
    Case("config-not-a-choice", "config type", "a value not among the choices: `model.dtype=fp8`",
         train("model.dtype=fp8"), "config key 'model.dtype' must be one of 'auto'"),
    Case("value-negative-lr", "config value", "`train.lr=-1`", train("train.lr=-1"),
         "config key 'train.lr' must be a finite number > 0, got -1.0"),
    Case("value-nan-lr", "config value", "`train.lr=.nan`", train("train.lr=.nan"),
         "config key 'train.lr' must be a finite number > 0, got nan"),
    Case("value-adam-beta1", "config value", "`train.adam_beta1=2`", train("train.adam_beta1=2"),
         "config key 'train.adam_beta1' must be a finite number in [0, 1), got 2.0"),
    Case("value-batch-size-0", "config value", "`train.batch_size=0`", train("train.batch_size=0"),
         "config key 'train.batch_size' must be > 0, got 0"),
    Case("value-warmup-negative", "config value", "`train.warmup_steps=-5`", train("train.warmup_steps=-5"),
         "config key 'train.warmup_steps' must be >= 0, got -5"),
    Case("value-max-samples-0", "config value", "`data.max_samples=0`", train("data.max_samples=0"),
         "config key 'data.max_samples' must be > 0"),
    Case("value-resolution-vae", "config value", "a resolution the VAE and UNet cannot take: `data.resolution=30`",
         train("data.resolution=30"), "'data.resolution' must be a multiple of 8 for this teacher"),
    # --- config files and overrides -----------------------------------------------------------------------------
    Case("config-file-yaml-syntax", "config file", "a YAML syntax error (an unclosed `[`)", ["train", "{tmp}/bad.yaml"],
         "config file '{tmp}/bad.yaml' is not valid YAML at line 3",
         setup=write("bad.yaml", "train:\n  max_steps: [1\n")),
    Case("config-file-not-a-mapping", "config file", "a config file holding a list", ["train", "{tmp}/list.yaml"],
         "config file '{tmp}/list.yaml' must hold a mapping of sections, got list",
         setup=write("list.yaml", "- a\n- b\n")),
    Case("config-file-missing", "config file", "a config file that does not exist", ["train", "{tmp}/nope.yaml"],
         "config file '{tmp}/nope.yaml' not found"),
    Case("override-without-equals", "override", "`train CONFIG train.max_steps` (no `=value`)",
         ["train", "{tmp}/ok.yaml", "train.max_steps"], "override 'train.max_steps' must look like key.sub=value",
         setup=write("ok.yaml", "train:\n  max_steps: 2\n")),
    Case("override-without-equals-first", "override", "`train train.max_steps` (no CONFIG, no `=value`)",
         ["train", "train.max_steps"], "must look like key.sub=value"),
    Case("objective-unknown", "objective", "`objective.name=consistensy`", train("objective.name=consistensy"),
         "unknown objective 'consistensy' (did you mean 'consistency'?)"),
    Case("objective-option-unknown", "objective", "`objective.options.bogus=1`", train("objective.options.bogus=1"),
         "unknown config key 'objective.options.bogus'"),
    Case("objective-option-value", "objective", "`objective.options.num_ddim_timesteps=0`",
         train("objective.options.num_ddim_timesteps=0"), "num_ddim_timesteps must be in [1, 1000]"),
    # --- the teacher ----------------------------------------------------------------------------------------------
    Case("teacher-missing", "teacher", "a teacher folder that does not exist", train("model.teacher={tmp}/nothere"),
         "teacher path '{tmp}/nothere' does not exist"),
    Case("teacher-not-a-pipeline", "teacher", "a folder that is not a diffusers pipeline (no model_index.json)",
         train("model.teacher={tmp}/weights"), "is not a diffusers pipeline folder (no model_index.json)",
         setup=write("weights/model.safetensors", b"not a pipeline")),
    Case("teacher-missing-component", "teacher", "a pipeline folder without its `unet/`",
         train("model.teacher={tmp}/teacher"), "its 'unet/' folder is missing",
         setup=teacher_copy(lambda t: shutil.rmtree(t / "unet"))),
    Case("teacher-truncated-weights", "teacher", "a truncated `unet/diffusion_pytorch_model.safetensors`",
         train("model.teacher={tmp}/teacher"), "could not load teacher '{tmp}/teacher'",
         setup=teacher_copy(lambda t: truncate(t / "unet" / "diffusion_pytorch_model.safetensors"))),
    Case("teacher-hub-offline", "teacher", "a hub id with the hub offline (HF_HUB_OFFLINE=1)",
         train("model.teacher=nobody-here/no-such-model"), "the model hub is offline", env={"HF_HUB_OFFLINE": "1"}),
    # --- data -----------------------------------------------------------------------------------------------------
    Case("data-empty-txt", "data", "a .txt prompt file with no prompts (blank lines)",
         train("data.source={tmp}/prompts.txt"), "data source '{tmp}/prompts.txt' has no samples",
         setup=write("prompts.txt", "\n  \n\n")),
    Case("data-missing-file", "data", "a data file that does not exist", train("data.source={tmp}/nothere.txt"),
         "data file '{tmp}/nothere.txt' does not exist"),
    Case("data-unknown-kind", "data", "a data file of an unknown kind (`.parquet`)",
         train("data.source={tmp}/data.parquet"), "not found or of an unknown kind",
         setup=write("data.parquet", b"PAR1")),
    Case("data-not-utf8", "data", "a .txt that is not text (binary)", train("data.source={tmp}/prompts.txt"),
         "data file '{tmp}/prompts.txt' is not UTF-8 text", setup=write("prompts.txt", b"\x89PNG\r\n\x1a\n\xff\xfe")),
    Case("data-jsonl-malformed", "data", "a .jsonl line that is not JSON", train("data.source={tmp}/data.jsonl"),
         "{tmp}/data.jsonl:2 is not valid JSON", setup=write("data.jsonl", '{"text": "a red circle"}\n{oops\n')),
    Case("data-jsonl-not-object", "data", "a .jsonl line that is JSON but not an object (`[1, 2]`)",
         train("data.source={tmp}/data.jsonl"), "{tmp}/data.jsonl:1 is a JSON list, not an object",
         setup=write("data.jsonl", "[1, 2]\n")),
    Case("data-jsonl-partial-images", "data", "a .jsonl where only some rows name an image",
         train("data.source={tmp}/data.jsonl"), "row 2 has no 'image'",
         setup=write("data.jsonl", '{"text": "a", "image": "a.png"}\n{"text": "b"}\n')),
    Case("data-csv-malformed", "data", "a .csv with an unclosed quote", train("data.source={tmp}/data.csv"),
         "{tmp}/data.csv:2 has 1 fields where the header has 2", setup=write("data.csv", 'text,image\n"a, b\n')),
    Case("data-csv-no-caption-column", "data", "a .csv without the caption column",
         train("data.source={tmp}/data.csv"), "has no column 'text' (columns: foo, bar); set data.caption_column",
         setup=write("data.csv", "foo,bar\n1,2\n")),
    Case("data-folder-no-metadata", "data", "an image folder without metadata.jsonl",
         train("data.source={tmp}/images"), "has no metadata.jsonl", setup=write("images/a.png", b"")),
    Case("data-image-does-not-decode", "data", "an image folder where an image does not decode",
         train("data.source={tmp}/images"), "image '{tmp}/images/b.png' in data source '{tmp}/images' cannot be read",
         setup=image_folder({"b.png": b"not a png"}, [{"file_name": "b.png", "text": "a red circle"}])),
    Case("data-image-missing", "data", "an image folder whose metadata names a missing image",
         train("data.source={tmp}/images"), "image '{tmp}/images/gone.png' listed in data source",
         setup=image_folder({}, [{"file_name": "gone.png", "text": "a red circle"}])),
    Case("data-shapes-split", "data", "an unknown split of the shapes world: `data.split=bogus`",
         train("data.split=bogus"), "'data.split' for the shapes world must be one of train, val, test"),
    # --- run folders ----------------------------------------------------------------------------------------------
    Case("train-into-another-run", "run folder", "`train.output_dir` holding another run (no resume)",
         train("train.output_dir={run}"), "train.output_dir '{run}' holds another run"),
    Case("train-resume-changed-model", "run folder", "a resume that changes the student (`student.lora_rank=8`)",
         train("train.output_dir={run}", "train.resume=latest", "student.lora_rank=8"),
         "train.resume: 'student.lora_rank' differs"),
    Case("train-resume-missing-checkpoint", "run folder", "`train.resume=` a checkpoint folder that does not exist",
         train("train.resume={tmp}/nothere"), "train.resume '{tmp}/nothere' is not a complete checkpoint folder"),
    Case("train-output-under-a-file", "output path", "`train.output_dir` under a path that is a file",
         train("train.output_dir={tmp}/notes.txt/run"), "'{tmp}/notes.txt' is a file, not a folder",
         setup=write("notes.txt", "keep")),
    Case("train-output-read-only", "output path", "`train.output_dir` under a read-only folder",
         train("train.output_dir={tmp}/ro/run"), "folder '{tmp}/ro' is not writable", setup=read_only("ro"),
         marks=(NOT_AS_ROOT,)),
    # --- sample ---------------------------------------------------------------------------------------------------
    Case("sample-steps-0", "sample", "`sample --steps 0` (an existing --out file)", sample("--steps", "0"),
         "--steps must be at least 1, got 0", setup=existing_grid),
    Case("sample-steps-negative", "sample", "`sample --steps -1`", sample("--steps", "-1"),
         "--steps must be at least 1, got -1", setup=existing_grid),
    Case("sample-steps-scheduler-refuses", "sample", "a step count the scheduler refuses: `--steps 5000`",
         sample("--steps", "5000"), "LCMScheduler cannot sample in 5000 steps", setup=existing_grid),
    Case("sample-steps-not-a-number", "sample", "`sample --steps abc`", sample("--steps", "abc"),
         "invalid int value: 'abc'"),
    Case("sample-num-images-0", "sample", "`sample --num-images 0`", sample("--num-images", "0"),
         "--num-images must be at least 1, got 0", setup=existing_grid),
    Case("sample-unknown-scheduler", "sample", "`sample --scheduler bogus`", sample("--scheduler", "bogus"),
         "unknown scheduler 'bogus'", setup=existing_grid),
    Case("sample-out-unknown-type", "output path", "`sample --out x.xyz`", sample("--out", "{tmp}/x.xyz"),
         "unknown image type '.xyz'; use .png, .jpg or .webp"),
    Case("sample-out-is-a-folder", "output path", "`sample --out` an existing folder", sample("--out", "{tmp}/pics"),
         "image '{tmp}/pics' is a folder; give a file name", setup=write("pics/keep.png", b"the user's")),
    Case("sample-out-under-a-file", "output path", "`sample --out` into a folder that is a file",
         sample("--out", "{tmp}/notes.txt/grid.png"), "'{tmp}/notes.txt' is a file, not a folder",
         setup=write("notes.txt", "keep")),
    Case("sample-out-read-only", "output path", "`sample --out` into a read-only folder",
         sample("--out", "{tmp}/ro/grid.png"), "folder '{tmp}/ro' is not writable", setup=read_only("ro"),
         marks=(NOT_AS_ROOT,)),
    Case("sample-model-missing", "sample", "`sample` of a folder that does not exist",
         ["sample", "{tmp}/nothere", "--prompt", "a", "--out", "{tmp}/grid.png"], "'{tmp}/nothere' does not exist"),
    Case("sample-model-not-a-model", "sample", "`sample` of a folder that is no export, run or pipeline",
         ["sample", "{tmp}/stuff", "--prompt", "a", "--out", "{tmp}/grid.png"],
         "'{tmp}/stuff' is not an export folder (no stepdistill.json)", setup=write("stuff/notes.txt", "keep")),
    Case("sample-run-without-export", "sample", "`sample` of a run folder that has no export yet",
         ["sample", "{tmp}/run", "--prompt", "a", "--out", "{tmp}/grid.png"], "has no export yet",
         setup=write("run/run.json", "{}")),
    Case("sample-truncated-lora", "sample", "`sample` of an export whose LoRA file is truncated",
         ["sample", "{tmp}/export", "--prompt", "a", "--out", "{tmp}/grid.png"], "cannot be loaded",
         setup=export_copy(lambda e: truncate(e / "pytorch_lora_weights.safetensors"))),
    Case("sample-pipeline-truncated-weights", "sample", "`sample` of a pipeline folder whose unet weights are "
         "truncated", ["sample", "{tmp}/teacher", "--prompt", "a", "--out", "{tmp}/grid.png"],
         "unet/diffusion_pytorch_model.safetensors' is truncated or corrupt",
         setup=teacher_copy(lambda t: truncate(t / "unet" / "diffusion_pytorch_model.safetensors"))),
    Case("sample-corrupt-spec", "sample", "`sample` of an export whose stepdistill.json is corrupt",
         ["sample", "{tmp}/export", "--prompt", "a", "--out", "{tmp}/grid.png"], "stepdistill.json' is corrupt",
         setup=export_copy(lambda e: (e / "stepdistill.json").write_text('{"format": '))),
    # --- export ---------------------------------------------------------------------------------------------------
    Case("export-run-missing", "export", "`export` of a run folder that does not exist", ["export", "{tmp}/nothere"],
         "run folder '{tmp}/nothere' does not exist"),
    Case("export-not-a-run", "export", "`export` of a folder that is not a run (the teacher)", ["export", "{teacher}"],
         "'{teacher}' is not a stepdistill run folder"),
    Case("export-of-an-export", "export", "`export` of an export folder", ["export", "{export}"],
         "'{export}' is an export, not a run folder"),
    Case("export-out-not-an-export", "output path", "`export --out` a folder of the user's that is not an export",
         ["export", "{run}", "--out", "{tmp}/mine"], "'{tmp}/mine' exists and is not a stepdistill export",
         setup=write("mine/thesis.txt", "years of work")),
    Case("export-out-is-a-file", "output path", "`export --out` an existing file",
         ["export", "{run}", "--out", "{tmp}/notes.txt"], "'{tmp}/notes.txt' exists and is not a stepdistill export",
         setup=write("notes.txt", "keep")),
    Case("export-out-under-a-file", "output path", "`export --out` under a path that is a file",
         ["export", "{run}", "--out", "{tmp}/notes.txt/export"], "'{tmp}/notes.txt' is a file, not a folder",
         setup=write("notes.txt", "keep")),
    Case("export-out-read-only", "output path", "`export --out` into a read-only folder",
         ["export", "{run}", "--out", "{tmp}/ro/export"], "folder '{tmp}/ro' is not writable", setup=read_only("ro"),
         marks=(NOT_AS_ROOT,)),
    Case("export-checkpoint-missing", "export", "`export --checkpoint` a folder that does not exist",
         ["export", "{run}", "--checkpoint", "{tmp}/nothere"], "--checkpoint '{tmp}/nothere' does not exist"),
    Case("export-format-unknown", "export", "`export --format bogus`", ["export", "{run}", "--format", "bogus"],
         "invalid choice: 'bogus'"),
    # --- evaluate -------------------------------------------------------------------------------------------------
    Case("evaluate-steps-malformed", "evaluate", "`evaluate --steps 1,x`", evaluate("--steps", "1,x"),
         "--steps must be comma-separated positive integers like 1,2,4, got '1,x'"),
    Case("evaluate-steps-zero", "evaluate", "`evaluate --steps 0`", evaluate("--steps", "0"),
         "--steps must be comma-separated positive integers like 1,2,4, got '0'"),
    Case("evaluate-teacher-steps-malformed", "evaluate", "`evaluate --teacher T --teacher-steps 2,,-1`",
         evaluate("--teacher", "{teacher}", "--teacher-steps", "2,,-1"), "--teacher-steps must be comma-separated"),
    Case("evaluate-num-images-0", "evaluate", "`evaluate --num-images 0`", evaluate("--num-images", "0"),
         "--num-images must be at least 1"),
    Case("evaluate-labels-count", "evaluate", "`evaluate --label a,b` for one model", evaluate("--label", "a,b"),
         "--label has 2 names for 1 models"),
    Case("evaluate-model-missing", "evaluate", "`evaluate` of a folder that does not exist",
         ["evaluate", "{tmp}/nothere", "--num-images", "2", "--out", "{tmp}/eval"], "'{tmp}/nothere' does not exist"),
    Case("evaluate-prompts-missing", "evaluate", "`evaluate --prompts` a file that does not exist",
         evaluate("--prompts", "{tmp}/prompts.txt"), "prompt file '{tmp}/prompts.txt' does not exist"),
    Case("evaluate-out-under-a-file", "output path", "`evaluate --out` under a path that is a file",
         evaluate("--out", "{tmp}/notes.txt/eval"), "'{tmp}/notes.txt' is a file, not a folder",
         setup=write("notes.txt", "keep")),
]

# Rows checked by a test elsewhere (not through the CLI here): id -> (kind, bad input, what it gets, test)
ELSEWHERE = {
    "value-adam-beta2-inf": ("config value", "`train.adam_beta2=.inf`", "`error: config key 'train.adam_beta2' must be "
                             "a finite number in [0, 1), got inf`",
                             "tests/test_user_defects.py::test_impossible_values_are_refused_in_one_line"),
    "resume-checkpoint-unloadable": ("run folder", "a resume whose checkpoint cannot be loaded (corrupt)",
                                     "one line naming the checkpoint; RUN/config.yaml untouched",
                                     "tests/test_user_defects.py::test_failed_resume_leaves_config_yaml_untouched"),
    "export-replaces-only-exports": (
        "output path", "`export_run(out=...)` (the Python API) onto a folder or file that is not an export",
        "refused, the folder / file untouched; an export is replaced atomically",
        "tests/test_user_defects.py::test_export_refuses_to_replace_what_is_not_an_export"),
}


@pytest.fixture(scope="module")
def ctx(tiny_sd, tmp_path_factory, one_thread):
    """A trained 2-step LoRA run (checkpoint and export), made through the CLI with the TRAIN command line."""
    from stepdistill.cli import main

    run = tmp_path_factory.mktemp("bad-inputs") / "run"
    argv = [a.format(teacher=tiny_sd, tmp=run.parent) for a in TRAIN]
    assert main([*argv, f"train.output_dir={run}", "train.max_steps=2", "train.checkpoint_every=1",
                 "train.export=lora"]) == 0
    assert (run / "export" / "stepdistill.json").is_file()
    return Ctx(Path(tiny_sd), run)


def snapshot(root: Path) -> dict:
    """Every file (bytes) and folder under `root`: equal snapshots mean nothing was lost, changed or added."""
    if not root.exists() or root.is_file():
        return {".": root.read_bytes() if root.exists() else None}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "<dir>") for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_refused(case, ctx, tmp_path, capfd, monkeypatch):
    from stepdistill.cli import main

    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    values = {"teacher": ctx.teacher, "run": ctx.run, "export": ctx.run / "export", "tmp": tmp_path}
    if case.setup is not None:
        case.setup(tmp_path, ctx)
    argv = [a.format(**values) for a in case.argv]
    watched = (tmp_path, ctx.run, ctx.teacher)
    before = [snapshot(p) for p in watched]
    capfd.readouterr()
    try:
        rc = main(argv)
    finally:
        for ro in tmp_path.glob("ro"):  # let pytest remove the folder later
            os.chmod(ro, 0o755)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, f"exit code {rc}, stderr: {err[-2000:]}"
    assert "Traceback" not in err, err[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one 'error:' line: {err[-2000:]}"
    assert case.phrase.format(**values) in lines[0], lines[0]
    assert [snapshot(p) for p in watched] == before, "something on disk changed"
    if RECORD:
        line = lines[0]
        for name, path in sorted(values.items(), key=lambda kv: -len(str(kv[1]))):
            line = line.replace(str(path), name.upper())
        recorded = json.loads(Path(RECORD).read_text()) if Path(RECORD).is_file() else {}
        recorded[case.id] = line
        Path(RECORD).write_text(json.dumps(recorded, indent=1))


def _doc_rows() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        found = re.findall(r"test_bad_input_is_refused\[([a-z0-9-]+)\]|`([a-z0-9-]+)`: ", line)
        for in_table, elsewhere in found:
            rows[in_table or elsewhere] = line.replace("\\|", "|")
    return rows


def test_doc_lists_every_case():
    import importlib

    rows = _doc_rows()
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    expected = set(ids) | set(ELSEWHERE)
    assert set(rows) == expected, (f"missing from {DOC.name}: {sorted(expected - set(rows))}; "
                                   f"not a case: {sorted(set(rows) - expected)}")
    for case in CASES:  # the row shows the message the test asserts (paths as TMP / RUN / EXPORT / TEACHER)
        if case.today is None:
            assert _doc_phrase(case) in rows[case.id], f"{case.id}: the doc's row does not show {_doc_phrase(case)!r}"
    for row_id, (*_, test) in ELSEWHERE.items():  # the tests named for the other rows exist
        module, name = test.split("::")
        sys.path.insert(0, str(ROOT / "tests"))
        try:
            assert hasattr(importlib.import_module(Path(module).stem), name), test
        finally:
            sys.path.remove(str(ROOT / "tests"))
    assert len(rows) >= 25


def _doc_phrase(case: Case) -> str:
    phrase = case.phrase
    for name in ("teacher", "run", "export", "tmp"):
        phrase = phrase.replace("{" + name + "}", name.upper())
    return phrase


def render(recorded: dict[str, str]) -> str:
    """docs/bad_inputs.md from the recorded error lines (see the module docstring)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    header = HEADER + (NOT_YET if any(c.today for c in CASES) else "")
    out = [header, "| Kind | Bad input | What the user gets | Test |", "|---|---|---|---|"]
    for c in CASES:
        if c.today is not None:
            got = f"**not yet** (today: {c.today}); {c.marks[-1].kwargs['reason']}"
        else:  # a row skipped where it was recorded (read-only folders as root) shows the phrase its test asserts
            line = recorded.get(c.id, f"error: ... {_doc_phrase(c)} ...")
            got = f"`` {line} ``" if "`" in line else f"`{line}`"  # a message may quote a command in backticks
        out.append(f"| {c.kind} | {cell(c.what)} | {cell(got)} | `test_bad_input_is_refused[{c.id}]` |")
    out += ["", "Checked by other tests (not through the CLI table above):", "",
            "| Kind | Bad input | What the user gets | Test |", "|---|---|---|---|"]
    for row_id, (kind, what, got, test) in ELSEWHERE.items():
        out.append(f"| {kind} | `{row_id}`: {cell(what)} | {cell(got)} | `{test}` |")
    return "\n".join(out) + "\n"


HEADER = """# Bad input refused

Every bad input below is refused by the `stepdistill` command with **exit code 2** and **one line** on stderr,
`error: <what is wrong>; <how to fix it>`, never a traceback (`stepdistill -v ...` shows one), and **nothing on disk
is lost**: the bad config, an existing output file or folder, the run folder, its export and the teacher are left
byte for byte as they were, and no half-made run folder or output is left behind. Most are refused before any model
loads; the data and teacher rows after the (frozen) teacher loads, before anything is written.

Each row is one test: `tests/test_bad_inputs.py` drives it through `stepdistill.cli.main([...])` and checks the
exit code, the single `error:` line and the phrase shown here, and compares the files before and after
(`test_doc_lists_every_case` checks this page lists every case). Paths are shown as `TMP` (the test's folder),
`RUN` (a trained run), `EXPORT` (its export) and `TEACHER` (the teacher pipeline folder); long lines are cut.

Not errors: a missing parent folder of `sample --out`, `export --out`, `evaluate --out` or `train.output_dir` is
created; `export --out` onto an earlier export replaces it atomically.

The rows on read-only folders are skipped for a user who writes into them anyway (root); they pass for any
other user (checked as root with the DAC-override capabilities dropped: `setpriv --bounding-set
-dac_override,-dac_read_search --inh-caps -dac_override,-dac_read_search python -m pytest ...`).
"""
NOT_YET = """
Rows marked **not yet** fail today (they are `xfail(strict=True)` tests, which fail once fixed so the mark is
removed); each names the fix it needs.
"""


if __name__ == "__main__":  # python tests/test_bad_inputs.py RECORDED.json > docs/bad_inputs.md
    recorded = json.loads(Path(sys.argv[1]).read_text())
    for key, line in recorded.items():
        recorded[key] = line if len(line) <= 240 else line[:237] + "..."
    sys.stdout.write(render(recorded))

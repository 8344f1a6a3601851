"""Data sources: prompt files, image folders, clear errors, and the deterministic resumable batch order."""
import json

import pytest
from PIL import Image

from stepdistill.config import DataConfig
from stepdistill.data import BatchStream, image_to_tensor, load_source
from stepdistill.errors import StepdistillError


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\nblue square\n")
    assert [d["caption"] for d in load_source(DataConfig(source=str(tmp_path / "p.txt")), False)] == ["a red circle", "blue square"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    assert load_source(DataConfig(source=str(tmp_path / "p.jsonl"), caption_column="prompt"), False)[1]["caption"] == "two"
    (tmp_path / "p.csv").write_text("id,caption\n1,hello\n2,world\n")
    src = load_source(DataConfig(source=str(tmp_path / "p.csv"), caption_column="caption"), False)
    assert len(src) == 2 and src[0]["image"] is None


def test_image_folder_with_metadata(tmp_path):
    for i in range(3):
        Image.new("RGB", (40, 30), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": f"red {i}"}) + "\n" for i in range(3)))
    src = load_source(DataConfig(source=str(tmp_path)), True)
    item = src[2]
    assert item["caption"] == "red 2" and item["image"].size == (40, 30)
    x = image_to_tensor(item["image"], 16)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("setup, needs_images, message", [
    (lambda d: None, False, "does not exist"),
    (lambda d: (d / "p.txt").write_text("\n\n"), False, "has no samples"),
    (lambda d: (d / "p.txt").write_text("a\n"), True, "has only prompts"),
    (lambda d: (d / "p.jsonl").write_text('{"x": 1}\n'), False, "has no column 'text'"),
    (lambda d: (d / "p.jsonl").write_text("{oops\n"), False, "is not valid JSON"),
])
def test_bad_data_gives_one_line_errors(tmp_path, setup, needs_images, message):
    setup(tmp_path)
    name = next((p.name for p in tmp_path.iterdir()), "p.txt")
    with pytest.raises(StepdistillError, match=message) as err:
        load_source(DataConfig(source=str(tmp_path / name)), needs_images)
    assert "\n" not in str(err.value)


def test_image_folder_errors(tmp_path):
    with pytest.raises(StepdistillError, match="no metadata.jsonl"):
        load_source(DataConfig(source=str(tmp_path)), True)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(StepdistillError, match="does not exist"):
        load_source(DataConfig(source=str(tmp_path)), True)[0]


def test_batch_stream_is_deterministic_sharded_and_resumable():
    full = BatchStream(10, 4, seed=3)
    seq = [full.next_indices() for _ in range(5)]
    flat = [i for b in seq for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs are permutations
    resumed = BatchStream(10, 4, seed=3)
    resumed.drawn = 8
    assert resumed.next_indices() == seq[2]
    r0, r1 = BatchStream(10, 2, seed=3, rank=0, world=2), BatchStream(10, 2, seed=3, rank=1, world=2)
    assert r0.next_indices() + r1.next_indices() == seq[0]  # two processes split one global batch

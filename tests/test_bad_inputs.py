"""Bad or odd inputs to the jobs: one clear error naming the file or key, before any actor starts.

Every case runs ``jobs.benchmark`` (or a reader) on a small copy of the tire data with one thing
broken. None of them may reach Ray: preflight (``jobs/preflight.py``) refuses them first, so the
whole file runs without a cluster. docs/RELIABILITY.md lists each case and what the user sees.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from anomaly_core.data import DatasetError, load_split, read_mask, read_rgb
from jobs import benchmark

from .conftest import TIRE_ROOT


@pytest.fixture
def mini(tmp_path: Path) -> Path:
    """A dataset root holding a 4-train / 3-test copy of tire (one defect with its masks)."""
    source, root = TIRE_ROOT / "tire", tmp_path / "data"
    for relative in ["train/good/000.png", "train/good/001.png", "train/good/002.png", "train/good/003.png",
                     "test/good/000.png", "test/cut/000.png", "test/cut/001.png",
                     "ground_truth/cut/000_mask.png", "ground_truth/cut/001_mask.png"]:
        (root / "tire" / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / relative, root / "tire" / relative)
    return root


def write_config(tmp_path: Path, root: Path, **changes: object) -> Path:
    """A demo-like config over ``root`` (random weights: the model builds in a blink); dotted keys change it."""
    config = {
        "name": "bad-input",
        "output_dir": str(tmp_path / "outputs"),
        "datasets": [{"name": "mini", "format": "mvtec", "root": str(root)}],
        "backbone": {"name": "tf_efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "weights": "random"},
        "preprocess": {"resize": 64, "crop": 64},
        "wandb": {"mode": "off"},
    }
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def refused(capsys, *argv: str) -> str:
    """Run the benchmark job, assert exit code 2 with a one-line-per-problem message (no traceback)."""
    assert benchmark.main(list(argv)) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.startswith("error: ")
    return error


def bench(tmp_path: Path, root: Path, capsys, *extra: str, **changes: object) -> str:
    return refused(capsys, "--config", str(write_config(tmp_path, root, **changes)), *extra)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds no pixels (PIL reads the size from the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("content, expected", [
    (b"", "cannot read image file"),                                  # zero bytes
    (b"just some text, not an image\n", "cannot read image file"),    # text with an image name
    (png_header(40000, 40000), "cannot read image file"),             # decompression bomb (1.6 G pixels)
])
def test_unreadable_training_images(mini, tmp_path, capsys, content, expected):
    bad = mini / "tire" / "train" / "good" / "001.png"
    bad.write_bytes(content)
    error = bench(tmp_path, mini, capsys)
    assert expected in error and str(bad) in error


def test_tiny_image_is_refused(mini, tmp_path, capsys):
    Image.new("RGB", (1, 1)).save(mini / "tire" / "train" / "good" / "002.png")
    assert "is 1x1 px, smaller than 32 px" in bench(tmp_path, mini, capsys)


def test_mask_of_the_wrong_size_is_refused(mini, tmp_path, capsys):
    mask = mini / "tire" / "ground_truth" / "cut" / "000_mask.png"
    Image.open(mask).resize((50, 40)).save(mask)
    error = bench(tmp_path, mini, capsys)
    assert f"mask {mask} is 40x50 (HxW)" in error and "test/cut/000.png" in error


def test_grey_gradient_mask_reads_as_mvtec_evaluation_reads_it(mini):
    """MVTec AD masks are read as MVTec's evaluation code reads them, anomalous wherever non-zero; only the folder
    format refuses a grey gradient (tests/test_data_readers.py, with its mask_threshold)."""
    mask = mini / "tire" / "ground_truth" / "cut" / "001_mask.png"
    height, width = np.asarray(Image.open(mask)).shape[:2]
    ramp = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
    Image.fromarray(ramp).save(mask)
    (sample,) = [s for s in load_split("mvtec", mini, "tire").test if s.mask_path == str(mask)]
    assert np.array_equal(read_mask(sample.mask_path, sample.mask_rule), ramp > 0)


def test_defect_without_mask_and_mask_without_image(mini, tmp_path, capsys):
    (mini / "tire" / "test" / "cut" / "001.png").unlink()
    assert "has no image" in bench(tmp_path, mini, capsys)
    (mini / "tire" / "ground_truth" / "cut" / "000_mask.png").unlink()
    assert "missing mask for anomalous image" in bench(tmp_path, mini, capsys)


@pytest.mark.parametrize("remove", ["test", "test/*"])
def test_missing_or_empty_test_split_fails_before_any_work(mini, tmp_path, capsys, remove):
    test = mini / "tire" / "test"
    shutil.rmtree(mini / "tire" / "ground_truth")
    if remove == "test":
        shutil.rmtree(test)
    else:
        for path in test.rglob("*.png"):
            path.unlink()
    error = bench(tmp_path, mini, capsys)
    assert "no test images" in error and str(mini) in error
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("bank.json"))


def test_empty_train_split(mini, tmp_path, capsys):
    for path in (mini / "tire" / "train" / "good").iterdir():
        path.unlink()
    assert "empty train set for category 'tire'" in bench(tmp_path, mini, capsys)


def test_looping_symlink_is_an_error(mini, tmp_path, capsys):
    link = mini / "tire" / "train" / "good" / "loop.png"
    os.symlink(link, link)
    assert f"image link {link} points to nothing readable" in bench(tmp_path, mini, capsys)


def test_unknown_category_and_root(mini, tmp_path, capsys):
    assert "['bottle'] not found under" in bench(tmp_path, mini, capsys, **{"datasets.0.categories": ["bottle"]})
    assert "dataset folder not found" in bench(tmp_path, mini, capsys, **{"datasets.0.root": str(tmp_path / "nope")})


@pytest.mark.parametrize("key, value, expected", [
    ("coreset.ratoi", 0.1, "coreset.ratoi: Extra inputs are not permitted"),
    ("coreset.ratio", "ten percent", "coreset.ratio: Input should be a valid number"),
    ("coreset.ratio", 1.5, "coreset.ratio: Input should be less than or equal to 1"),
    ("scoring.k", 0, "scoring.k: Input should be greater than or equal to 1"),
    ("preprocess.crop", 512, "crop (512) must not exceed resize (64)"),
])
def test_config_keys_types_and_ranges(mini, tmp_path, capsys, key, value, expected):
    assert expected in bench(tmp_path, mini, capsys, **{key: value})


@pytest.mark.parametrize("backbone, expected", [
    ({"name": "resnet9000"}, "unknown backbone 'resnet9000'"),
    ({"layers": ["blocks.2", "blocks.9"]}, "has no layer(s) ['blocks.9']"),
    ({"name": "resnet18", "layers": ["layer2"], "weights": "package"}, "backbone.weights"),
])
def test_backbone_errors_name_the_key(mini, tmp_path, capsys, backbone, expected):
    changes = {f"backbone.{key}": value for key, value in backbone.items()}
    error = bench(tmp_path, mini, capsys, **changes)
    assert expected in error and error.count("\n") <= 3


def test_garbage_and_wrong_architecture_weights(mini, tmp_path, capsys):
    garbage = tmp_path / "weights.pth"
    garbage.write_text("not a checkpoint\n")
    error = bench(tmp_path, mini, capsys, **{"backbone.weights": str(garbage)})
    assert f"cannot read weights file {garbage}" in error
    other = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 512)}, other)
    error = bench(tmp_path, mini, capsys, **{"backbone.weights": str(other)})
    assert f"weights file {other}" in error and "lacks parameters the model needs" in error


def test_k_larger_than_the_bank_fails_before_extraction(mini, tmp_path, capsys):
    # 4 train images x 8x8 patches (64 px, blocks.2 stride 8) = 256 patches, 10 % coreset -> 25 rows.
    error = bench(tmp_path, mini, capsys, **{"scoring.k": 26})
    assert "scoring.k=26 exceeds the memory bank of mini/tire (backbone): 25 patches" in error


def test_output_dir_under_a_regular_file(mini, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    error = bench(tmp_path, mini, capsys, output_dir=str(blocker / "outputs"))
    assert "output_dir: cannot write to" in error and str(blocker) in error


def test_existing_run_folder_is_never_reused(mini, tmp_path, capsys):
    finished = tmp_path / "outputs" / "taken"
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text("{}")
    error = bench(tmp_path, mini, capsys, "--run-name", "taken")
    assert "already exists; continue that run with --resume" in error
    assert (finished / "summary.json").read_text() == "{}" and len(list(finished.iterdir())) == 1


def test_resume_needs_a_run_folder_and_no_new_selection(tmp_path, capsys):
    assert "no run_config.yaml there" in refused(capsys, "--resume", str(tmp_path))
    assert "--config is required" in refused(capsys)
    assert "cannot change it" in refused(capsys, "--resume", str(tmp_path), "--categories", "tire")


def test_debug_shows_the_traceback(mini, tmp_path, capsys):
    assert benchmark.main(["--config", str(write_config(tmp_path, mini, **{"scoring.k": 26})), "--debug"]) == 2
    error = capsys.readouterr().err
    assert "Traceback" in error and error.rstrip().splitlines()[-1].startswith("error: scoring.k=26")


def test_odd_but_valid_images_are_read(tmp_path):
    """16-bit, palette, CMYK and grey-alpha files decode to RGB; spaces and non-ASCII names are fine."""
    folder = tmp_path / "odd names ü"
    folder.mkdir()
    wide = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16
    Image.fromarray(wide).save(folder / "sixteen bit.png")
    Image.new("P", (64, 64), 3).save(folder / "palette.png")
    Image.new("CMYK", (64, 64), (0, 255, 0, 0)).save(folder / "cmyk é.jpg")
    Image.new("LA", (64, 64), (90, 10)).save(folder / "grey alpha.png")
    shapes = {path.name: read_rgb(path).shape for path in folder.iterdir()}
    assert set(shapes.values()) == {(64, 64, 3)}
    assert read_rgb(folder / "sixteen bit.png")[0, -1, 0] == (63 * 16) >> 8
    assert tuple(read_rgb(folder / "cmyk é.jpg")[0, 0]) == pytest.approx((255, 0, 255), abs=2)


def test_class_coded_mask_is_read_as_anomalous(tmp_path):
    """A mask with a few values (class-coded) marks every non-zero pixel; more levels than that are refused."""
    coded = np.zeros((8, 8), np.uint8)
    coded[1, 1], coded[2, 2], coded[3, 3] = 1, 2, 255
    Image.fromarray(coded).save(tmp_path / "coded.png")
    assert read_mask(tmp_path / "coded.png").sum() == 3
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "ramp.png")
    with pytest.raises(DatasetError, match="63 non-zero levels"):
        read_mask(tmp_path / "ramp.png")


def test_dataset_under_a_path_with_spaces_and_non_ascii(mini, tmp_path):
    odd = tmp_path / "my data ü"
    shutil.copytree(mini, odd)
    split = load_split("mvtec", odd, "tire")
    assert len(split.train) == 4 and len(split.test) == 3 and all(" ü" in s.image_path for s in split.test)

"""Image/mask decoding across PIL modes, and the resize/crop/normalize geometry."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from anomaly_core.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetError,
    ImageTransform,
    Sample,
    load_image,
    load_mask,
    read_mask,
    read_rgb,
)


def save(im: Image.Image, path: Path) -> Path:
    im.save(path)
    return path


def test_read_rgb_gray_rgba_palette_cmyk_bilevel(tmp_path: Path) -> None:
    gray = read_rgb(save(Image.new("L", (5, 4), 77), tmp_path / "l.png"))
    assert gray.dtype == np.uint8 and gray.shape == (4, 5, 3) and (gray == 77).all()

    rgba = read_rgb(save(Image.new("RGBA", (5, 4), (10, 20, 30, 0)), tmp_path / "rgba.png"))
    assert rgba.shape == (4, 5, 3) and (rgba == [10, 20, 30]).all()  # alpha dropped, not composited

    pal = Image.new("P", (5, 4), 0)
    pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    pal.putpixel((1, 2), 1)
    pal.info["transparency"] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL "palette with transparency" warning
        out = read_rgb(save(pal, tmp_path / "p.png"))
    assert out[2, 1].tolist() == [200, 100, 50] and out[0, 0].tolist() == [0, 0, 0]

    cmyk = read_rgb(save(Image.new("CMYK", (3, 3), (0, 255, 0, 0)), tmp_path / "c.tif"))
    assert (cmyk == [255, 0, 255]).all()

    bilevel = Image.new("1", (3, 3), 0)
    bilevel.putpixel((0, 0), 1)
    out = read_rgb(save(bilevel, tmp_path / "b.bmp"))
    assert out[0, 0].tolist() == [255, 255, 255] and out[1, 1].tolist() == [0, 0, 0]


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_read_rgb_16_bit_keeps_top_byte(tmp_path: Path, suffix: str) -> None:
    values = np.array([[0, 255, 256, 0x1234], [0x8000, 0xFF00, 0xFFFF, 1]], dtype=np.uint16)
    im = Image.fromarray(values)
    assert im.mode == "I;16"
    out = read_rgb(save(im, tmp_path / f"w.{suffix}"))
    assert out.dtype == np.uint8 and out[..., 0].tolist() == (values >> 8).tolist()
    assert (out[..., 0] == out[..., 2]).all()


def test_read_rgb_32_bit_int_taken_as_16_bit(tmp_path: Path) -> None:
    values = np.array([[0, 0x1234, 70000, -5]], dtype=np.int32)
    out = read_rgb(save(Image.fromarray(values), tmp_path / "i.tif"))
    assert out[..., 1].tolist() == [[0, 0x12, 255, 0]]


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    for path in (broken, truncated, tmp_path / "missing.png"):
        for reader in (read_rgb, read_mask):
            with pytest.raises(DatasetError, match="cannot read image file") as info:
                reader(path)
            assert str(path) in str(info.value)


def test_read_mask_modes(tmp_path: Path) -> None:
    gray = np.zeros((4, 5), np.uint8)
    gray[1, 2] = 255
    gray[3, 4] = 1
    assert read_mask(save(Image.fromarray(gray), tmp_path / "l.png")).tolist() == (gray > 0).tolist()

    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[0, 0, 1] = 9  # only green
    rgb[2, 3] = 255
    mask = read_mask(save(Image.fromarray(rgb), tmp_path / "rgb.png"))
    assert mask.dtype == np.bool_ and mask.shape == (4, 5)
    assert np.argwhere(mask).tolist() == [[0, 0], [2, 3]]

    wide = np.zeros((2, 2), np.uint16)
    wide[1, 1] = 1  # would vanish if scaled to 8 bits first
    assert read_mask(save(Image.fromarray(wide), tmp_path / "w.png")).tolist() == [
        [False, False],
        [False, True],
    ]

    pal = Image.new("P", (2, 2), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 1), 1)
    assert read_mask(save(pal, tmp_path / "p.png")).tolist() == [[False, False], [True, False]]


def test_transform_matches_torchvision_pipeline() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (300, 410, 3), dtype=np.uint8)
    reference = T.Compose(
        [T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )(Image.fromarray(rgb))
    out = ImageTransform().image(rgb)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert torch.equal(out, reference)
    assert torch.equal(out, ImageTransform().image(rgb.copy()))  # deterministic


def test_constant_image_normalizes_exactly() -> None:
    value = np.array([37, 128, 250], np.uint8)
    rgb = np.broadcast_to(value, (240, 320, 3)).copy()
    out = ImageTransform().image(rgb)
    expected = (torch.tensor(value, dtype=torch.float32) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    assert torch.equal(out, expected.view(3, 1, 1).expand(3, 224, 224))


@pytest.mark.parametrize("mean,std", [(IMAGENET_MEAN, IMAGENET_STD), ((0.5,) * 3, (0.5,) * 3),
                                      ((0.1, 0.7, 0.999), (0.013, 0.31, 2.0))])
def test_numpy_normalisation_equals_torchvision_for_every_value(mean, std) -> None:
    """Every uint8 value in every channel, in vectorised runs and their tails (odd 67 x 67 crop, which the
    geometry passes through unchanged): numpy's float32 steps give torchvision's bits."""
    rgb = np.random.default_rng(1).permutation(np.arange(67 * 67 * 3) % 256).astype(np.uint8).reshape(67, 67, 3)
    assert all(len(np.unique(rgb[:, :, c])) == 256 for c in range(3))
    reference = T.Compose([T.ToTensor(), T.Normalize(mean, std)])(Image.fromarray(rgb))
    transform = ImageTransform(resize=67, crop=67, mean=mean, std=std)
    assert transform.image(rgb).numpy().tobytes() == reference.numpy().tobytes()
    out = np.full((3, 67, 67), np.nan, np.float32)
    assert transform.array(rgb, out=out) is out and out.tobytes() == reference.numpy().tobytes()


@pytest.mark.parametrize("shape", [(256, 256), (300, 200), (180, 390)])
def test_mask_geometry_matches_image(shape: tuple[int, int]) -> None:
    h, w = shape
    square = np.zeros(shape, bool)
    y0, x0, side = h // 2 - 20, w // 2 + 5, 40
    square[y0 : y0 + side, x0 : x0 + side] = True
    rgb = np.where(square[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
    transform = ImageTransform(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    image = transform.image(rgb)[0]
    mask = transform.mask(square)
    assert mask.shape == (224, 224) and mask.dtype == torch.bool
    # Bilinear edges blur by a pixel; the solid inside and the empty outside must coincide.
    assert bool((image[mask] > 0.25).all()) and bool((~mask[image > 0.75]).sum() == 0)
    rows, cols = torch.nonzero(mask, as_tuple=True)
    irows, icols = torch.nonzero(image > 0.5, as_tuple=True)
    for a, b in ((rows, irows), (cols, icols)):
        assert abs(int(a.min()) - int(b.min())) <= 1 and abs(int(a.max()) - int(b.max())) <= 1


def test_transform_validation() -> None:
    with pytest.raises(ValueError, match=r"resize=200.*crop=224"):
        ImageTransform(resize=200, crop=224)
    assert ImageTransform(resize=224, crop=224).image(np.zeros((10, 20, 3), np.uint8)).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="uint8"):
        ImageTransform().image(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="std"):
        ImageTransform(std=(1.0, 0.0, 1.0))


def test_load_image_and_mask_for_samples(tmp_path: Path) -> None:
    image = save(Image.new("RGB", (64, 48), (255, 255, 255)), tmp_path / "a.png")
    mask_arr = np.zeros((48, 64), np.uint8)
    mask_arr[10:20, 30:40] = 255
    mask = save(Image.fromarray(mask_arr), tmp_path / "a_mask.png")
    transform = ImageTransform(resize=32, crop=32)
    normal = Sample(str(image), 0, None, "c", "good", "test")
    assert load_image(normal, transform).shape == (3, 32, 32)
    assert load_mask(normal, transform).tolist() == torch.zeros(32, 32, dtype=torch.bool).tolist()
    assert load_mask(Sample(str(image), 1, None, "c", "dent", "test"), transform) is None  # unmasked anomaly
    masked = load_mask(Sample(str(image), 1, str(mask), "c", "dent", "test"), transform)
    assert masked is not None and masked.shape == (32, 32) and 0 < int(masked.sum()) < 32 * 32

    small = save(Image.fromarray(mask_arr[:40]), tmp_path / "small_mask.png")
    with pytest.raises(DatasetError, match="40x64") as info:
        load_mask(Sample(str(image), 1, str(small), "c", "dent", "test"), transform)
    assert str(small) in str(info.value) and str(image) in str(info.value)

"""The extraction's host side: images decoded in parallel on ``decode_workers`` threads, a bounded number of
batches ahead, give the same features bit for bit; stage times add up; a bad file is one clear error; the
opt-in GPU JPEG decoding keeps the geometry, is recorded and refused where it does not belong.

Real EfficientNet-Lite0 weights on tire images at 128 -> 112, batches of 2.
"""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_core import extraction
from anomaly_core.augment import Augmentation, augment_seed
from anomaly_core.bank import BankError, check_compatible
from anomaly_core.config import ConfigError, parse_config
from anomaly_core.data import DatasetError, load_split, read_rgb
from anomaly_core.data.device_decode import decode_batch, read_for_device
from anomaly_core.extraction import STAGES, ExtractionSettings, PatchFeatureExtractor
from anomaly_core.features import merge_features
from jobs.predict import PredictError, rebuild_extractor

SETTINGS = ExtractionSettings("tf_efficientnet_lite0", ("blocks.2", "blocks.4"), "package", resize=128, crop=112,
                              batch_size=2)
AUGMENT = Augmentation(copies=1, rotation_degrees=5, brightness=0.1, contrast=0.1, blur_sigma=1.5, hflip=True)


@pytest.fixture(scope="module")
def samples(tire_root):
    return load_split("mvtec", tire_root, "tire").train[:7]  # 3 full batches and a short one


@pytest.fixture(scope="module")
def one_worker():
    return PatchFeatureExtractor(SETTINGS, decode_workers=1)


@pytest.fixture(scope="module")
def three_workers():
    return PatchFeatureExtractor(SETTINGS, decode_workers=3)


@pytest.mark.parametrize("augmented", [False, True])
def test_features_do_not_depend_on_decode_workers(one_worker, three_workers, samples, augmented):
    seeds = [augment_seed(99, i, 1) for i in range(len(samples))] if augmented else None
    augmentation = AUGMENT if augmented else None
    one = one_worker.extract(samples, range(len(samples)), augmentation, seeds)
    three = three_workers.extract(samples, range(len(samples)), augmentation, seeds)
    assert three.embeddings.tobytes() == one.embeddings.tobytes()
    assert three.sample_indices.tolist() == list(range(len(samples)))
    # and both are the batches decoded and embedded one at a time, without running ahead
    batches = [(samples[lo : lo + 2], seeds[lo : lo + 2] if seeds else ()) for lo in range(0, len(samples), 2)]
    reference = [one_worker.embed_batch(one_worker.load_batch(batch, augmentation, batch_seeds))[0]
                 for batch, batch_seeds in batches]
    assert b"".join(part.tobytes() for part in reference) == one.embeddings.tobytes()
    if augmented:  # the augmentation did reach the pixels
        plain = one_worker.extract(samples, range(len(samples)))
        assert plain.embeddings.tobytes() != one.embeddings.tobytes()


@pytest.mark.parametrize("workers,prefetch", [(2, 2), (3, 3)])
def test_decoding_runs_at_most_prefetch_batches_ahead_of_a_slow_device(tire_root, monkeypatch, workers, prefetch):
    """While the (slowed) device embeds batch i, exactly batches i+1..i+prefetch get decoded: never more,
    however long it takes; and that many, so the decoders do run ahead."""
    samples = load_split("mvtec", tire_root, "tire").train[:13]  # 7 batches, the last short
    extractor = PatchFeatureExtractor(SETTINGS, decode_workers=workers)
    assert extractor.prefetch == prefetch  # 1 + ceil(workers / batch_size)
    started, lock = [], threading.Lock()
    real_read = extraction.read_rgb

    def counting_read(path):
        with lock:
            started.append(path)
        return real_read(path)

    seen = []
    real_embed = extractor._embed

    def slow_embed(images, marks):
        expected = min(len(samples), (len(seen) + 1 + prefetch) * SETTINGS.batch_size)
        deadline = time.monotonic() + 10
        while len(started) < expected and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # room for an unbounded decoder to overshoot
        seen.append(len(started))
        return real_embed(images, marks)

    monkeypatch.setattr(extraction, "read_rgb", counting_read)
    monkeypatch.setattr(extractor, "_embed", slow_embed)
    extractor.extract(samples, range(len(samples)))
    batches = -(-len(samples) // SETTINGS.batch_size)
    assert seen == [min(len(samples), (i + 1 + prefetch) * SETTINGS.batch_size) for i in range(batches)]
    assert len(started) == len(samples)  # each image decoded once


def test_stage_times_are_disjoint_parts_of_the_extraction(three_workers, samples):
    features = three_workers.extract(samples, range(len(samples)))
    stages = features.stages
    assert list(stages) == list(STAGES)
    assert min(stages.values()) >= 0 and stages["decode_s"] > 0 and stages["forward_s"] > 0 and stages["embed_s"] > 0
    # on the CPU the loop's waits and device stages are wall-clock intervals one after another
    in_loop = sum(stages[stage] for stage in STAGES[1:])
    assert in_loop <= features.seconds
    twice = merge_features([features, three_workers.extract(samples, range(7, 14))])
    assert twice.stages["decode_s"] > stages["decode_s"]


def test_a_bad_image_among_parallel_decodes_is_one_error_naming_it(three_workers, samples, tmp_path):
    copies = []
    for position, sample in enumerate(samples):
        path = tmp_path / f"{position}.png"
        shutil.copyfile(sample.image_path, path)
        copies.append(dataclasses.replace(sample, image_path=str(path)))
    broken = tmp_path / "3.png"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(DatasetError, match=f"cannot read image file {broken}"):
        three_workers.extract(copies, range(len(copies)))
    # the pool is not wedged by the failure
    assert three_workers.extract(samples[:2], [0, 1]).embeddings.shape[0] == 2


def test_decode_workers_must_be_a_positive_integer():
    with pytest.raises(ValueError, match="decode_workers must be an integer >= 1, got 0"):
        PatchFeatureExtractor(SETTINGS, decode_workers=0)


# preprocess.gpu_jpeg_decode: the device path runs on the CPU here through the same functions (libjpeg-turbo).

def _jpeg_and_png(samples, folder):
    """Tire images as JPEG (quality 95) and as the original PNG, mixed in one batch: jpg, png, jpg."""
    paths = []
    for position, sample in enumerate(samples[:3]):
        if position == 1:
            paths.append(sample.image_path)
        else:
            path = folder / f"{position}.jpg"
            Image.open(sample.image_path).convert("RGB").save(path, quality=95)
            paths.append(str(path))
    return paths


def test_device_decode_is_the_pil_geometry_within_resampling_differences(one_worker, samples, tmp_path):
    transform = one_worker.transform
    paths = _jpeg_and_png(samples, tmp_path)
    batch = decode_batch([(path, read_for_device(path)) for path in paths], transform, torch.device("cpu"))
    assert batch.shape == (3, 3, 112, 112) and batch.dtype == torch.float32
    for position, path in enumerate(paths):
        reference = transform.image(read_rgb(path))
        difference = (batch[position] - reference).abs()
        # the same image in the same place: resampling differences of a grey level or two (1/255/std = 0.0175)
        assert difference.mean() < 0.01 and difference.max() < 0.05, path
        other = transform.image(read_rgb(paths[(position + 1) % 3]))
        assert (batch[position] - other).abs().mean() > 5 * difference.mean()  # images stay in their slots
    assert (batch[0] - transform.image(read_rgb(paths[0]))).abs().max() > 0  # not PIL's pixels: it changes features


def test_device_decode_names_a_broken_jpeg(samples, one_worker, tmp_path):
    paths = _jpeg_and_png(samples, tmp_path)
    broken = Path(paths[2])
    broken.write_bytes(broken.read_bytes()[:300])
    with pytest.raises(DatasetError, match=f"cannot decode JPEG file {broken}"):
        decode_batch([(path, read_for_device(path)) for path in paths], one_worker.transform, torch.device("cpu"))


def test_gpu_jpeg_decode_is_recorded_refused_off_cuda_and_by_banks_without_it(tmp_path):
    settings = dataclasses.replace(SETTINGS, gpu_jpeg_decode=True)
    assert settings.declared()["gpu_jpeg_decode"] is True and SETTINGS.declared()["gpu_jpeg_decode"] is False
    with pytest.raises(ValueError, match="preprocess.gpu_jpeg_decode needs a CUDA device"):
        PatchFeatureExtractor(settings)
    recorded = {**SETTINGS.declared(), "gpu_jpeg_decode": True}
    with pytest.raises(BankError, match="gpu_jpeg_decode: bank has True, inference uses False"):
        check_compatible(recorded, SETTINGS.declared(), "bank")
    check_compatible({key: value for key, value in SETTINGS.declared().items() if key != "gpu_jpeg_decode"},
                     SETTINGS.declared(), "a bank from before the key")  # it was PIL then
    with pytest.raises(PredictError, match="built with preprocess.gpu_jpeg_decode"):
        rebuild_extractor({**recorded, "layers": list(SETTINGS.layers)}, None, "bank", "cpu")
    raw = {"datasets": [{"name": "d", "format": "folder", "root": str(tmp_path)}], "preprocess": {"gpu_jpeg_decode": True}}
    with pytest.raises(ConfigError, match="gpu_jpeg_decode needs GPU extractors"):
        parse_config(raw, "test")
    with pytest.raises(ConfigError, match="does not combine with augment.copies"):
        parse_config({**raw, "cluster": {"gpus_per_extractor": 1}, "augment": {"copies": 1, "hflip": True}}, "test")
    assert parse_config({**raw, "cluster": {"gpus_per_extractor": 1}}, "test").preprocess.gpu_jpeg_decode


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_extraction_with_pinned_batches_and_gpu_jpeg_decode(samples, tmp_path):
    """On a GPU: 1 and 3 decode workers give the same bits, equal to batch-by-batch synchronous embedding; GPU JPEG
    decoding reproduces itself and stays close to the PIL path; stage times come from CUDA events."""
    one, three = (PatchFeatureExtractor(SETTINGS, "cuda", workers) for workers in (1, 3))
    plain = one.extract(samples, range(len(samples)))
    assert three.extract(samples, range(len(samples))).embeddings.tobytes() == plain.embeddings.tobytes()
    reference = [one.embed_batch(one.load_batch(samples[lo : lo + 2]))[0] for lo in range(0, len(samples), 2)]
    assert b"".join(part.tobytes() for part in reference) == plain.embeddings.tobytes()
    assert plain.stages["forward_s"] > 0 and plain.stages["h2d_s"] > 0 and plain.stages["d2h_s"] > 0

    jpegs = []
    for position, sample in enumerate(samples):
        path = tmp_path / f"{position}.jpg"
        Image.open(sample.image_path).convert("RGB").save(path, quality=95)
        jpegs.append(dataclasses.replace(sample, image_path=str(path)))
    settings = dataclasses.replace(SETTINGS, gpu_jpeg_decode=True)
    gpu_one, gpu_three = (PatchFeatureExtractor(settings, "cuda", workers) for workers in (1, 3))
    decoded = gpu_one.extract(jpegs, range(len(jpegs)))
    assert gpu_three.extract(jpegs, range(len(jpegs))).embeddings.tobytes() == decoded.embeddings.tobytes()
    assert gpu_one.extract(jpegs, range(len(jpegs))).embeddings.tobytes() == decoded.embeddings.tobytes()
    pil = one.extract(jpegs, range(len(jpegs))).embeddings
    assert not np.array_equal(decoded.embeddings, pil)
    cosine = (decoded.embeddings * pil).sum(-1) / np.linalg.norm(decoded.embeddings, axis=-1) / np.linalg.norm(pil, axis=-1)
    assert cosine.mean() > 0.95

"""Everything a run can check before its first actor starts, so a bad input costs seconds, not a run.

* the model: backbone name, layers and weights are built once on the driver's CPU (the actors would
  otherwise die one by one, each with a remote traceback), and one blank image gives the patch grid;
* the data: every category's files (``anomaly_core.data.checks``: headers, sizes, masks), and test
  images where the job scores them; per-category settings the config resolves by category;
* the numbers that depend on both: ``scoring.k`` against the bank each category will get;
* the output folder: created and written to now, not after the whole pipeline has run.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Sequence

import torch

from anomaly_core.backbones import WeightsError
from anomaly_core.bank import check_compatible
from anomaly_core.config import ConfigError, RunConfig
from anomaly_core.coreset import coreset_size
from anomaly_core.data.checks import check_split
from anomaly_core.extraction import ExtractionSettings, PatchFeatureExtractor
from anomaly_core.padim import PadimError
from anomaly_core.patchcore import category_record
from cluster.pipeline import MEMORY_METHODS, CategoryJob

log = logging.getLogger("jobs.preflight")


def check_model(config: RunConfig, key: str = "backbone", saved: tuple[dict[str, Any], str] | None = None
                ) -> tuple[int, int]:
    """Build the configured extractor on the CPU; returns its patch grid. Errors name the config ``key``.
    (Decoding is not part of the check: a ``gpu_jpeg_decode`` run's model is built with PIL decoding here.)
    ``saved``: (the record, the source) of a saved memory the job scores with: refused now unless the built
    extractor is the one it records (layers, weights, PaDiM's channel subset), not once the actors are up."""
    settings = ExtractionSettings.from_config(config)
    try:
        extractor = PatchFeatureExtractor(replace(settings, gpu_jpeg_decode=False), device="cpu")
    except (WeightsError, PadimError) as error:
        raise ConfigError(f"{key} ({settings.backbone}, layers {list(settings.layers)}, weights "
                          f"{settings.weights}): {error}") from None
    if saved is not None:  # as the configured extractor decodes (built here with PIL decoding)
        check_compatible(saved[0], {**extractor.describe(), "gpu_jpeg_decode": settings.gpu_jpeg_decode}, saved[1])
    _, grid = extractor.embed_batch(torch.zeros(1, 3, settings.crop, settings.crop))
    return grid


def check_jobs(config: RunConfig, jobs: Sequence[CategoryJob], need_test: bool) -> None:
    """Every category's files (held-out images too), and its per-category settings (an ``anomalydino`` table
    that lacks the category)."""
    for job in jobs:
        check_split(job.split, job.root, need_test, extra=job.validation)
        try:
            category_record(config, job.split.dataset, job.split.category)
        except ValueError as error:
            raise ConfigError(f"{job.key}: {error}") from None


def check_k(config: RunConfig, jobs: Sequence[CategoryJob], grid: tuple[int, int], key: str) -> None:
    """``scoring.k`` against the bank size each category will get from the backbone at ``key``, and the
    training images the method needs (PaDiM's covariance: two)."""
    least = MEMORY_METHODS[config.method].min_train_images
    for job in jobs:
        if len(job.split.train) < least:
            raise ConfigError(f"method {config.method} needs at least {least} training images per category; "
                              f"{job.key} has {len(job.split.train)}")
        patches = len(job.split.train) * grid[0] * grid[1]
        bank = patches if config.coreset.method == "none" else coreset_size(patches, None, config.coreset.ratio)
        if config.scoring.k > bank:
            raise ConfigError(
                f"scoring.k={config.scoring.k} exceeds the memory bank of {job.key} ({key}): {bank} patches "
                f"({len(job.split.train)} train images x {grid[0] * grid[1]} patches, coreset.ratio {config.coreset.ratio})"
            )


def preflight(config: RunConfig, jobs: Sequence[CategoryJob], need_test: bool,
              saved: tuple[dict[str, Any], str] | None = None) -> tuple[int, int]:
    """Model (each ensemble member's), data and ``k`` checks of a job; returns the (first) model's patch grid.
    ``saved``: the record and source of the saved memory a one-backbone job scores with (``check_model``)."""
    keys = [key for key, _ in config.backbones()]
    grids = [check_model(member, key, saved) for member, key in zip(config.members(), keys)]
    check_jobs(config, jobs, need_test)
    for grid, key in zip(grids, keys):
        check_k(config, jobs, grid, key)
    log.info("preflight: %d categories, %d images checked; patch grid %s", len(jobs),
             sum(len(job.split.train) + len(job.split.test) for job in jobs),
             ", ".join(f"{h}x{w}" for h, w in grids))
    return grids[0]

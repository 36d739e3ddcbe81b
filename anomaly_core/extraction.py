"""Images -> patch features: a frozen backbone, its patch embedder and the image transform that belong to it.

Batches are always formed from the category's sorted sample list in fixed chunks of ``batch_size``;
the cluster's shard planner hands out whole chunks, so an image is always processed with the same
neighbours in its batch, whatever the number of actors.

The host side (decode, augmentation, resize, normalisation) runs one task per image on ``decode_workers``
threads, a bounded number of batches ahead of the device; each image is written into its own slot of
the batch, so a batch is the same whatever the number of workers and whichever finishes first.
"""

from __future__ import annotations

import math
import time
from collections import deque
from contextlib import closing
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from anomaly_core.augment import TrainCopies
from anomaly_core.backbones import FeatureBackbone
from anomaly_core.data import ImageTransform, Sample, read_rgb
from anomaly_core.data.device_decode import decode_batch, read_for_device
from anomaly_core.features import PatchFeatures
from anomaly_core.padim import channel_subset
from anomaly_core.patch_features import ConcatEmbedder, PatchEmbedder


def exact_fp32() -> None:
    """cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa): features, banks, trained weights
    and metrics would silently differ from the fp32 they record. fp32 means fp32.

    Set through torch's ``fp32_precision`` settings where it has them (torch >= 2.9): in a process that used
    those, reading or mixing in the legacy ``allow_tf32`` flags raises."""
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cudnn.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    else:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


@dataclass(frozen=True)
class ExtractionSettings:
    """Everything that determines a patch embedding; recorded in every bank."""

    backbone: str
    layers: tuple[str, ...]
    weights: str
    resize: int = 256
    crop: int = 224
    patch_size: int = 3
    patch_stride: int = 1
    pretrain_dim: int = 1024
    target_dim: int = 1024
    batch_size: int = 8
    fp16: bool = False  # half-precision backbone on GPU and half-precision feature transfer
    gpu_jpeg_decode: bool = False  # JPEGs decoded, all images resized on the GPU (data/device_decode.py)
    # PaDiM's embedding (patch_features.ConcatEmbedder): (channels kept, their seed); None: PatchCore's
    padim_subset: tuple[int, int] | None = None

    def declared(self) -> dict[str, Any]:
        """The compatibility fields known without building the model, for failing fast on a bank.

        ``batch_size`` is recorded, not compared: batch composition can change the last bits of a
        feature, so a bank's record says which it was built with (``jobs.predict`` reuses it).
        """
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "resize": self.resize,
            "crop": self.crop,
            "patch_size": self.patch_size,
            "patch_stride": self.patch_stride,
            "pretrain_dim": self.pretrain_dim,
            # PaDiM's embedding is its channel subset (``patch_features.ConcatEmbedder``), not the projection
            "feature_dim": self.padim_subset[0] if self.padim_subset else self.target_dim,
            "fp16": self.fp16,
            "gpu_jpeg_decode": self.gpu_jpeg_decode,
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_config(cls, config: Any) -> "ExtractionSettings":
        return cls(
            backbone=config.backbone.name,
            layers=tuple(config.backbone.layers),
            weights=config.backbone.weights,
            resize=config.preprocess.resize,
            crop=config.preprocess.crop,
            patch_size=config.embedding.patch_size,
            patch_stride=config.embedding.patch_stride,
            pretrain_dim=config.embedding.pretrain_dim,
            target_dim=config.embedding.target_dim,
            batch_size=config.cluster.batch_size,
            fp16=config.cluster.fp16,
            gpu_jpeg_decode=config.preprocess.gpu_jpeg_decode,
            padim_subset=config.padim_subset(),
        )


# Per-stage seconds of an extraction: host CPU time of the decode tasks summed over images, the wall time
# the device loop waited for decoded batches, and the device stages (CUDA event times on a GPU, else wall).
STAGES = ("decode_s", "wait_decode_s", "h2d_s", "forward_s", "embed_s", "d2h_s")


class PatchFeatureExtractor:
    """A frozen backbone plus the patch embedder and the image transform that belong to it.

    ``decode_workers`` threads decode images while the device embeds: ``prefetch`` batches ahead, i.e.
    ``1 + ceil(decode_workers / batch_size)`` (2 while a batch has an image for every worker). Two, not
    one: with one, the workers finishing a batch's last images have nothing queued and idle until the
    device takes it; the second batch keeps every worker busy at that tail. More would only buy host
    memory (each is ``batch_size x 3 x crop x crop`` float32) once the pool keeps up with the device.
    """

    def __init__(self, settings: ExtractionSettings, device: str = "cpu", decode_workers: int = 1) -> None:
        if not isinstance(decode_workers, int) or decode_workers < 1:
            raise ValueError(f"decode_workers must be an integer >= 1, got {decode_workers!r}")
        self.settings = settings
        self.device = torch.device(device)
        if settings.gpu_jpeg_decode and self.device.type != "cuda":
            raise ValueError(f"preprocess.gpu_jpeg_decode needs a CUDA device, this extractor runs on {self.device}: "
                             "its features would be neither the GPU's nor PIL's")
        self.backbone = FeatureBackbone(
            settings.backbone, settings.layers, settings.weights, settings.crop
        ).to(self.device)
        self.half = settings.fp16 and self.device.type == "cuda"
        if self.half:
            self.backbone.half()
        elif self.device.type == "cuda":
            exact_fp32()
        self.padim: dict[str, Any] | None = None
        if settings.padim_subset is None:
            self.embedder = PatchEmbedder(settings.patch_size, settings.pretrain_dim, settings.target_dim,
                                          settings.patch_stride)
        else:
            channels, seed = settings.padim_subset
            indices = channel_subset(sum(self.backbone.channels), channels, seed)
            self.embedder = ConcatEmbedder(indices)
            self.padim = {"channels": channels, "seed": seed, "channel_indices": list(indices)}
        self.transform = ImageTransform(
            resize=settings.resize, crop=settings.crop, mean=self.backbone.mean, std=self.backbone.std
        )
        self.decode_workers = decode_workers
        self.prefetch = 1 + math.ceil(decode_workers / settings.batch_size)
        self._decoders = ThreadPoolExecutor(decode_workers, thread_name_prefix="decode")
        self._cuda = self.device.type == "cuda"

    def describe(self) -> dict[str, Any]:
        """The bank-compatibility fields (see ``bank.COMPATIBILITY_KEYS``)."""
        return {
            **self.settings.declared(),
            **({"padim": self.padim} if self.padim else {}),
            "layers": list(self.backbone.layers),
            "weights_sha256": self.backbone.weights_sha256,
            "mean": list(self.backbone.mean),
            "std": list(self.backbone.std),
        }

    def load_batch(
        self, samples: Sequence[Sample], augmentation: TrainCopies | None = None, seeds: Sequence[int] = ()
    ) -> torch.Tensor:
        """Decode, augment (when given: sample i with ``seeds[i]``) and transform images, as ``extract`` does."""
        return self._decode(samples, augmentation, seeds).result()[0]

    def _decode(self, samples: Sequence[Sample], augmentation: TrainCopies | None, seeds: Sequence[int]
                ) -> "_Decoding":
        """Queue one decode task per image; each writes its own slot of the (pinned, for a GPU) batch, or with
        ``gpu_jpeg_decode`` of a list of what ``device_decode.read_for_device`` reads."""
        if self.settings.gpu_jpeg_decode:
            raws: list = [None] * len(samples)
            return _Decoding(raws, [self._decoders.submit(self._read_into, raws, i, sample.image_path)
                                    for i, sample in enumerate(samples)])
        crop = self.settings.crop
        images = torch.empty((len(samples), 3, crop, crop), dtype=torch.float32, pin_memory=self._cuda)
        slots = images.numpy()
        seeds = seeds if augmentation is not None else [0] * len(samples)
        tasks = [self._decoders.submit(self._load_into, slots[i], sample, augmentation, seed)
                 for i, (sample, seed) in enumerate(zip(samples, seeds, strict=True))]
        return _Decoding(images, tasks)

    def _load_into(self, slot: np.ndarray, sample: Sample, augmentation: TrainCopies | None, seed: int) -> float:
        """One image into its batch slot (PIL and numpy release the GIL); returns this thread's CPU seconds.

        Augmentation runs on the decoded original-resolution image, before the resize/crop."""
        started = time.thread_time()
        rgb = read_rgb(sample.image_path)
        if augmentation is not None:
            rgb = augmentation.apply(rgb, seed)
        self.transform.array(rgb, out=slot)
        return time.thread_time() - started

    def _read_into(self, raws: list, position: int, path: str) -> float:
        started = time.thread_time()
        raws[position] = (path, read_for_device(path))
        return time.thread_time() - started

    def _embed(self, images: torch.Tensor | list, marks: list) -> tuple[torch.Tensor, tuple[int, int]]:
        """Host batch -> per-image embeddings ``[B, h * w, D]`` on the device, marking each stage's end.

        With ``gpu_jpeg_decode`` the host->device stage also decodes, resizes and normalises on the GPU."""
        if isinstance(images, list):
            images = decode_batch(images, self.transform, self.device)
        images = images.to(self.device, non_blocking=True)
        if self.half:
            images = images.half()
        marks.append(self._mark())
        maps = self.backbone(images)
        marks.append(self._mark())
        embeddings, grid = self.embedder(maps)
        dtype = torch.float16 if self.settings.fp16 else torch.float32
        per_image = embeddings.to(dtype).reshape(len(images), grid[0] * grid[1], -1)
        marks.append(self._mark())
        return per_image, grid

    def embed_batch(self, images: torch.Tensor) -> tuple[np.ndarray, tuple[int, int]]:
        per_image, grid = self._embed(images, [])
        return per_image.cpu().numpy(), grid

    def _mark(self) -> "torch.cuda.Event | float":
        """A point in time on the device's stream: a CUDA event (read when the shard is done, so the loop never
        waits for the GPU to time it), else the wall clock."""
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def extract(
        self,
        samples: Sequence[Sample],
        indices: Sequence[int],
        augmentation: TrainCopies | None = None,
        seeds: Sequence[int] | None = None,
        keep_on_device: bool = False,
    ) -> PatchFeatures:
        """Patch features for ``samples``, keyed by ``indices`` (their category-list positions), with the
        seconds of each stage (``STAGES``) in ``stages``.

        ``keep_on_device`` (on a GPU): the embeddings stay there, one torch tensor, for math in this process
        (``cluster.colocated``); elsewhere they are always a host array.

        Batches i+1..i+prefetch are decoded while batch i runs on the device. On a GPU, batches go up from
        pinned memory and features come down into pinned buffers without blocking; the loop waits for batch
        i-1's features only after queueing batch i, so the GPU always has work queued.

        With ``augmentation``, sample i is first augmented with ``seeds[i]``: the caller passes
        ``augmentation.seed(base, train_index, copy)`` per sample (so a copy does not depend on the
        shard it is in) and offsets ``indices`` so copies do not collide with the originals, e.g.
        ``copy * n_train + train_index``. Without it, extraction is exactly the un-augmented one.
        """
        if len(samples) != len(indices) or not samples:
            raise ValueError(f"need equally many samples and indices (> 0), got {len(samples)} and {len(indices)}")
        if (augmentation is None) != (seeds is None) or (seeds is not None and len(seeds) != len(samples)):
            raise ValueError("augmentation needs one seed per sample, and seeds need an augmentation")
        if augmentation is not None and self.settings.gpu_jpeg_decode:
            raise ValueError("augmentation works on host pixels: it does not combine with preprocess.gpu_jpeg_decode")
        started = time.perf_counter()
        stages = dict.fromkeys(STAGES, 0.0)
        timeline = []  # per batch: marks at its start and after h2d, forward, embedding, d2h
        copies: deque[tuple[int, torch.Tensor, torch.cuda.Event]] = deque()  # (first row, host features, copied)
        out = np.empty(0)
        kept: list[torch.Tensor] = []  # keep_on_device: each batch's embeddings, on the GPU
        keep = keep_on_device and self._cuda
        with closing(self.decoded_batches(samples, augmentation, seeds, stages)) as batches:
            for lo, images in batches:
                marks = [self._mark()]
                per_image, grid = self._embed(images, marks)
                if keep:
                    kept.append(per_image)
                    marks.append(self._mark())
                    timeline.append(marks)
                    continue
                if lo == 0:
                    dtype = np.float16 if self.settings.fp16 else np.float32
                    out = np.empty((len(samples), *per_image.shape[1:]), dtype)
                if self._cuda:
                    host = torch.empty(per_image.shape, dtype=per_image.dtype, pin_memory=True)
                    host.copy_(per_image, non_blocking=True)
                    marks.append(self._mark())
                    copies.append((lo, host, marks[-1]))
                    if len(copies) > 1:  # batch i-1's features, now that batch i is queued on the GPU
                        _land(copies.popleft(), out)
                else:
                    out[lo : lo + len(per_image)] = per_image.numpy()
                    marks.append(self._mark())
                timeline.append(marks)
        for copy in copies:
            _land(copy, out)
        for marks in timeline:
            for stage, begin, end in zip(STAGES[2:], marks, marks[1:]):
                stages[stage] += begin.elapsed_time(end) / 1000 if self._cuda else end - begin
        if keep:
            out = torch.cat(kept)
        seconds = time.perf_counter() - started
        return PatchFeatures(out, grid, np.asarray(indices, dtype=np.int64), seconds, stages)

    def decoded_batches(
        self, samples: Sequence[Sample], augmentation: TrainCopies | None = None, seeds: Sequence[int] | None = None,
        stages: dict[str, float] | None = None,
    ) -> Iterator[tuple[int, torch.Tensor | list]]:
        """``(first row, batch)`` for each ``batch_size`` chunk of ``samples`` in order, decoded ``prefetch``
        batches ahead of the consumer; adds the decode tasks' CPU seconds and the consumer's waits to
        ``stages`` (``decode_s``, ``wait_decode_s``). Closing it early drops the batches decoded ahead."""
        stages = stages if stages is not None else dict.fromkeys(STAGES, 0.0)
        size = self.settings.batch_size
        starts = range(0, len(samples), size)
        queued = ((samples[lo : lo + size], augmentation, seeds[lo : lo + size] if seeds is not None else ())
                  for lo in starts)
        decoding = deque(self._decode(*batch) for batch in islice(queued, self.prefetch))
        try:
            for lo in starts:
                waited = time.perf_counter()
                images, cpu_seconds = decoding.popleft().result()
                following = next(queued, None)
                if following is not None:
                    decoding.append(self._decode(*following))
                stages["wait_decode_s"] += time.perf_counter() - waited
                stages["decode_s"] += cpu_seconds
                yield lo, images
        finally:
            for pending in decoding:
                pending.cancel()


@dataclass
class _Decoding:
    """A batch whose images are being decoded into it, one task per image."""

    images: torch.Tensor | list  # a list of (path, bytes or pixels) with gpu_jpeg_decode
    tasks: list[Future]

    def result(self) -> tuple[torch.Tensor | list, float]:
        """The batch once every image is in, and the decode tasks' CPU seconds; raises the first image's error."""
        return self.images, sum(task.result() for task in self.tasks)

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


def _land(copy: tuple[int, torch.Tensor, torch.cuda.Event], out: np.ndarray) -> None:
    """Put a batch's features, copied to pinned host memory without blocking, into the shard's array."""
    lo, host, copied = copy
    copied.synchronize()
    out[lo : lo + len(host)] = host.numpy()

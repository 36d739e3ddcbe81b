"""Batch normalisation over the global batch of all DDP ranks, on any device.

Under DDP each rank sees ``global batch / world size`` images; plain BatchNorm would normalise with
per-rank statistics, so 2 ranks x B/2 would not train like 1 rank x B. torch's ``SyncBatchNorm`` fixes
that on GPUs only (it refuses CPU tensors), and does not know timm's fused ``BatchNormAct2d``. These
subclasses add no state, only a forward that reduces the statistics across ranks with autograd-aware
all-reduces (their backward sums the gradient contributions of every rank, as ``SyncBatchNorm`` does).
Outside distributed training, and in eval mode, they run the parent's forward unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from timm.layers.norm_act import BatchNormAct2d
from torch.nn.modules.batchnorm import _BatchNorm

from anomaly_core.training.distributed import world_size


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) with a backward: every rank's loss depends on every rank's statistics, so the gradient
    of a rank's share is the sum of all ranks' gradients (torch.distributed.nn's all_reduce, now deprecated)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, gradient: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.apply(gradient)


def _global_batch_norm(norm: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Normalise [N, C, H, W] with the mean and (biased) variance of every rank's batch together.

    Two passes (mean, then centred squares) rather than E[x^2] - E[x]^2, which loses precision in float32.
    Running statistics follow ``F.batch_norm``: momentum (or a cumulative mean) and the unbiased variance.
    """
    dims = (0, 2, 3)
    count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
    sums = _SumOverRanks.apply(torch.cat([x.sum(dims), count]))
    total = sums[-1].detach()
    mean = sums[:-1] / total
    centred = x - mean.view(1, -1, 1, 1)
    variance = _SumOverRanks.apply((centred * centred).sum(dims)) / total
    if norm.track_running_stats:
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            factor = 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
            norm.running_mean.lerp_(mean.detach(), factor)
            norm.running_var.lerp_(variance.detach() * total / (total - 1), factor)
    out = centred * torch.rsqrt(variance + norm.eps).view(1, -1, 1, 1)
    if norm.affine:
        out = out * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1)
    return out


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        return _global_batch_norm(self, x)


class GlobalBatchNormAct2d(BatchNormAct2d):
    """timm's BatchNorm + dropout + activation, with the BatchNorm over the global batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        return self.act(self.drop(_global_batch_norm(self, x)))


_GLOBAL_VERSIONS: dict[type, type] = {
    torch.nn.BatchNorm2d: GlobalBatchNorm2d,
    BatchNormAct2d: GlobalBatchNormAct2d,
}


def use_global_batchnorm(model: torch.nn.Module) -> int:
    """Switch every BatchNorm of ``model`` to its global version in place; returns how many were switched.

    Swapping the class (the subclass adds no state) keeps every parameter, buffer, hook and attribute, so
    optimizers and state-dict keys are unaffected. Other BatchNorm types are refused rather than left
    per-rank, which would silently break the equivalence with single-process training.
    """
    switched = 0
    for name, module in model.named_modules():
        if type(module) in _GLOBAL_VERSIONS.values() or not isinstance(module, _BatchNorm):
            continue
        if type(module) not in _GLOBAL_VERSIONS:
            raise TypeError(f"cannot synchronise {name} ({type(module).__name__}) across ranks; supported: "
                            f"{', '.join(t.__name__ for t in _GLOBAL_VERSIONS)}")
        module.__class__ = _GLOBAL_VERSIONS[type(module)]
        switched += 1
    return switched

"""StableAdamW as Dinomaly trains with it: ported from guojiajeremy/Dinomaly optimizers/StableAdamW.py (MIT licence),
the form anomalib also copies (src/anomalib/models/image/dinomaly/components/optimizer.py).

Why a port and not a package: torch-optimi 0.3.3 (optimi/stableadamw.py) and pytorch-optimizer 4.1.0
(optimizer/adamw.py ``StableAdamW``) implement the paper's update (Wortsman et al. 2023: the step divided by
max(1, RMS(g^2 / v)), weight decay scaled by that same clipped rate) without AMSGrad. Dinomaly's recipe runs
AMSGrad (``amsgrad=True``), divides by max(1, RMS(g / denominator)) and decays the weights by lr x weight_decay
before the update, unclipped: other steps, so other weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim import Optimizer


class StableAdamW(Optimizer):
    """AdamW whose per-tensor step is divided by max(1, RMS(grad / denominator) / clip_threshold)."""

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float, betas: tuple[float, float],
                 eps: float, weight_decay: float, amsgrad: bool, clip_threshold: float = 1.0) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= beta < 1 for beta in betas):
            raise ValueError(f"StableAdamW needs lr, eps, weight_decay >= 0 and betas in [0, 1); got lr={lr}, "
                             f"eps={eps}, weight_decay={weight_decay}, betas={betas}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad,
                    "clip_threshold": clip_threshold}
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's Optimizer.step signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                parameter.mul_(1 - group["lr"] * group["weight_decay"])
                grad = parameter.grad
                state = self.state[parameter]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(parameter)
                    state["exp_avg_sq"] = torch.zeros_like(parameter)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(parameter)
                state["step"] += 1
                bias_correction1 = 1 - beta1 ** state["step"]
                bias_correction2 = 1 - beta2 ** state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                second = exp_avg_sq
                if group["amsgrad"]:
                    torch.max(state["max_exp_avg_sq"], exp_avg_sq, out=state["max_exp_avg_sq"])
                    second = state["max_exp_avg_sq"]
                denominator = (second.sqrt() / math.sqrt(bias_correction2)).add_(group["eps"])
                ratio = grad / denominator
                rms = ratio.norm(2) / ratio.numel() ** 0.5
                clip = max(1.0, rms / group["clip_threshold"])
                parameter.addcdiv_(exp_avg, denominator, value=-group["lr"] / bias_correction1 / clip)
        return loss

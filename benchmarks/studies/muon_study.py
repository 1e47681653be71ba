"""Muon for conv and linear weights, AdamW for the rest: a study of the optimizer as a lever (not shipped).

Muon (Jordan et al. 2024) replaces each weight matrix's update by the nearest semi-orthogonal matrix of its momentum
(Newton-Schulz iterations), which speeds up early training of conv nets and transformers. torch.optim.Muon takes 2-D
parameters only; conv kernels are used here as matrices [out, in * kh * kw].
"""

from __future__ import annotations

from typing import Any

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalise(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of ``matrix`` = U S V^T (quintic Newton-Schulz, as in Muon)."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.float()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if transposed else x


class ConvMuon(torch.optim.Optimizer):
    """Muon with Nesterov momentum over >= 2-D weights (flattened to matrices), its update's RMS matched to AdamW's
    (0.2 * sqrt(max(rows, cols))), so the AdamW learning rate carries over."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.95, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                buffer = state["momentum"]
                buffer.mul_(group["momentum"]).add_(p.grad)
                update = p.grad + group["momentum"] * buffer
                matrix = update.reshape(update.shape[0], -1)
                scale = 0.2 * max(matrix.shape) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(orthogonalise(matrix).reshape(p.shape).to(p.dtype), alpha=-group["lr"] * scale)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer object (what the training loop, LR schedule and checkpoints expect) holding ConvMuon for the
    weight matrices and AdamW for biases, norms and embeddings."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], lr: float, betas: tuple[float, float]):
        matrices = [p for n, p in named_params if p.ndim >= 2 and "embedding" not in n]
        others = [p for n, p in named_params if not (p.ndim >= 2 and "embedding" not in n)]
        self.muon = ConvMuon(matrices, lr=lr)
        self.adamw = torch.optim.AdamW(others, lr=lr, betas=betas)
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], {})
        self.param_groups = [*self.muon.param_groups, *self.adamw.param_groups]

    def step(self, closure: Any = None) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

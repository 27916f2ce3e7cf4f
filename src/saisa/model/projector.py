"""Projectors: LLaVA's embedding-space MLP and SAISA's bank of per-layer MLPs (paper Sec. 4.2, Eq. 9).

Unusual here: the SAISA projector stores its n MLPs as stacked weights, (n, out, in), so all layers' visual inputs
V_i = MLP_i(Z) come out of two batched matmuls, up front. A stage-1 "shared" projector is the same module with n = 1,
broadcast to every layer; `expand()` copies it n times for stage 2 (identical outputs right after the copy).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers.activations import ACT2FN


class StackedLinear(nn.Module):
    """n independent Linear layers stored as one (n, out, in) weight; forward maps (T, in) -> (n, T, out)."""

    def __init__(self, n: int, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.n, self.in_features, self.out_features = n, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(n, out_features)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default init, slice by slice.
        bound = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, in) shared by all n layers, or (n, T, in) one input per layer. Returns (n, T, out)."""
        return _stacked(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"n={self.n}, in_features={self.in_features}, out_features={self.out_features}"


def _take(linear: StackedLinear, layers: slice | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if layers is None:
        return linear.weight, linear.bias
    return linear.weight[layers], None if linear.bias is None else linear.bias[layers]


def _stacked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (T, in) or (c, T, in) through c stacked linears (c, out, in) -> (c, T, out)."""
    if x.dim() == 2:
        x = x.unsqueeze(0).expand(weight.shape[0], -1, -1)
    if bias is None:
        return torch.bmm(x, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


class LayerProjectors(nn.Module):
    """SAISA projector P: Z (N, v, d) -> V (n_layers, N, v, h), one MLP per LLM layer (or one shared MLP)."""

    def __init__(self, n: int, n_layers: int, d_vision: int, hidden: int, projector_type: str, act: str) -> None:
        super().__init__()
        self.n_layers = n_layers
        self.projector_type = projector_type
        self.linear_1 = StackedLinear(n, d_vision, hidden)
        if projector_type == "mlp2x_gelu":
            self.act = ACT2FN[act]
            self.linear_2 = StackedLinear(n, hidden, hidden)

    @property
    def num_mlps(self) -> int:
        return self.linear_1.n

    def forward(
        self,
        features: torch.Tensor,
        layers: slice | None = None,
        expand: bool = True,
        weights: tuple[torch.Tensor | None, ...] | None = None,
    ) -> torch.Tensor:
        """Z (N, v, d) -> V (n_layers, N, v, h), or only the layers in `layers` (a slice). A shared MLP's output is
        broadcast to them as a view; with expand=False it stays (1, N, v, h), for callers that broadcast it later
        (indexing or normalising the broadcast view would make a copy per layer). weights: one MLP's
        (w1, b1, w2, b2), each (1, out, in) / (1, out) (see `layer_weights`), used instead of the stored ones:
        returns (1, N, v, h)."""
        num_images, v, _ = features.shape
        layers = layers or slice(0, self.n_layers)
        count = 1 if weights is not None else len(range(self.n_layers)[layers])
        shared = self.num_mlps == 1
        if weights is None:
            weights = (*_take(self.linear_1, None if shared else layers),
                       *(_take(self.linear_2, None if shared else layers) if self.projector_type == "mlp2x_gelu"
                         else (None, None)))
        w1, b1, w2, b2 = weights
        x = _stacked(features.reshape(num_images * v, -1), w1, b1)  # (c, N*v, h)
        if self.projector_type == "mlp2x_gelu":
            x = _stacked(self.act(x), w2, b2)  # (c, N*v, h)
        x = x.view(x.shape[0], num_images, v, -1)
        if shared and count > 1 and expand:
            x = x.expand(count, -1, -1, -1)  # shared MLP: a view, no copy
        return x  # (count, N, v, h)

    def layer_weights(self) -> list[tuple[torch.Tensor | None, ...]]:
        """Each MLP's (w1, b1, w2, b2) as (1, out, in) / (1, out) views, for `forward(weights=...)`. One `unbind`
        per stacked tensor: autograd stacks the n gradients back once, where a slice per MLP would make a
        full-size zero gradient per slice."""
        lin2 = getattr(self, "linear_2", None)
        tensors = (self.linear_1.weight, self.linear_1.bias, None if lin2 is None else lin2.weight,
                   None if lin2 is None else lin2.bias)
        split = [[None] * self.num_mlps if t is None else [p.unsqueeze(0) for p in t.unbind(0)] for t in tensors]
        return list(zip(*split))

    @torch.no_grad()
    def expand(self) -> None:
        """Stage 1 -> stage 2: replicate the shared MLP into n_layers per-layer MLPs (paper Sec. 4.3)."""
        if self.num_mlps != 1:
            raise ValueError(f"projector already holds {self.num_mlps} MLPs; only a shared (1-MLP) projector expands")
        for name in ("linear_1", "linear_2"):
            old = getattr(self, name, None)
            if old is None:
                continue
            new = StackedLinear(self.n_layers, old.in_features, old.out_features, bias=old.bias is not None)
            new = new.to(device=old.weight.device, dtype=old.weight.dtype)
            new.weight.copy_(old.weight.expand(self.n_layers, -1, -1))
            if old.bias is not None:
                new.bias.copy_(old.bias.expand(self.n_layers, -1))
            new.weight.requires_grad_(old.weight.requires_grad)
            if new.bias is not None:
                new.bias.requires_grad_(old.bias.requires_grad)
            setattr(self, name, new)


class MultiModalProjector(nn.Module):
    """LLaVA-1.5 projector into the embedding space: Linear(d, h) -> GELU -> Linear(h, h) (HF LLaVA's names)."""

    def __init__(self, d_vision: int, hidden: int, projector_type: str, act: str) -> None:
        super().__init__()
        self.projector_type = projector_type
        self.linear_1 = nn.Linear(d_vision, hidden)
        if projector_type == "mlp2x_gelu":
            self.act = ACT2FN[act]
            self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(features)
        if self.projector_type == "mlp2x_gelu":
            x = self.linear_2(self.act(x))
        return x  # (N, v, h)

"""Models and layers shared by the test modules (test modules never import each other).

timm's DropPath and torchvision's StochasticDepth are found through
``sys.modules["timm.layers"]`` and ``sys.modules["torchvision.ops"]``. The
``third_party_layers`` fixture gives the real classes where those packages
import (the "real models" step of .ci/run), and elsewhere registers, at
exactly those places, stand-ins with the constructor, attributes and forward
of the real ones (torchvision's CUDA wheels do not import beside the CPU
torch of ``make test``, and timm imports torchvision).
"""

import importlib
import sys
import types
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

SDPA = "torch.nn.functional.scaled_dot_product_attention"
DROPOUT = "torch.nn.functional.dropout"


class TimmDropPath(nn.Module):
    """Stand-in for timm.layers.DropPath: constructor, attributes and forward."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        noise = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            noise.div_(keep)
        return x * noise


class StochasticDepth(nn.Module):
    """Stand-in for torchvision.ops.StochasticDepth: constructor, attributes and forward."""

    def __init__(self, p: float, mode: str):
        super().__init__()
        self.p = p
        self.mode = mode

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        size = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
        noise = torch.empty(size, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * (noise / (1 - self.p) if self.p < 1 else noise)


def _usable(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # missing, or installed but broken (a CUDA torchvision beside a CPU torch)
        return None


class ThirdPartyLayers(NamedTuple):
    DropPath: type  # timm.layers.DropPath or its stand-in
    StochasticDepth: type  # torchvision.ops.StochasticDepth or its stand-in
    real: bool  # both are the real classes


@pytest.fixture
def third_party_layers(monkeypatch) -> ThirdPartyLayers:
    """The real timm and torchvision classes where they import; stand-ins registered where they would be otherwise."""
    timm_layers, tv_ops = _usable("timm.layers"), _usable("torchvision.ops")
    if timm_layers is None:
        timm_layers = types.ModuleType("timm.layers")
        timm_layers.DropPath = TimmDropPath
        monkeypatch.setitem(sys.modules, "timm.layers", timm_layers)
        monkeypatch.setitem(sys.modules, "timm.models.layers", timm_layers)
    if tv_ops is None:
        tv_ops = types.ModuleType("torchvision.ops")
        tv_ops.StochasticDepth = StochasticDepth
        monkeypatch.setitem(sys.modules, "torchvision.ops", tv_ops)
    real = timm_layers.DropPath is not TimmDropPath and tv_ops.StochasticDepth is not StochasticDepth
    return ThirdPartyLayers(timm_layers.DropPath, tv_ops.StochasticDepth, real)


class FusedAttention(nn.Module):
    """timm's Attention with fused_attn: attn_drop is kept, its p goes to SDPA."""

    def __init__(self, dim: int = 16, attn_drop: float = 0.1, proj_drop: float = 0.1):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).flatten(2)))


class Classifier(nn.Module):
    """timm's ResNet head: the classifier dropout is a call, F.dropout(x, drop_rate, training)."""

    def __init__(self, drop_rate: float = 0.2):
        super().__init__()
        self.norm = nn.BatchNorm1d(16)
        self.blocks = nn.Sequential(FusedAttention(), FusedAttention())
        self.drop_rate = drop_rate
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.blocks(x).mean(1)
        x = F.dropout(self.norm(x), p=self.drop_rate, training=self.training)
        return self.fc(x)

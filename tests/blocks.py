"""A transformer block that calls every regdrop module, shared by the
checkpointing tests (tests/test_checkpointing.py, and
tests/test_selective_checkpointing.py, which lists its forward ops)."""

import torch
import torch.nn.functional as F
from torch import nn

import regdrop_ext

P = 0.5  # every unit's keep flag is a fair coin: two draws of a mask differ for certain
BATCH, TOKENS, WIDTH = 32, 8, 32  # 32 samples (drop-path units), 256 channels, 8192 elements


class TransformerBlock(nn.Module):
    """A pre-norm transformer block that uses every regdrop module: dropout on the
    attention probabilities, bias-dropout-add after the attention projection,
    low-memory dropout in the MLP, dropout-add (both modes), channel dropout,
    drop-path and drop-path-add on the residual stream. No native random op."""

    def __init__(self, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.attn_drop = regdrop_ext.Dropout(P)
        self.proj = nn.Linear(WIDTH, WIDTH, bias=False)
        self.proj_bias = nn.Parameter(torch.zeros(WIDTH))
        self.proj_drop_add = regdrop_ext.BiasDropoutAdd(P)
        self.norm2 = nn.LayerNorm(WIDTH)
        self.fc1 = nn.Linear(WIDTH, 2 * WIDTH)
        self.mlp_drop = regdrop_ext.Dropout(P, low_memory=True)
        self.fc2 = nn.Linear(2 * WIDTH, WIDTH)
        self.mlp_drop_add = regdrop_ext.DropoutAdd(P)
        self.mix = nn.Linear(WIDTH, WIDTH)
        self.mix_drop_add = regdrop_ext.DropoutAdd(P, low_memory=True)
        self.channel_drop = regdrop_ext.Dropout2d(P)
        self.drop_path = regdrop_ext.DropPath(P)
        self.drop_path_add = regdrop_ext.DropPathAdd(P)

    def attention(self, h):
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        weights = self.attn_drop((q @ k.transpose(-2, -1) * q.size(-1) ** -0.5).softmax(-1))
        return (weights @ v).transpose(1, 2).flatten(-2)

    def forward(self, x):
        x = self.proj_drop_add(self.proj(self.attention(self.norm1(x))), self.proj_bias, x)
        x = self.mlp_drop_add(self.fc2(self.mlp_drop(F.gelu(self.fc1(self.norm2(x))))), x)
        x = self.mix_drop_add(self.mix(x), x)
        branch = self.channel_drop(x.unflatten(-1, (4, WIDTH // 4))).flatten(-2)
        return self.drop_path_add(self.drop_path(branch), x)

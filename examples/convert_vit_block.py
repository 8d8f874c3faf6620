"""Convert a timm-style Vision Transformer block to regdrop_ext's fused dropout.

The block is written here, as timm writes it, so timm is not required. Its
drop paths are timm's DropPath where timm is installed (and are converted
too) and nn.Identity otherwise, as timm does for drop_path=0.

    python examples/convert_vit_block.py [--quick]
"""

import argparse
import time

import torch
from torch import nn

import regdrop_ext

try:
    from timm.layers import DropPath
except Exception:  # not installed, or broken: timm imports torchvision, which can raise RuntimeError
    DropPath = None


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop((q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, drop: float = 0.1, drop_path: float = 0.1) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop=drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path) if DropPath and drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, drop)
        self.drop_path2 = DropPath(drop_path) if DropPath and drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small block and a few steps")
    args = parser.parse_args()
    dim, tokens, batch, steps = (64, 16, 8, 3) if args.quick else (192, 65, 16, 10)

    torch.manual_seed(0)
    original = nn.Sequential(*(Block(dim, num_heads=4) for _ in range(2)))
    model, summary = regdrop_ext.convert(original, inplace=False)
    print(summary)
    if DropPath is None:
        print("(timm is not usable here: the drop paths are nn.Identity)")

    state, converted_state = original.state_dict(), model.state_dict()
    assert list(state) == list(converted_state) and all(torch.equal(state[k], converted_state[k]) for k in state)
    x = torch.randn(batch, tokens, dim)
    with torch.no_grad():  # without dropout the two compute the same thing
        assert torch.equal(original.eval()(x), model.eval()(x))
    print("eval outputs identical, state_dict unchanged")

    # convert sees layers; one traced forward shows every random op that still runs natively.
    trace = regdrop_ext.trace_random_ops(model.train(), x)
    print(trace)
    assert not trace.native, "this block calls no dropout as a function"

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    target = torch.randn(batch, tokens, dim)
    start = time.perf_counter()
    for step in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        if step in (0, steps - 1):
            print(f"step {step}: loss {loss.item():.4f}")
    assert torch.isfinite(loss)
    print(f"{steps} training steps in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()

"""End to end: training steps of a ViT-S-like transformer block, built from
native modules and from regdrop_ext modules.

The block is pre-norm attention (width 384, 6 heads) and an MLP (4x), with
dropout after each and drop-path on both residual branches, then a
mean-pooled linear head and a cross-entropy loss. The native model uses
torch.nn.Dropout and a timm-style DropPath (eager.py); the other
regdrop_ext.Dropout and regdrop_ext.DropPath. Both start from the same
weights and see the same batches; on CUDA they run under bf16 autocast.

Reported: the forward+backward step time, the two models' steps timed in
interleaved rounds (timing.interleaved: the median of each one's fastest
round, and the spread of all its runs); the bytes autograd saves for
backward in one forward (saved_tensors_hooks); on CUDA the peak memory
allocated during a step; and whether the loss curves are alike.

The loss test: with the same weights and data, runs differ only by their
dropout draws. Two native runs with different seeds show the spread dropout
noise alone causes: sigma, the standard deviation over steps of their
per-step loss difference. regdrop_ext's curve is alike if its mean per-step
difference from the first native run is within three standard errors,
|mean| <= 3 sigma / sqrt(steps): a z-test that treats steps as independent.
"""

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import regdrop_ext

from . import eager
from .saved import saved_for_backward, total_bytes
from .timing import Interleaved, interleaved

Z_BOUND = 3.0


@dataclass(frozen=True)
class Config:
    batch: int
    tokens: int
    steps: int
    width: int = 384
    heads: int = 6
    mlp_ratio: int = 4
    classes: int = 10
    learning_rate: float = 0.05


CONFIGS = {
    "cuda": Config(batch=64, tokens=197, steps=20),
    "cpu": Config(batch=8, tokens=64, steps=12),
}
QUICK_CPU = Config(batch=4, tokens=32, steps=8)


class Block(nn.Module):
    def __init__(self, cfg: Config, dropout, drop_path) -> None:
        super().__init__()
        width, hidden = cfg.width, cfg.mlp_ratio * cfg.width
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.drop1, self.path1 = dropout(), drop_path()
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop2, self.path2 = dropout(), drop_path()
        self.head = nn.Linear(width, cfg.classes)

    def attention(self, x):
        batch, tokens, width = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(batch, tokens, width))

    def loss(self, x, labels):
        x = x + self.path1(self.drop1(self.attention(self.norm1(x))))
        x = x + self.path2(self.drop2(self.mlp(self.norm2(x))))
        return F.cross_entropy(self.head(x.mean(1)).float(), labels)


def _models(cfg: Config, p: float, device):
    torch.manual_seed(0)
    native = Block(cfg, lambda: nn.Dropout(p), lambda: eager.DropPath(p)).to(device)
    ours = Block(cfg, lambda: regdrop_ext.Dropout(p), lambda: regdrop_ext.DropPath(p)).to(device)
    ours.load_state_dict(native.state_dict())
    return native, ours


def _batches(cfg: Config, device):
    data = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(cfg.batch, cfg.tokens, cfg.width, generator=data).to(device),
            torch.randint(cfg.classes, (cfg.batch,), generator=data).to(device),
        )
        for _ in range(cfg.steps)
    ]


def _autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _losses(model, batches, learning_rate: float, seed: int, device):
    """Per-step losses of plain SGD from a copy of ``model``."""
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    losses = []
    for x, labels in batches:
        model.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = model.loss(x, labels)
        loss.backward()
        with torch.no_grad():
            for param in model.parameters():
                param -= learning_rate * param.grad
        losses.append(loss.item())
    return losses


def _training_step(model, x, labels, device):
    def step():
        model.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = model.loss(x, labels)
        loss.backward()

    return step


def _step_cost(model, step, timing: Interleaved, x, labels, device) -> dict:
    with _autocast(device):
        _, saved = saved_for_backward(lambda: model.loss(x, labels))
    cost = {
        "step_ms": timing.time_ms,
        "q25_ms": timing.pooled.q25_ms,
        "q75_ms": timing.pooled.q75_ms,
        "round_ms": timing.round_ms,
        "saved_bytes": total_bytes(saved),
        "peak_bytes": None,
    }
    del saved
    if device.type == "cuda":
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        cost["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return cost


def run(cfg: Config, p: float, device, threads: int, budget_s: float, rounds: int) -> dict:
    native, ours = _models(cfg, p, device)
    batches = _batches(cfg, device)
    lr = cfg.learning_rate
    losses = {
        "native": _losses(native, batches, lr, seed=1, device=device),
        "native_reseeded": _losses(native, batches, lr, seed=2, device=device),
        "regdrop_ext": _losses(ours, batches, lr, seed=1, device=device),
    }
    noise = torch.tensor(losses["native_reseeded"]) - torch.tensor(losses["native"])
    difference = torch.tensor(losses["regdrop_ext"]) - torch.tensor(losses["native"])
    sigma, mean = noise.std().item(), difference.mean().item()
    bound = Z_BOUND * sigma / math.sqrt(cfg.steps)
    x, labels = batches[0]
    steps = {"native": _training_step(native, x, labels, device), "regdrop_ext": _training_step(ours, x, labels, device)}
    timings = dict(zip(steps, interleaved(list(steps.values()), device, threads, budget_s, rounds)))
    return {
        "config": {**asdict(cfg), "p": p, "autocast": "bf16" if device.type == "cuda" else None},
        "models": {
            "native": "torch.nn.Dropout + timm-style DropPath",
            "regdrop_ext": "regdrop_ext.Dropout + regdrop_ext.DropPath",
        },
        "native": _step_cost(native, steps["native"], timings["native"], x, labels, device),
        "regdrop_ext": _step_cost(ours, steps["regdrop_ext"], timings["regdrop_ext"], x, labels, device),
        "losses": losses,
        "loss_test": {
            "test": "|mean(regdrop - native)| <= 3 sigma / sqrt(steps), "
            "sigma = std(native reseeded - native)",
            "mean_difference": mean,
            "noise_sigma": sigma,
            "bound": bound,
            "alike": abs(mean) <= bound,
        },
    }


def summary(result: dict) -> str:
    cfg, test = result["config"], result["loss_test"]
    native, ours = result["native"], result["regdrop_ext"]
    lines = [
        f"end to end: block width {cfg['width']}, {cfg['heads']} heads, MLP {cfg['mlp_ratio']}x, "
        f"batch {cfg['batch']} x {cfg['tokens']} tokens, p = {cfg['p']}"
        + (f", {cfg['autocast']} autocast" if cfg["autocast"] else ""),
        f"  {'model':<45}{'step ms':>10}  {'IQR ms':<17}{'saved MB':>10}{'peak MB':>10}",
    ]
    for name in ("native", "regdrop_ext"):
        cost = result[name]
        spread = f"{cost['q25_ms']:.3f}-{cost['q75_ms']:.3f}"
        peak = "" if cost["peak_bytes"] is None else f"{cost['peak_bytes'] / 2**20:.1f}"
        lines.append(
            f"  {result['models'][name]:<45}{cost['step_ms']:>10.3f}  {spread:<17}"
            f"{cost['saved_bytes'] / 2**20:>10.1f}{peak:>10}"
        )
    lines.append(
        f"  step speedup {native['step_ms'] / ours['step_ms']:.2f}x, saved for backward "
        f"{ours['saved_bytes'] / native['saved_bytes']:.2f}x of native"
    )
    lines.append(
        f"  loss curves over {cfg['steps']} steps: mean difference {test['mean_difference']:+.4f}, "
        f"dropout noise sigma {test['noise_sigma']:.4f}, bound {test['bound']:.4f}: "
        + ("alike" if test["alike"] else "NOT alike")
    )
    return "\n".join(lines)

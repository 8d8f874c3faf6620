"""Rewrite the transformer blocks it knows so that dropout, the residual add
and the LayerNorm after them run as one op (regdrop_ext.norm_modules).

Known blocks, recognized by class and by the lines of their forward:

- Hugging Face BERT-family ``*SelfOutput`` / ``*Output`` (post-LN):
  ``LayerNorm(dropout(dense(x)) + input)`` becomes ``LayerNorm`` as a
  ``DropoutAddLayerNorm`` of ``dense(x)`` and ``input``.
- timm's ViT ``Block`` (pre-LN): ``x + drop_path1(ls1(attn(norm1(x))))``
  followed by ``norm2`` becomes ``norm2`` as a prenorm
  ``DropPathAddLayerNorm`` (or ``DropoutAddLayerNorm`` with p = 0 where
  ``drop_path1`` is an identity), which returns both the new residual stream
  and its normalization.
- torchvision's ``EncoderBlock`` (pre-LN): ``dropout(attention) + input``
  followed by ``ln_2`` likewise, as a prenorm ``DropoutAddLayerNorm``.

The fused norm takes the place of the old one under the same name and
shares its parameters, so the state_dict keys and values are unchanged; the
block's class becomes a subclass whose forward calls it. Dropout
probabilities and training modes are those of the layers replaced.
"""

import inspect
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from . import modules as dropout_modules
from .norm_modules import DropoutAddLayerNorm, DropPathAddLayerNorm

__all__ = ["FusionSummary", "fuse_norms"]


@dataclass
class FusionSummary:
    """What :func:`fuse_norms` did, by qualified module name."""

    fused: Dict[str, str] = field(default_factory=dict)  # name -> what it became
    not_fused: Dict[str, str] = field(default_factory=dict)  # name -> why it was left alone

    def __str__(self) -> str:
        lines = [f"fused {len(self.fused)}, left alone {len(self.not_fused)}"]
        lines += [f"  {name or '<model>'}: {what}" for name, what in self.fused.items()]
        lines += [f"  {name or '<model>'}: left alone, {why}" for name, why in self.not_fused.items()]
        return "\n".join(lines)


def _forward_has(cls: type, *lines: str) -> bool:
    """Whether cls.forward's source holds each line (whitespace ignored)."""
    try:
        source = "".join(inspect.getsource(cls.forward).split())
    except (OSError, TypeError):
        return False
    return all("".join(line.split()) in source for line in lines)


def _dropout_p(module: nn.Module) -> Optional[float]:
    """The probability of an element dropout layer (torch's or ours), else None."""
    if type(module) in (nn.Dropout, dropout_modules.Dropout):
        return module.p
    return None


def _drop_path(module: nn.Module) -> Optional[Tuple[float, bool]]:
    """(p, scale_by_keep) of a drop-path layer (timm's, ours) or an identity (p = 0), else None."""
    if isinstance(module, nn.Identity):
        return 0.0, True
    if type(module).__name__ == "DropPath" and hasattr(module, "drop_prob"):
        return module.drop_prob, getattr(module, "scale_by_keep", True)
    return None


def _is_layer_norm(module: nn.Module) -> bool:
    """torch's LayerNorm, or timm's (timm.layers.norm.LayerNorm: the same
    normalization, with an optional fast path)."""
    kind = type(module)
    return kind is nn.LayerNorm or (kind.__name__ == "LayerNorm" and kind.__module__ == "timm.layers.norm")


_subclasses: Dict[Tuple[type, str], type] = {}


def _with_forward(module: nn.Module, forward: Callable, label: str) -> None:
    """Give `module` a subclass of its class whose forward is `forward`."""
    base = type(module)
    key = (base, label)
    if key not in _subclasses:
        _subclasses[key] = type(f"Fused{base.__name__}", (base,), {"forward": forward, "__module__": __name__})
    module.__class__ = _subclasses[key]


# --- Hugging Face BERT-family outputs (post-LN) -------------------------------


def _bert_output_forward(self, hidden_states, input_tensor):
    return self.LayerNorm(self.dense(hidden_states), input_tensor)


def _fuse_bert_output(module: nn.Module, low_memory: bool) -> Tuple[Optional[str], Optional[str]]:
    children = dict(module.named_children())
    if set(children) != {"dense", "LayerNorm", "dropout"}:
        return None, None
    if not _forward_has(type(module), "hidden_states = self.dropout(hidden_states)",
                        "self.LayerNorm(hidden_states + input_tensor)"):
        return None, "its forward is not LayerNorm(dropout(dense(x)) + input)"
    p = _dropout_p(module.dropout)
    if p is None or type(module.LayerNorm) is not nn.LayerNorm:
        return None, "its dropout or LayerNorm is not torch's (or regdrop_ext's) own"
    module.LayerNorm = DropoutAddLayerNorm.from_norm(module.LayerNorm, p, low_memory=low_memory)
    _with_forward(module, _bert_output_forward, "bert-output")
    return "LayerNorm(dropout(dense(x)) + input) as DropoutAddLayerNorm", None


# --- timm's ViT Block (pre-LN) -------------------------------------------------


def _timm_block_forward(self, x, attn_mask=None, is_causal=False):
    h, x = self.norm2(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)), x)
    return x + self.drop_path2(self.ls2(self.mlp(h)))


def _timm_block_forward_without_is_causal(self, x, attn_mask=None):
    h, x = self.norm2(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask)), x)
    return x + self.drop_path2(self.ls2(self.mlp(h)))


# The forwards of timm's Block that this fuses, by the attention call they make.
_TIMM_BLOCK_FORWARDS = (
    ("self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)", _timm_block_forward),
    ("self.attn(self.norm1(x), attn_mask=attn_mask)", _timm_block_forward_without_is_causal),
)


def _fuse_timm_block(module: nn.Module, low_memory: bool) -> Tuple[Optional[str], Optional[str]]:
    kind = type(module)
    if not (kind.__name__ == "Block" and kind.__module__.startswith("timm.models.vision_transformer")):
        return None, None
    forward = next((f for call, f in _TIMM_BLOCK_FORWARDS
                    if _forward_has(kind, f"x = x + self.drop_path1(self.ls1({call}))",
                                    "x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))")), None)
    if forward is None:
        return None, "its forward is not the pre-LN x + drop_path(ls(attn(norm(x)))) of the timm versions known"
    drop = _drop_path(module.drop_path1)
    if drop is None or not _is_layer_norm(module.norm2):
        return None, "its drop_path1 or norm2 is not timm's DropPath / Identity and a LayerNorm (torch's or timm's)"
    p, scale_by_keep = drop
    if p > 0:
        module.norm2 = DropPathAddLayerNorm.from_norm(module.norm2, p, scale_by_keep=scale_by_keep, prenorm=True)
        what = "x + drop_path1(attention) and norm2 as a prenorm DropPathAddLayerNorm"
    else:
        module.norm2 = DropoutAddLayerNorm.from_norm(module.norm2, 0.0, prenorm=True, low_memory=low_memory)
        what = "x + attention and norm2 as a prenorm DropoutAddLayerNorm (p = 0)"
    module.drop_path1 = nn.Identity()  # applied inside norm2 now
    _with_forward(module, forward, forward.__name__)
    return what, None


# --- torchvision's EncoderBlock (pre-LN) -------------------------------------


def _torchvision_encoder_block_forward(self, input):
    torch._assert(input.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {input.shape}")
    x = self.ln_1(input)
    x, _ = self.self_attention(x, x, x, need_weights=False)
    y, x = self.ln_2(x, input)
    return x + self.mlp(y)


def _fuse_torchvision_encoder_block(module: nn.Module, low_memory: bool) -> Tuple[Optional[str], Optional[str]]:
    kind = type(module)
    if not (kind.__name__ == "EncoderBlock" and kind.__module__ == "torchvision.models.vision_transformer"):
        return None, None
    if not _forward_has(kind, "x = self.dropout(x)", "x = x + input", "y = self.ln_2(x)"):
        return None, "its forward is not the pre-LN dropout(attention) + input, ln_2 this torchvision had"
    p = _dropout_p(module.dropout)
    if p is None or type(module.ln_2) is not nn.LayerNorm:
        return None, "its dropout or ln_2 is not torch's (or regdrop_ext's) own"
    module.ln_2 = DropoutAddLayerNorm.from_norm(module.ln_2, p, prenorm=True, low_memory=low_memory)
    module.dropout = nn.Identity()  # applied inside ln_2 now
    _with_forward(module, _torchvision_encoder_block_forward, "torchvision-encoder-block")
    return "dropout(attention) + input and ln_2 as a prenorm DropoutAddLayerNorm", None


_RULES = (_fuse_bert_output, _fuse_timm_block, _fuse_torchvision_encoder_block)


def fuse_norms(model: nn.Module, *, low_memory: bool = False) -> FusionSummary:
    """Fuse dropout + residual add + LayerNorm in the blocks of ``model`` it
    knows (see the module docstring), in place; returns what it fused, and
    why it left alone each block it recognized by name but could not fuse.
    ``low_memory=True`` gives element dropout's fused norms the low-memory
    mode (16 bytes saved per call instead of a bit per element)."""
    summary = FusionSummary()
    for name, module in list(model.named_modules()):
        if type(module).__module__ == __name__:
            summary.not_fused[name] = "already fused"
            continue
        for rule in _RULES:
            what, why = rule(module, low_memory)
            if what is not None:
                summary.fused[name] = what
                break
            if why is not None:
                summary.not_fused[name] = why
                break
    return summary

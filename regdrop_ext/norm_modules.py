"""Modules for dropout + residual + LayerNorm / RMSNorm in one pass
(regdrop_ext.norm): thin layers that store their arguments and call the
functional forms.

Their parameters and state_dict keys are those of ``torch.nn.LayerNorm``
(``weight``, ``bias``) and ``torch.nn.RMSNorm`` (``weight``), so a pretrained
norm loads unchanged, and ``from_norm(norm, p, **options)`` builds one that
shares an existing norm's parameters. ``module(input, residual)`` returns the
normalized ``norm(residual + dropout(input))``, or ``(output, residual_out)``
with ``prenorm=True``.
"""

import numbers
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import norm as F

Shape = Union[int, Tuple[int, ...], torch.Size]


__all__ = ["DropPathAddLayerNorm", "DropPathAddRMSNorm", "DropoutAddLayerNorm", "DropoutAddRMSNorm"]


def _hidden(normalized_shape: Shape) -> Tuple[int]:
    shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"normalized_shape must be one dimension (the last), got {list(shape)}")
    return (int(shape[0]),)


class _DropoutAddNorm(nn.Module):
    """What the four modules share: the norm's parameters and the options."""

    rms = False
    drop_path = False

    def __init__(self, normalized_shape: Shape, p: float, eps: Optional[float], elementwise_affine: bool, bias: bool,
                 prenorm: bool, residual_in_fp32: bool, device=None, dtype=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        self.normalized_shape = _hidden(normalized_shape)
        self.p = p
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.prenorm = prenorm
        self.residual_in_fp32 = residual_in_fp32
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **factory))
            if bias and not self.rms:
                self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory))
            elif not self.rms:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            if not self.rms:
                self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if getattr(self, "bias", None) is not None:
            nn.init.zeros_(self.bias)

    @classmethod
    def from_norm(cls, norm: nn.Module, p: float = 0.0, **options):
        """One built from ``norm`` (an ``nn.LayerNorm``, or ``nn.RMSNorm`` for
        the RMS forms), sharing its parameters (the same ``Parameter``
        objects: optimizers and state_dicts see no change) and its training
        mode; ``options`` are the constructor's keyword arguments, such as
        ``prenorm=True``."""
        expected = nn.RMSNorm if cls.rms else nn.LayerNorm
        if not isinstance(norm, expected):
            raise TypeError(f"{cls.__name__}.from_norm needs an nn.{expected.__name__}, got {type(norm).__name__}")
        has_bias = getattr(norm, "bias", None) is not None
        if cls.rms:
            module = cls(norm.normalized_shape, p, norm.eps, norm.elementwise_affine, **options)
        else:
            module = cls(norm.normalized_shape, p, norm.eps, norm.elementwise_affine, has_bias, **options)
        module.weight = norm.weight
        if not cls.rms:
            module.bias = norm.bias
        module.train(norm.training)
        return module

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, p={self.p}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        if self.prenorm:
            text += ", prenorm=True"
        if self.residual_in_fp32:
            text += ", residual_in_fp32=True"
        return text


class DropoutAddLayerNorm(_DropoutAddNorm):
    """``nn.LayerNorm(residual + nn.Dropout(p)(input))`` in one pass.

    Args:
        normalized_shape, eps, elementwise_affine, bias: as ``nn.LayerNorm``'s
            (one normalized dimension).
        p: element dropout probability.
        prenorm: return ``(output, residual_out)``: the normalized input of a
            pre-norm block's next sublayer and the new residual stream.
        residual_in_fp32: keep the residual stream in float32 for a 16-bit
            input without a residual.
        low_memory: save 16 bytes of Philox state for backward instead of the
            1-bit mask, and draw the bits again.
    """

    def __init__(self, normalized_shape: Shape, p: float = 0.5, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, *, prenorm: bool = False, residual_in_fp32: bool = False,
                 low_memory: bool = False, device=None, dtype=None):
        super().__init__(normalized_shape, p, eps, elementwise_affine, bias, prenorm, residual_in_fp32, device, dtype)
        self.low_memory = low_memory

    def forward(self, input: Tensor, residual: Optional[Tensor] = None):
        return F.dropout_add_layer_norm(input, residual, self.weight, self.bias, self.p, self.eps,
                                        training=self.training, prenorm=self.prenorm,
                                        residual_in_fp32=self.residual_in_fp32, low_memory=self.low_memory)


class DropoutAddRMSNorm(_DropoutAddNorm):
    """``nn.RMSNorm(residual + nn.Dropout(p)(input))`` in one pass; arguments
    as ``DropoutAddLayerNorm``'s and ``nn.RMSNorm``'s (``eps=None``:
    ``torch.finfo(input.dtype).eps``)."""

    rms = True

    def __init__(self, normalized_shape: Shape, p: float = 0.5, eps: Optional[float] = None,
                 elementwise_affine: bool = True, *, prenorm: bool = False, residual_in_fp32: bool = False,
                 low_memory: bool = False, device=None, dtype=None):
        super().__init__(normalized_shape, p, eps, elementwise_affine, False, prenorm, residual_in_fp32, device, dtype)
        self.low_memory = low_memory

    def forward(self, input: Tensor, residual: Optional[Tensor] = None):
        return F.dropout_add_rms_norm(input, residual, self.weight, self.p, self.eps, training=self.training,
                                      prenorm=self.prenorm, residual_in_fp32=self.residual_in_fp32,
                                      low_memory=self.low_memory)


class DropPathAddLayerNorm(_DropoutAddNorm):
    """``nn.LayerNorm(residual + DropPath(p)(input))`` in one pass: whole
    samples (dim 0) of ``input`` are dropped, as timm's ``DropPath`` drops
    them (``scale_by_keep`` as timm's)."""

    drop_path = True

    def __init__(self, normalized_shape: Shape, p: float = 0.0, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, *, scale_by_keep: bool = True, prenorm: bool = False,
                 residual_in_fp32: bool = False, device=None, dtype=None):
        super().__init__(normalized_shape, p, eps, elementwise_affine, bias, prenorm, residual_in_fp32, device, dtype)
        self.scale_by_keep = scale_by_keep

    def forward(self, input: Tensor, residual: Optional[Tensor] = None):
        return F.drop_path_add_layer_norm(input, residual, self.weight, self.bias, self.p, self.eps,
                                          training=self.training, scale_by_keep=self.scale_by_keep,
                                          prenorm=self.prenorm, residual_in_fp32=self.residual_in_fp32)


class DropPathAddRMSNorm(_DropoutAddNorm):
    """``nn.RMSNorm(residual + DropPath(p)(input))`` in one pass; see ``DropPathAddLayerNorm``."""

    rms = True
    drop_path = True

    def __init__(self, normalized_shape: Shape, p: float = 0.0, eps: Optional[float] = None,
                 elementwise_affine: bool = True, *, scale_by_keep: bool = True, prenorm: bool = False,
                 residual_in_fp32: bool = False, device=None, dtype=None):
        super().__init__(normalized_shape, p, eps, elementwise_affine, False, prenorm, residual_in_fp32, device, dtype)
        self.scale_by_keep = scale_by_keep

    def forward(self, input: Tensor, residual: Optional[Tensor] = None):
        return F.drop_path_add_rms_norm(input, residual, self.weight, self.p, self.eps, training=self.training,
                                        scale_by_keep=self.scale_by_keep, prenorm=self.prenorm,
                                        residual_in_fp32=self.residual_in_fp32)

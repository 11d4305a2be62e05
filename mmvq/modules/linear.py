"""Quantized Linear and Conv2d: input, weight and (optional) output quantizers."""
import torch.nn as nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
import torch.nn.functional as F

from ..registry import QUANT_WRAPPERS
from .base import QuantModuleMixin


def quantize_output(quantizer, y):
    """``quantizer(y)`` for a layer's fresh output ``y``, which nothing else
    reads: a fused kernel may write into it (one allocation fewer) unless a
    hook could keep a reference to ``y`` (calibration searches, analysis)."""
    if isinstance(quantizer, nn.Identity):
        return y
    hooked = (quantizer._forward_pre_hooks or quantizer._forward_hooks
              or _global_forward_hooks or _global_forward_pre_hooks)
    return quantizer(y) if hooked else quantizer(y, inplace=True)


@QUANT_WRAPPERS.register(nn.Linear)
class QuantLinear(QuantModuleMixin):
    """``y = oq(F.linear(iq(x), wq(W), b))``.

    Slots: ``input`` (activation), ``weight`` (per output channel: ``ch_axis=0``),
    ``output`` (rarely used; e.g. classifier logits in FQ-ViT).
    """

    slots = ('input', 'weight', 'output')

    def forward(self, x):
        x = self.input_quantizer(x)
        w = self.quantized_weight()
        return quantize_output(self.output_quantizer, F.linear(x, w, self.bias))


@QUANT_WRAPPERS.register(nn.Conv2d)
class QuantConv2d(QuantModuleMixin):
    """``y = oq(conv(iq(x), wq(W), b))`` (``nn.ConvTranspose2d`` is not matched)."""

    slots = ('input', 'weight', 'output')

    def forward(self, x):
        x = self.input_quantizer(x)
        w = self.quantized_weight()
        return quantize_output(self.output_quantizer, self._conv_forward(x, w, self.bias))

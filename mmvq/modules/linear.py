"""Quantized Linear and Conv2d: input, weight and (optional) output quantizers."""
import torch.nn as nn
import torch.nn.functional as F

from ..registry import QUANT_WRAPPERS
from .base import QuantModuleMixin


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
        return self.output_quantizer(F.linear(x, w, self.bias))


@QUANT_WRAPPERS.register(nn.Conv2d)
class QuantConv2d(QuantModuleMixin):
    """``y = oq(conv(iq(x), wq(W), b))`` (``nn.ConvTranspose2d`` is not matched)."""

    slots = ('input', 'weight', 'output')

    def forward(self, x):
        x = self.input_quantizer(x)
        w = self.quantized_weight()
        return self.output_quantizer(self._conv_forward(x, w, self.bias))

"""Quantized softmax: logits quantizer + float softmax or Log-Int-Softmax."""
import torch.nn as nn

from ..quantizers import fused as _fused
from ..quantizers.base import host_value
from ..quantizers.lis import lis_fused
from ..registry import QUANT_WRAPPERS
from .base import QuantModuleMixin


@QUANT_WRAPPERS.register(nn.Softmax)
class QuantSoftmax(QuantModuleMixin):
    """Softmax over the last axis with quantized logits.

    Slots: ``input`` (the logits; FQ-ViT's ``qact_attn1``/Swin ``qact2``) and
    ``lis`` (a :class:`LogIntSoftmax`; when set and both are active the
    integer softmax + log2 quantization replaces the float softmax). The
    post-softmax quantizer of other methods (AdaLog, uniform, IGQ rows) sits
    on the attention's ``matmul2.a`` slot instead.

    ``forward(x, mask=None)``: the additive mask (Swin's shifted windows) is
    added after the logits quantizer, as in FQ-ViT.
    """

    slots = ('input', 'lis')

    def lis_active(self):
        lis, iq = self.lis_quantizer, self.input_quantizer
        return (getattr(lis, 'integer_softmax', False) and lis.enabled and lis.mode == 'quant'
                and getattr(iq, 'enabled', False) and iq.mode == 'quant')

    def mmvq_prime(self):
        """Read LIS's logit scale on the host before evaluation (not per forward)."""
        if self.lis_active():
            host_value(self.lis_quantizer, 'logit_scale', self.input_quantizer.scale, float)

    def forward(self, x, mask=None):
        if self.lis_active():
            if self.input_quantizer.scale.numel() != 1:
                raise ValueError('LIS needs a per-tensor logits quantizer (role attn_logits)')
            if _fused.use_fused(self.lis_quantizer, x):
                y = lis_fused(self.lis_quantizer, self.input_quantizer, x, mask)
                if y is not None:
                    return y
            xq = self.input_quantizer(x)
            return self.lis_quantizer.softmax(xq, self.input_quantizer.scale, mask)
        x = self.input_quantizer(x)
        if mask is not None:
            x = x + mask
        return x.softmax(dim=self.dim if self.dim is not None else -1)

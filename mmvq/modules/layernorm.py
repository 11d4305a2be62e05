"""Quantized LayerNorm: PTF (or uniform) input, optional integer LayerNorm."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quantizers import fused as _fused
from ..quantizers.base import host_value
from ..quantizers.exact import chunk_elems
from ..quantizers.ptf import int_layer_norm
from ..registry import QUANT_WRAPPERS
from .base import QuantModuleMixin


@QUANT_WRAPPERS.register(nn.LayerNorm)
class QuantLayerNorm(QuantModuleMixin):
    """LayerNorm with quantized input and output.

    Slots: ``input`` (FQ-ViT: :class:`PTFQuantizer`), ``output`` (uniform).
    With ``integer=True``, a PTF input and a per-tensor uniform output, the
    quantized forward runs FQ-ViT's integer LayerNorm
    (:func:`mmvq.quantizers.ptf.int_layer_norm`) on the PTF codes; otherwise
    it is ``oq(F.layer_norm(iq(x)))``. The integer path runs on slices of
    rows of about :func:`mmvq.quantizers.exact.chunk_elems` elements (rows
    are independent: the same results, bounded float64 temporaries).

    ``stream_input`` (set by :class:`mmvq.adapters.residual.QuantResidualBlock`):
    the block has already applied the input quantizer to the residual stream,
    so the float path does not apply it again. ``first_token`` (a ViT's final
    LayerNorm read only at the class token): the output quantizer is
    calibrated on the first token of every sequence, as FQ-ViT's ``qact2``
    after ``norm(x)[:, 0]``.
    """

    slots = ('input', 'output')
    stream_input = False
    first_token = False

    def quant_setup(self, slot_cfgs, integer=False, first_token=False, **kwargs):
        super().quant_setup(slot_cfgs)
        self.integer = bool(integer)
        self.first_token = bool(first_token)
        iq, oq = self.input_quantizer, self.output_quantizer
        if self.integer and not (getattr(iq, 'power_of_two_factors', False)
                                 and getattr(oq, 'affine', False)):
            raise ValueError('integer LayerNorm needs a PTFQuantizer input and a per-tensor '
                             'UniformQuantizer output: set roles ln_input/ln_output')

    def _int_path_active(self):
        iq, oq = self.input_quantizer, self.output_quantizer
        return (self.integer and iq.enabled and oq.enabled and iq.mode == 'quant'
                and oq.mode == 'quant' and oq.ch_axis is None)

    def _has_zero_weight(self):
        return host_value(self, 'zero_weight', self.weight, lambda w: bool((w == 0).any()))

    def mmvq_prime(self):
        """Host values of the integer path, read before evaluation (no sync per forward)."""
        if self.integer:
            self._has_zero_weight()

    def forward(self, x):
        if self._int_path_active():
            iq, oq = self.input_quantizer, self.output_quantizer
            zero_w = self._has_zero_weight()
            if (_fused.use_fused(iq, x) and self.weight.dtype == torch.float32
                    and iq.scale.dtype == torch.float32 and oq.scale.dtype == torch.float32):
                return _fused.int_layer_norm(x, iq, oq, self.weight, self.bias, zero_w)
            c = x.shape[-1]
            rows = x.reshape(-1, c)
            out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
            step = max(1, chunk_elems(x.device) // c)
            for i in range(0, rows.shape[0], step):
                _, y = int_layer_norm(iq.quantize(rows[i:i + step]), iq.zero_point, iq.alpha,
                                      iq.scale, self.weight, self.bias, oq.scale, oq.zero_point,
                                      oq.qmin, oq.qmax, return_codes=False,
                                      has_zero_weight=zero_w)
                out[i:i + step] = y
            return out.reshape(x.shape)
        if not self.stream_input:
            x = self.input_quantizer(x)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        oq = self.output_quantizer
        if self.first_token and x.dim() == 3 and getattr(oq, 'mode', None) == 'calib':
            oq(x[:, :1])                  # observe the class token only
            return x
        return oq(x)

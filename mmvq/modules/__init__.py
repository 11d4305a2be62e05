"""Quantized wrapper modules, keyed by float class in ``QUANT_WRAPPERS``."""
from .attention import QuantAttentionMixin
from .base import QuantModuleMixin, build_quantizer, float_class, module_device, swap_class
from .layernorm import QuantLayerNorm
from .linear import QuantConv2d, QuantLinear
from .matmul import QuantMatMul
from .softmax import QuantSoftmax

__all__ = ['QuantModuleMixin', 'QuantAttentionMixin', 'module_device', 'build_quantizer', 'float_class', 'swap_class',
           'QuantLinear', 'QuantConv2d', 'QuantLayerNorm', 'QuantMatMul', 'QuantSoftmax']

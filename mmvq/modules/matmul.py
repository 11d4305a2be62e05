"""QuantMatMul: a module for an inline ``a @ b`` with two quantized operands."""
import torch
import torch.nn as nn

from .base import QuantModuleMixin


class QuantMatMul(QuantModuleMixin, nn.Module):
    """``a_quantizer(a) @ b_quantizer(b)``.

    Attention wrappers own two of these (``matmul1`` for ``q @ k^T`` and
    ``matmul2`` for ``attn @ v``) because the float modules compute the
    products inline in ``forward``.
    """

    slots = ('a', 'b')

    def __init__(self, slot_cfgs=None):
        super().__init__()
        self.quant_setup(slot_cfgs or {})

    def forward(self, a, b):
        return torch.matmul(self.a_quantizer(a), self.b_quantizer(b))

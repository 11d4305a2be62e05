"""mmpretrain ``VisionTransformer`` (ViT) and ``DistilledVisionTransformer`` (DeiT).

mmpretrain's ``MultiheadAttention`` calls the fused
``F.scaled_dot_product_attention``, which hides the softmax and both matmuls.
:class:`QuantMultiheadAttention` computes them explicitly whenever one of its
quantizers is calibrating or quantizing; with all of them disabled (or in
float mode) it calls the original forward, so the float model is untouched
bit for bit.
"""
import functools

import torch.nn.functional as F

from ..modules.base import float_class
from .attention import QuantAttentionMixin
from .base import BaseAdapter, register_adapter


class QuantMultiheadAttention(QuantAttentionMixin):
    """Quantized forward of mmpretrain ``MultiheadAttention``."""

    def forward(self, x):
        if not self.any_quantizer_active():
            return float_class(self).forward(self, x)
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads,
                                  self.head_dims).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        sdpa = self.scaled_dot_product_attention
        if isinstance(sdpa, functools.partial):
            # mmpretrain's qk_scale path: logits = q @ k^T / scale
            attn = self.matmul1(q, k.transpose(-2, -1)) / sdpa.keywords['scale']
        else:
            attn = self.matmul1(q * self.head_dims**-0.5, k.transpose(-2, -1))
        attn = self.softmax(attn)
        if self.training and self.attn_drop > 0:
            attn = F.dropout(attn, self.attn_drop)
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B, N, self.embed_dims)
        x = self.proj(x)
        x = self.out_drop(self.gamma1(self.proj_drop(x)))
        if self.v_shortcut:
            x = v.squeeze(1) + x
        return x


@register_adapter
class ViTAdapter(BaseAdapter):
    """mmpretrain ``VisionTransformer`` and its DeiT subclass."""

    name = 'vit'

    def __init__(self):
        try:
            from mmpretrain.models.backbones import VisionTransformer
            from mmpretrain.models.utils.attention import MultiheadAttention
        except Exception:  # noqa: BLE001 - mmpretrain is optional for detection users
            self.backbones, self.attention, self.supported = (), {}, []
            return
        self.backbones = (VisionTransformer, )
        self.attention = {MultiheadAttention: QuantMultiheadAttention}
        self.supported = ['mmpretrain.VisionTransformer', 'mmpretrain.DistilledVisionTransformer (DeiT)']

"""mmpretrain ``VisionTransformer`` (ViT) and ``DistilledVisionTransformer`` (DeiT).

mmpretrain's ``MultiheadAttention`` calls the fused
``F.scaled_dot_product_attention``, which hides the softmax and both matmuls.
:class:`QuantMultiheadAttention` computes them explicitly whenever one of its
quantizers is calibrating or quantizing; with all of them disabled (or in
float mode) it calls the original forward, so the float model is untouched
bit for bit.

:class:`QuantVisionTransformer` (the backbone itself) adds FQ-ViT's
embedding quantizers: ``embed`` on the tokens after the class-token concat
(``qact_embed``, role ``cls_embed``) and ``pos`` on the position embedding
(``qact_pos``, role ``pos_embed``); the sum is the first block's ``ln1``
input (FQ-ViT's ``qact1``). Its forward is mmpretrain's with the two
quantizers inserted, and is used only when one of them is active.
"""
import functools

import torch
import torch.nn.functional as F

from ..modules.base import QuantModuleMixin, float_class
from ..modules.attention import QuantAttentionMixin
from .base import BaseAdapter, Site, register_adapter


class QuantVisionTransformer(QuantModuleMixin):
    """mmpretrain ``VisionTransformer`` with quantized token and position embeddings.

    Slots: ``embed`` (class token + patch tokens, FQ-ViT ``qact_embed``),
    ``pos`` (the position embedding, ``qact_pos``).
    """

    slots = ('embed', 'pos')

    def forward(self, x):
        if not any(q.enabled and q.mode != 'float' for _, q in self.quantizers()):
            return float_class(self).forward(self, x)
        from mmpretrain.models.utils import resize_pos_embed
        B = x.shape[0]
        x, patch_resolution = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = self.embed_quantizer(x)
        x = x + self.pos_quantizer(resize_pos_embed(
            self.pos_embed, self.patch_resolution, patch_resolution,
            mode=self.interpolate_mode, num_extra_tokens=self.num_extra_tokens))
        x = self.pre_norm(self.drop_after_pos(x))
        outs = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i == len(self.layers) - 1 and self.final_norm:
                x = self.ln1(x)
            if i in self.out_indices:
                outs.append(self._format_output(x, patch_resolution))
        return tuple(outs)


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
    _vit_forward = None

    def __init__(self):
        try:
            from mmpretrain.models.backbones import VisionTransformer
            from mmpretrain.models.utils.attention import MultiheadAttention
        except Exception:  # noqa: BLE001 - mmpretrain is optional for detection users
            self.backbones, self.attention, self.supported = (), {}, []
            return
        from mmpretrain.models.backbones.vision_transformer import TransformerEncoderLayer
        self.backbones = (VisionTransformer, )
        self.attention = {MultiheadAttention: QuantMultiheadAttention}
        self.residual_blocks = {TransformerEncoderLayer: ('ln1', 'ln2')}
        self._vit_forward = VisionTransformer.forward
        self.supported = ['mmpretrain.VisionTransformer', 'mmpretrain.DistilledVisionTransformer (DeiT)']

    def sites(self, backbone, prefix):
        final_ln = f'{prefix}.ln1' if prefix else 'ln1'
        cls_only = getattr(backbone, 'final_norm', False) and \
            getattr(backbone, 'out_type', None) == 'cls_token'
        for site in super().sites(backbone, prefix):
            if cls_only and site.name == final_ln:
                site.kwargs['first_token'] = True
            yield site
        # the embedding stage; a subclass with its own forward (DeiT's
        # distillation token) keeps it float
        if type(backbone).forward is self._vit_forward:
            yield Site(prefix, backbone, QuantVisionTransformer,
                       dict(embed='cls_embed', pos='pos_embed'), optional=True)

"""Swin Transformer of mmdet and mmpretrain.

Both libraries' ``WindowMSA.forward`` compute ``q @ k^T`` and ``attn @ v``
inline, so :class:`QuantWindowMSA` overrides that forward only (the shifted
window logic of ``ShiftWindowMSA`` — padding, cyclic shift, masks — runs
unchanged). The op sequence is the float one with quantizer calls inserted,
so with every quantizer disabled the output is bit-identical.

Sites: ``patch_embed.projection`` (Conv2d, role ``patch_embed_input``),
every LayerNorm (``ln_input``/``ln_output``; PatchMerging's norm with
``tied_channels=4`` for its ``nn.Unfold`` channel order ``c*4 + offset``),
``qkv``/``proj`` (``qkv_input``/``proj_input``), attention matmuls and
softmax, FFN ``fc1``/``fc2`` (``fc1_input``/``fc2_input`` = post-GELU) and
PatchMerging ``reduction`` (``reduction_input``).
"""

from ..modules.attention import QuantAttentionMixin
from .base import BaseAdapter, register_adapter


class QuantWindowMSA(QuantAttentionMixin):
    """Quantized forward of (mmdet | mmpretrain) ``WindowMSA``.

    Own slots (FQ-ViT ``models/swin_quant.py::WindowAttention``): ``scores``
    — ``q @ k^T`` before the relative position bias (``qact_attn1``, role
    ``attn_scores``) — and ``table``, the relative-position-bias table
    (``qact_table``, role ``rel_pos_table``). The softmax's logits quantizer
    (role ``attn_logits``) sees the sum (``qact2``).
    """

    own_slots = ('scores', 'table')
    extra_roles = dict(scores='attn_scores', table='rel_pos_table')

    def forward(self, x, mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads,
                                  C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = self.scores_quantizer(self.matmul1(q, k.transpose(-2, -1)))
        relative_position_bias = self.table_quantizer(self.relative_position_bias_table)[
            self.relative_position_index.view(-1)].view(
                self.window_size[0] * self.window_size[1],
                self.window_size[0] * self.window_size[1], -1)
        relative_position_bias = relative_position_bias.permute(2, 0, 1).contiguous()
        attn = attn + relative_position_bias.unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B // nW, nW, self.num_heads, N, N)
            attn = self.softmax(attn, mask.unsqueeze(1).unsqueeze(0))
            attn = attn.view(-1, self.num_heads, N, N)
        else:
            attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        x = self.matmul2(attn, v).transpose(1, 2).reshape(B, N, C)
        x = self.proj(x)
        x = self.proj_drop(x)
        return x


def _mmdet_classes():
    try:
        import mmdet.models.backbones.swin as mmdet_swin
        from mmdet.models.layers import PatchMerging
    except ImportError:  # mmdet is optional for classification users
        return (), {}, (), ()
    return ((mmdet_swin.SwinTransformer, ), {mmdet_swin.WindowMSA: QuantWindowMSA},
            (mmdet_swin.SwinBlock, ), (PatchMerging, ))


def _mmpretrain_classes():
    try:
        from mmcv.cnn.bricks.transformer import PatchMerging
        from mmpretrain.models.backbones import SwinTransformer
        from mmpretrain.models.utils.attention import WindowMSA
    except Exception:  # noqa: BLE001 - mmpretrain is optional for detection users
        return (), {}, ()
    return (SwinTransformer, ), {WindowMSA: QuantWindowMSA}, (PatchMerging, )


def _mmpretrain_blocks():
    try:
        from mmpretrain.models.backbones.swin_transformer import SwinBlock
    except Exception:  # noqa: BLE001 - mmpretrain is optional for detection users
        return ()
    return (SwinBlock, )


@register_adapter
class SwinAdapter(BaseAdapter):
    """mmdet ``SwinTransformer`` and mmpretrain ``SwinTransformer`` (v1)."""

    name = 'swin'

    def __init__(self):
        det_backbones, det_attention, det_blocks, det_merging = _mmdet_classes()
        pre_backbones, pre_attention, pre_merging = _mmpretrain_classes()
        self.backbones = det_backbones + pre_backbones
        self.attention = {**det_attention, **pre_attention}
        self.residual_blocks = {cls: ('norm1', 'norm2') for cls in
                                det_blocks + _mmpretrain_blocks()}
        self.patch_merging = det_merging + pre_merging
        self.supported = (['mmdet.SwinTransformer'] if det_backbones else []) + (
            ['mmpretrain.SwinTransformer'] if pre_backbones else [])

"""A quantized residual stream (FQ-ViT's "fully quantized" blocks).

In FQ-ViT (megvii-research/FQ-ViT ``models/vit_quant.py::Block.forward``,
``models/swin_quant.py::SwinTransformerBlock.forward``) the sum of every
skip connection is quantized (``qact2``, ``qact4``; Power-of-Two-Factor
quantizers) and that quantized tensor feeds *both* the next LayerNorm and
the next skip connection. mmvq's LayerNorm wrappers already hold those
quantizers (their ``input`` slot, role ``ln_input``): with the quantization
config's ``residual_stream=True``, :class:`QuantResidualBlock` makes the
block apply each LayerNorm's input quantizer to the stream itself, so the
skip connection adds the quantized tensor, and the LayerNorm (told by
``stream_input``) does not quantize it a second time. The integer
LayerNorm re-derives the same codes from the quantized stream (quantizing
a value on the grid returns it).

The block of the model before the first one (FQ-ViT's ``qact1`` after the
position embedding) is the first block's ``ln1`` input quantizer; the last
block's output (``qact4``) is the final LayerNorm's input quantizer.

Supported blocks (``norm1``/``ln1``, ``attn``, ``norm2``/``ln2``, ``ffn``
with ``identity``): mmpretrain ``TransformerEncoderLayer`` (ViT/DeiT),
mmdet and mmpretrain ``SwinBlock``. With every quantizer off the block runs
its own float forward, bit for bit.
"""
from ..modules.base import QuantModuleMixin, float_class


def _quantizing(q):
    return getattr(q, 'enabled', False) and getattr(q, 'mode', 'float') != 'float'


class QuantResidualBlock(QuantModuleMixin):
    """A transformer block whose skip connections carry the quantized stream.

    ``quant_setup(slot_cfgs, norms=('norm1', 'norm2'))``: the names of the
    LayerNorms in front of the attention and the FFN.
    """

    slots = ()

    def quant_setup(self, slot_cfgs, norms=('norm1', 'norm2'), **kwargs):
        super().quant_setup(slot_cfgs)
        self.mmvq_norms = tuple(norms)
        for n in self.mmvq_norms:
            getattr(self, n).stream_input = True

    def _stream_quantizers(self):
        return [getattr(getattr(self, n), 'input_quantizer', None) for n in self.mmvq_norms]

    def forward(self, x, *args):
        q1, q2 = self._stream_quantizers()
        if not (_quantizing(q1) or _quantizing(q2)):
            return float_class(self).forward(self, x, *args)
        n1, n2 = (getattr(self, n) for n in self.mmvq_norms)
        x = q1(x) if q1 is not None else x
        x = x + self.attn(n1(x), *args)
        x = q2(x) if q2 is not None else x
        return self.ffn(n2(x), identity=x)

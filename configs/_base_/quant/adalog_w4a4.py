# AdaLog W4A4 (ECCV'24): weights 4-bit asymmetric per output channel; uniform
# 4-bit activations; Q/K/V per head; AdaLog on post-softmax (scale 1) and on
# post-GELU (shifted, folded into fc2's bias); FPCS on the layer outputs;
# patch-embed input at 8 bit (the reference's qconv_a_bit=8 leaves it unquantized).
_bits = 4
_w = dict(type='mmvq.UniformQuantizer', bits=_bits, symmetric=False, granularity='channel', ch_axis=0)
_a = dict(type='mmvq.UniformQuantizer', bits=_bits)
_h = dict(type='mmvq.UniformQuantizer', bits=_bits, granularity='head')
quant = dict(
    name=f'AdaLog W{_bits}A{_bits} (FPCS)',
    scope='backbone',
    roles=dict(
        weight=_w, act=_a, q=_h, k=_h, v=_h,
        patch_embed_input=dict(type='mmvq.UniformQuantizer', bits=8),
        attn_probs=dict(type='mmvq.AdaLogQuantizer', bits=_bits, fixed_scale=1.0),
        fc2_input=dict(type='mmvq.AdaLogQuantizer', bits=_bits, shift=0.16997124254703522)),
    searches=[dict(type='fpcs')],
    calib=dict(images=1, split='train', seed=0),
)

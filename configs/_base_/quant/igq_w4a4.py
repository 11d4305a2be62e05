# IGQ-ViT W4A4 (CVPR'24): instance-aware groups on every Linear input and on
# softmax rows, group counts allocated per layer under the BOP budget of an
# average of 8 groups; weights 4-bit symmetric per output channel.
_bits = 4
_w = dict(type='mmvq.UniformQuantizer', bits=_bits, symmetric=True, granularity='channel', ch_axis=0)
quant = dict(
    name=f'IGQ-ViT W{_bits}A{_bits} (G=8 average, allocated)',
    scope='backbone',
    roles=dict(
        weight=_w,
        act=dict(type='mmvq.UniformQuantizer', bits=_bits),
        linear_input=dict(type='mmvq.IGQQuantizer', bits=_bits, num_groups=8),
        attn_probs=dict(type='mmvq.IGQQuantizer', bits=_bits, num_groups=8, unit='row'),
        patch_embed_input=dict(type='mmvq.UniformQuantizer', bits=8)),
    searches=[dict(type='igq_allocation', candidates=(4, 8, 12, 16), budget_groups=8)],
    calib=dict(images=1, split='train', seed=0),
)

# FQ-ViT W8A8 with 4-bit Log-Int-Softmax attention (FQ-ViT Table 1/4 "8/8/4"):
# weights int8 symmetric per channel (min-max); activations uint8 per tensor
# (min-max); LayerNorm inputs with Power-of-Two Factors (K=3) and integer
# LayerNorm whose uint8 output feeds qkv/fc1/reduction; logits uint8 then
# integer softmax + 4-bit log2 quantization; attn @ V on 2^-k values.
_w = dict(type='mmvq.UniformQuantizer', bits=8, symmetric=True, granularity='channel', ch_axis=0)
_a = dict(type='mmvq.UniformQuantizer', bits=8)
quant = dict(
    name='FQ-ViT W8A8/Attn4 (PTF + LIS, integer LayerNorm)',
    scope='backbone',
    integer_layernorm=True,
    roles=dict(
        weight=_w, act=_a,
        ln_input=dict(type='mmvq.PTFQuantizer', bits=8),
        ln_output=_a,
        qkv_input=None, fc1_input=None, reduction_input=None,   # = LayerNorm output
        attn_logits=_a,
        softmax=dict(type='mmvq.LogIntSoftmax', bits=4),
        attn_probs=None),                                       # LIS output is already 4-bit
    calib=dict(images=1, split='train', seed=0),
)

"""LayerNorm scale reparameterization of post-LayerNorm Linear inputs.

RepQ-ViT (Li et al., ICCV'23, Sec. 3.2) and AdaLog's pipeline (GoatWu/AdaLog
``quant_layers/linear.py::AsymmetricallyChannelWiseBatchingQuantLinear``,
``reparam_step1`` / ``reparam``) quantize the inputs of ``qkv``, ``fc1`` and
PatchMerging's ``reduction`` — LayerNorm outputs with strong inter-channel
variation — per channel first, then move the per-channel scales into the
LayerNorm's affine and the Linear's weights so that one per-tensor quantizer
remains. With per-channel asymmetric parameters ``(s_c, z_c)`` of the input:

* target ``s = mean(s_c)``, ``z = round(mean(z_c))``;
* ``r_c = s_c / s`` and ``b_c = -z_c s_c / r_c + z s`` (channel minimum mapped
  onto the target's minimum);
* LayerNorm: ``gamma <- gamma / r``, ``beta <- beta / r - b``, so its output
  becomes ``x' = x / r - b``;
* Linear: ``W <- W diag(r)``, ``bias <- bias + W' b`` (``W'`` the scaled
  weights), so ``W' x' + bias' = W x + bias``: the float model is unchanged
  (up to float rounding; tested).

The per-channel parameters come from a percentile grid (0.9..1.0 of each
side of every channel, 16 x 8 candidates) scored by each channel's own
quantization error, as the reference's ``_search_best_a_scale_self`` (whose
candidate set is a scale/zero-point grid over the same percentile span). The
weight quantizer is re-fitted to the scaled weights, and the cached inputs
the later searches see are mapped to ``x'``. A Linear without bias (mmcv's
PatchMerging ``reduction``) gets one, as in the reference; quantized
checkpoints carry it and :func:`mmvq.checkpoint.load_quantized` re-creates it.

Deliberate difference: a Swin ``qkv`` behind a (shifted) window attention
is not reparameterized by default — the window partition pads the LayerNorm
output with zeros when the feature map is not a multiple of the window
(1333x800 detection inputs), and a padded zero is not ``0 / r - b``, so the
float model would change; ``include_padded=True`` does it anyway (exact for
classifiers whose maps are multiples of the window).
"""
import torch
import torch.nn as nn

from ..modules.linear import QuantLinear
from ..quantizers.uniform import UniformQuantizer, affine_params, fake_quant_affine

# (LayerNorm attribute, Linear path) of the blocks mmvq adapts: mmpretrain's
# ViT TransformerEncoderLayer, mmdet/mmpretrain SwinBlock, PatchMerging
PAIRS = (('ln1', 'attn.qkv'), ('ln2', 'ffn.layers.0.0'), ('norm1', 'attn.w_msa.qkv'),
         ('norm2', 'ffn.layers.0.0'), ('norm', 'reduction'))
PADDED = ('attn.w_msa.qkv', )


def _get(module, path):
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _active(q):
    return q is not None and getattr(q, 'enabled', False) and not isinstance(q, nn.Identity)


def ln_linear_pairs(model, include_padded=False):
    """``(ln_name, ln, linear_name, linear)`` where a LayerNorm's output is the
    input of exactly that quantized Linear, its quantizer per-tensor uniform,
    and the LayerNorm itself has no active output quantizer."""
    seen = set()              # mmpretrain's ViT layer aliases norm1/norm2 to ln1/ln2
    for name, block in model.named_modules():
        for ln_attr, lin_path in PAIRS:
            ln, lin = _get(block, ln_attr), _get(block, lin_path)
            if not isinstance(ln, nn.LayerNorm) or not isinstance(lin, QuantLinear) \
                    or id(lin) in seen:
                continue
            seen.add(id(lin))
            if lin_path in PADDED and not include_padded:
                continue
            iq = lin.input_quantizer
            if not (isinstance(iq, UniformQuantizer) and iq.enabled and iq.ch_axis is None
                    and not iq.symmetric):
                continue
            if not ln.elementwise_affine:
                continue
            if _active(getattr(ln, 'output_quantizer', None)):
                continue
            prefix = f'{name}.' if name else ''
            yield f'{prefix}{ln_attr}', ln, f'{prefix}{lin_path}', lin


def per_channel_bounds(x, bits, n_lo=16, n_hi=8, chunk_elems=1 << 24):
    """Per-channel ``(low, high)`` with the least own quantization error.

    Args:
        x (Tensor): ``(R, C)`` inputs.
        bits (int): bit width of the (asymmetric) quantizer.

    Returns:
        tuple[Tensor, Tensor]: ``(C,)`` lows and highs.
    """
    qmin, qmax = 0, 2 ** bits - 1
    ps = torch.linspace(0.9, 1.0, max(n_lo, n_hi), device=x.device, dtype=x.dtype)
    his = torch.quantile(x, ps[-n_hi:], dim=0)                    # (n_hi, C)
    los = torch.quantile(x, 1 - ps[-n_lo:], dim=0)                # (n_lo, C)
    lo = los[:, None, :].expand(n_lo, n_hi, -1).reshape(-1, x.shape[1])
    hi = his[None, :, :].expand(n_lo, n_hi, -1).reshape(-1, x.shape[1])
    scale, zp = affine_params(lo, hi, bits, False)                # (K, C)
    step = max(1, chunk_elems // max(1, x.numel()))
    errs = []
    for i in range(0, len(lo), step):
        s, z = scale[i:i + step, None, :], zp[i:i + step, None, :]
        errs.append((fake_quant_affine(x[None], s, z, qmin, qmax) - x[None]).pow(2).mean(dim=1))
    best = torch.cat(errs).argmin(dim=0)                          # (C,)
    idx = torch.arange(x.shape[1], device=x.device)
    return lo[best, idx], hi[best, idx]


@torch.no_grad()
def reparameterize(ln, linear, x):
    """Fold per-channel input scales of ``linear`` into ``ln`` (in place).

    Args:
        ln (nn.LayerNorm): the LayerNorm whose output ``linear`` reads.
        linear (QuantLinear): with a per-tensor asymmetric input quantizer.
        x (Tensor): ``(R, C)`` calibration inputs of ``linear`` (float model).

    Returns:
        tuple[Tensor, Tensor]: ``(r, b)``; the new inputs are ``x / r - b``.
    """
    iq = linear.input_quantizer
    lo, hi = per_channel_bounds(x, iq.bits)
    s_c, z_c = affine_params(lo, hi, iq.bits, False)
    s = s_c.mean()
    z = z_c.mean().round()
    r = s_c / s
    b = (-z_c * s_c) / r + z * s
    ln.weight.div_(r)
    ln.bias.div_(r).sub_(b)
    linear.weight.mul_(r[None, :])
    if linear.bias is None:        # e.g. PatchMerging's reduction: the fold needs one
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device,
                                               dtype=linear.weight.dtype))
    linear.bias.add_(linear.weight @ b)
    iq.set_params(s, z)
    wq = linear.weight_quantizer
    if _active(wq) and isinstance(wq, UniformQuantizer):
        wq.reset_observer()
        wq.observe(linear.weight)
        wq.calibrate()
    return r, b

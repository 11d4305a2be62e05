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

The per-channel parameters are the reference's: its (scale, zero point) grid
over each channel's 0.9..1.0 percentile span and FPCS on each channel's own
quantization error (``activation_fpcs`` with ``_search_best_a_scale_self``;
:mod:`mmvq.calibration.grid`). The
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
from .grid import row_fpcs, row_grid, self_losses

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
            if not (getattr(iq, 'free_affine', False) and iq.enabled and iq.ch_axis is None
                    and not iq.symmetric):
                continue
            if not ln.elementwise_affine:
                continue
            if _active(getattr(ln, 'output_quantizer', None)):
                continue
            prefix = f'{name}.' if name else ''
            yield f'{prefix}{ln_attr}', ln, f'{prefix}{lin_path}', lin


def per_channel_params(x, bits, eq_n=128, width=16, steps=6):
    """Per-channel asymmetric ``(scale, zero point)`` of ``x`` (``(R, C)``), each
    channel's own quantization error minimised by AdaLog's grid and FPCS
    (``min(16, 2^b)`` zero points; :mod:`mmvq.calibration.grid`)."""
    t = x.t().contiguous()
    scales, zps, delta = row_grid(t, bits, min(16, 2 ** bits), eq_n)
    return row_fpcs(scales, zps, delta, self_losses(t, bits), eq_n, width, steps)


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
    s_c, z_c = per_channel_params(x, iq.bits)
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
    if _active(wq) and wq.quantizes_weights:
        wq.reset_observer()
        wq.observe(linear.weight)
        wq.calibrate()
    return r, b


def fold_adalog_shifts(model):
    """Fold every shifted AdaLog input quantizer into its Linear's bias
    (AdaLog's bias reparameterization of the post-GELU shift)."""
    for module in model.modules():
        q = getattr(module, 'input_quantizer', None)
        if (isinstance(module, nn.Linear) and getattr(q, 'shifted', False)
                and q.enabled and q.is_calibrated()):
            q.fold_shift_into(module)

"""The quantizers with no standard integer kernel, written in ONNX-exportable ops.

Integer LayerNorm, Log-Int-Softmax, AdaLog and IGQ's per-instance groups have
no ``QuantizeLinear``-style operator. Each function here computes what mmvq's
own implementation computes, with only operations the ONNX exporter maps to
standard ONNX ops (``Round``, ``Floor``, ``Log``, ``Pow``, ``ReduceSum``,
``ArgMin``, ``Gather``, ``Where`` ...) — no bit casts, in-place ops or
``frexp`` — so the exported graph runs in any ONNX runtime:

* :func:`int_layer_norm_graph` and :func:`lis_softmax_graph` follow
  :func:`mmvq.quantizers.ptf.int_layer_norm` and
  :func:`mmvq.quantizers.lis.lis_softmax` step for step in float64 (LIS in
  int64 where float64 would not be exact, as mmvq), and give the same codes
  bit for bit (tested against them in PyTorch and onnxruntime). The one
  change of means: a float's exponent, which mmvq reads from its IEEE bits,
  is ``floor(log(a) / ln 2)`` corrected by one where ``2^e`` shows it off
  (:func:`floor_log2`, exact for every positive float64).
* :func:`adalog_graph` and :func:`igq_graph` are the quantizers'
  ``fake_quant`` as out-of-place ops: equal in PyTorch; in a runtime whose
  ``log`` differs from PyTorch's by an ulp, an AdaLog code can move at an
  exact rounding tie.
"""
import math

import torch

from ..quantizers.lis import LN2, POLY, float64_exact
from ..quantizers.exact import integer_dtype


def pow2_table(x, lo, hi):
    """Exact ``2^x`` for integer-valued float64 ``x`` in ``[lo, hi]``: one
    ``Gather`` from a table of ``hi - lo + 1`` powers (no per-element ``Pow``)."""
    exps = torch.arange(lo, hi + 1, dtype=torch.float64, device=x.device)
    return torch.pow(2.0, exps)[(x - lo).long()]


def floor_log2(a, lo=-1074, hi=1023):
    """``floor(log2 a)`` of positive float64 ``a``: exact in ``[lo - 1, hi]``,
    ``lo - 1`` below and ``hi`` above (``+inf`` gives ``hi``).

    ``log(a) / ln 2`` is within a few ulps of the true value, so its floor is
    off by at most one next to a power of two; comparing with the exact
    ``2^e`` corrects it. Callers that need only a range pass a narrow
    ``[lo, hi]`` (the table of powers gathered from is that long).
    """
    e = torch.clamp(torch.floor(torch.log(a) / math.log(2.0)), lo, hi - 1)
    p = pow2_table(e, lo, hi)
    e = torch.where(p > a, e - 1, e)
    return torch.where(p * 2 <= a, e + 1, e)


def trunc(x):
    """Round toward zero (``Sign * Floor(Abs)``; ONNX has no ``Trunc`` before opset 22)."""
    return torch.sign(x) * torch.floor(torch.abs(x))


def int_layer_norm_graph(codes, zero_point, alpha, in_scale, weight, bias, out_scale,
                         out_zero_point, out_qmin, out_qmax, m_bits=8):
    """FQ-ViT's integer LayerNorm on PTF codes, in exportable float64 ops.

    The arguments are those of :func:`mmvq.quantizers.ptf.int_layer_norm`;
    returns the dequantized output ``(y_q - z_out) s_out`` (float32), bit for
    bit that function's.
    """
    f64 = torch.float64
    s, s_out = in_scale.reshape(()).to(f64), out_scale.reshape(()).to(f64)
    x = (codes.to(f64) - zero_point.reshape(()).to(f64)) * torch.pow(2.0, alpha.to(f64))
    c = x.shape[-1]
    sum1 = x.sum(dim=-1, keepdim=True)
    sum2 = (x * x).sum(dim=-1, keepdim=True)
    std = (s / c) * torch.clamp(torch.sqrt(c * sum2 - sum1 * sum1), min=1e-12)
    w = weight.to(f64)
    a = (s / std) * (w / s_out)
    mag = torch.abs(a)
    # n = clamp(m_bits - 1 - floor(log2 |a|), 0, 31): exponents outside
    # [m_bits - 32, m_bits - 1] clamp n the same way, so that is the range needed
    exp = floor_log2(torch.where(mag > 0, mag, 1.0), m_bits - 33, m_bits) + 1
    n = torch.where(mag > 0, torch.clamp(m_bits - exp, 0, 31), float(m_bits))
    p = pow2_table(n, 0, 31)
    m = torch.clamp(trunc(a * p), -(2 ** m_bits - 1), 2 ** m_bits - 1)
    mean = sum1 / c * s
    b = torch.round((bias.to(f64) - (mean / std) * w) / s_out * p)
    y = torch.floor((m * x + b) * pow2_table(-n, -31, 0) + 0.5)
    zp = out_zero_point.reshape(()).to(f64)
    y = torch.minimum(torch.maximum(y, out_qmin - zp), out_qmax - zp)
    return (y * s_out).float()


def _lis_table(bits, like):
    levels = 2 ** bits
    exps = torch.arange(levels + 1, dtype=like.dtype, device=like.device)
    return torch.where(exps < levels, torch.pow(2.0, -exps), 0.0)


def lis_softmax_graph(logits, scale, bits=4, n=30, mask=None, dtype=None):
    """Log-Int-Softmax in exportable ops: :func:`mmvq.quantizers.lis.lis_softmax`.

    Runs the float64 form where mmvq does (:func:`float64_exact` of the logit
    scale and row length, on the device's representation), else the int64
    definition; both give mmvq's codes.

    Args:
        logits (Tensor): the fake-quantized logits (multiples of ``scale``).
        scale (float): their scale.
        bits (int): log2 code bits.
        n (int): i-exp range limit.
        mask (Tensor | None): additive mask, added on the integer grid.
        dtype (torch.dtype | None): as :func:`mmvq.quantizers.lis.log_int_softmax`.
    """
    a, b, c = POLY
    x0 = math.floor(-LN2 / scale)
    b_int = math.floor(b / a / scale)
    c_int = math.floor(c / a / scale ** 2)
    levels = 2 ** bits
    use_f64 = ((dtype or integer_dtype(logits.device)) == torch.float64
               and float64_exact(scale, n, logits.shape[-1]))
    x = torch.round(logits.double() / scale)
    if mask is not None:
        x = x + torch.round(mask.double() / scale)
    x = x - x.amax(dim=-1, keepdim=True)
    x = torch.clamp(x, min=n * x0)
    if use_f64:
        q = torch.floor(x / x0)
        r = x - q * x0
        e = ((r + b_int) * r + c_int) * pow2_table(n - q, 0, n)
        total = e.sum(dim=-1, keepdim=True)
        v = torch.floor((e + total * 2.0) / e * 0.5)
        if levels > 40:
            v = torch.clamp(v, max=(1 << 40) - 1)
        # v >= 1: k >= 0; every k >= levels reads the table's exact 0 (e == 0: v = +inf)
        k = floor_log2(v / 1.5, -1, levels) + 1
        idx = torch.clamp(k, 0, levels)
    else:
        xi = x.long()
        q = torch.div(xi, x0, rounding_mode='trunc')  # x <= 0, x0 < 0: trunc == floor
        r = xi - q * x0
        shift = pow2_table((n - q).double(), 0, n).long()
        e = torch.clamp((r * (r + b_int) + c_int) * shift, min=0)
        total = e.sum(dim=-1, keepdim=True)
        zero = e == 0
        safe = torch.where(zero, 1, e)
        recip = torch.div(total * 2 + safe, safe * 2, rounding_mode='trunc')
        recip = torch.clamp(recip, min=1, max=(1 << 40) - 1)
        k = floor_log2(recip.double() / 1.5, -1, levels) + 1
        idx = torch.where(zero | (k >= levels), float(levels), torch.clamp(k, 0, levels))
    return _lis_table(bits, logits)[idx.long()].to(logits.dtype)


def adalog_graph(quantizer, x):
    """:meth:`AdaLogQuantizer.fake_quant` in exportable ops: log2 and a rounding
    give a code within one of the exact one, one comparison with the exact
    threshold on each side makes it exact (:func:`mmvq.quantizers.adalog.adalog_thresholds`),
    then one gather from the table whose entries from ``2^b`` on are the exact 0."""
    levels = 2 ** quantizer.bits
    t = (x + quantizer.shift.to(x.dtype)) / quantizer.scale.to(x.dtype)
    t = torch.clamp(t, min=1e-15, max=1.0)
    codes = torch.round(-torch.log2(t) * quantizer.r / quantizer.q.to(x.dtype))
    idx = torch.clamp(codes, 0, levels).long()
    thr, lut = quantizer.fused_tables()
    thr = thr.to(x.dtype)
    idx = idx + (t <= thr[idx + 1]).long() - (t > thr[idx]).long()
    out = lut.to(x.dtype)[idx]
    if quantizer.shifted and not quantizer.is_folded():
        out = out - quantizer.shift.to(x.dtype)
    return out


def igq_graph(quantizer, x):
    """:meth:`IGQQuantizer.fake_quant` in exportable ops: every instance's unit
    ranges, the nearest calibrated group (``ArgMin``), that group's scale and
    zero point (``Gather``), then the affine fake quantization."""
    shape = x.shape
    if quantizer.unit == 'row':
        view, reduce_dim = x.reshape(shape[0], -1, shape[-1]), 2     # (I, U, R)
    elif x.dim() == 4:
        view, reduce_dim = x.reshape(shape[0], shape[1], -1), 2      # (B, C, HW)
    else:
        view, reduce_dim = x.reshape(shape[0], -1, shape[-1]), 1     # (B, T, C)
    mins, maxs = view.amin(dim=reduce_dim), view.amax(dim=reduce_dim)         # (I, U)
    centres = quantizer.centres.to(x.dtype)
    d = (mins.unsqueeze(-1) - centres[:, 0]) ** 2 + (maxs.unsqueeze(-1) - centres[:, 1]) ** 2
    g = d.argmin(dim=-1)                                                       # (I, U)
    s = quantizer.scale.to(x.dtype)[g].unsqueeze(reduce_dim)
    z = quantizer.zero_point.to(x.dtype)[g].unsqueeze(reduce_dim)
    q = torch.round(view / s)
    q = torch.minimum(torch.maximum(q, quantizer.qmin - z), quantizer.qmax - z)
    return (q * s).reshape(shape)


__all__ = ['floor_log2', 'pow2_table', 'int_layer_norm_graph', 'lis_softmax_graph', 'adalog_graph', 'igq_graph']

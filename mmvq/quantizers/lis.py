"""FQ-ViT Log-Int-Softmax (LIS).

Follows FQ-ViT Sec. 3.3 (Eq. 9-13) and the reference ``QIntSoftmax``:

1. The attention logits are uniformly quantized (scale ``s``) upstream, so
   ``x_int = round(x / s)`` is an integer; Swin's shifted-window mask
   (0 / -100) is added before the softmax and is rounded to the same grid.
2. Integer exponential (I-BERT i-exp): ``x_int -= rowmax``;
   ``x0 = floor(-ln2 / s)``; ``x_int = max(x_int, n * x0)``;
   ``q = floor(x_int / x0)``, ``r = x_int - q * x0``; second-order polynomial
   ``z = r (r + floor(b / (a s))) + floor(c / (a s^2))`` with
   ``(a, b, c) = (0.35815147, 0.96963238, 1)``; ``exp_int = z << (n - q)``.
   Defined in int64, ``n = 30`` as the reference; computed in float64
   where that is exact (checked per call from the logit scale and the row
   sums), bit for bit the same codes, and in int64 otherwise
   (:func:`_log_codes_float64`).
3. Log2 quantization without division: ``v = round(sum / exp_int)`` is the
   reciprocal probability; ``k = log_round(v)`` (floor(log2 v), +1 when
   ``v - 2^f >= 2^(f-1)``); codes ``k >= 2^b`` become exact zeros; otherwise
   ``p_hat = 2^-min(k, 2^b - 1)``.
4. attn @ V by bit shifts: ``out = sum_j V_int[j] << (K - k_ij)`` with
   ``K = 2^b - 1`` then one scale ``s_v 2^-K`` — see :func:`lis_attn_v_shift`.
   The reference computes this product in float; the shift form is the
   paper's, and equals the float product exactly on integer V.

Overflow (FQ-ViT issue #21): with n = 30 the row sum of ``exp_int`` reaches
about ``N * 2^30 / (a s^2)``; int64 holds it for every realistic logit scale
(``s >= 1e-4`` and ``N <= 4096`` stay below 2^62), but a 32-bit kernel would
need a smaller n. Rows of the quantized probabilities do not sum to 1 (the
log rounding and the zeroed tail codes); like the reference we do not
renormalise.
"""
import math

import torch

from ..registry import QUANTIZERS
from . import fused as _fused
from .base import BaseQuantizer, check_bits
from .base import host_value
from .exact import chunk_elems as default_chunk
from .exact import integer_dtype
from .ptf import pow2_biased

POLY = (0.35815147, 0.96963238, 1.0)
LN2 = 0.6931


def int_exp(x_int, scale, n=30):
    """I-BERT integer exponential of non-positive integer logits.

    Args:
        x_int (Tensor): int64, ``<= 0``.
        scale (float): logit scale ``s``.
        n (int): range reduction limit (reference: 30).

    Returns:
        Tensor: int64 ``exp_int`` with ``exp(x_int * s) ~ exp_int * a s^2 / 2^n``.
    """
    a, b, c = POLY
    x0 = math.floor(-LN2 / scale)
    b_int = math.floor(b / a / scale)
    c_int = math.floor(c / a / scale ** 2)
    x_int = torch.clamp(x_int, min=n * x0)
    q = torch.div(x_int, x0, rounding_mode='floor')
    r = x_int - x0 * q
    z = r * (r + b_int) + c_int
    return torch.clamp(z << (n - q), min=0)


def log_round(v, check=True):
    """``floor(log2 v)``, plus one when ``v - 2^f >= 2^(f-1)``, for int64 ``v >= 1``.

    Equivalently ``floor(log2(v / 1.5)) + 1``: the rounding threshold
    ``1.5 * 2^f`` divided by 1.5 is an exact power of two, whose float64 log2
    is exact, and every other integer below 2^40 is far enough from a
    threshold for float64 — so one log2 per element, exactly. ``check=False``
    skips the range check (a device sync) for callers that clamped ``v``.
    """
    if check and bool((v >= (1 << 40)).any()):
        raise ValueError('log_round is exact for v < 2^40; clamp larger values first')
    return torch.floor(torch.log2(v.double() / 1.5)).to(torch.int64) + 1


def _log_codes_int64(logits, scale, bits, n, mask):
    """LIS codes computed in int64 (the definition; works for every scale)."""
    x_int = torch.round(logits.double() / scale).to(torch.int64)
    if mask is not None:
        x_int = x_int + torch.round(mask.double() / scale).to(torch.int64)
    x_int = x_int - x_int.amax(dim=-1, keepdim=True)
    exp_int = int_exp(x_int, scale, n)
    total = exp_int.sum(dim=-1, keepdim=True)
    zero = exp_int == 0
    safe = torch.where(zero, torch.ones_like(exp_int), exp_int)
    recip = torch.div(2 * total + safe, 2 * safe, rounding_mode='floor')   # round(total / exp)
    recip = torch.clamp(recip, min=1, max=(1 << 40) - 1)     # codes >= 2^b are zeroed anyway
    k = log_round(recip, check=False)
    zero = zero | (k >= 2 ** bits)
    return torch.clamp(k, 0, 2 ** bits - 1), zero


def float64_exact(scale, n, row_len):
    """Whether :func:`_log_codes_float64` is exact for this logit scale and row length.

    Decided on the host from the scale, ``n`` and the row length only (no
    look at the data, so no device synchronisation): ``r = x - q x0`` lies in
    ``(x0, 0]`` and ``z(r) = r (r + b') + c'`` is convex, so every
    ``exp_int = z 2^(n - q) <= z_max 2^n`` with ``z_max`` the larger of
    ``z(0) = c'`` and ``z(x0 + 1)``; a row of ``row_len`` of them sums to at
    most ``row_len z_max 2^n``, and ``5`` times that below 2^53 is the
    exactness condition below (also the int64 path's no-overflow condition
    with room to spare).
    """
    a, b, c = POLY
    x0 = math.floor(-LN2 / scale)
    b_int = math.floor(b / a / scale)
    c_int = math.floor(c / a / scale ** 2)
    if c_int < 1 or -x0 >= 1 << 20:
        return False
    r = x0 + 1
    z_max = max(c_int, r * (r + b_int) + c_int)
    return 5 * row_len * z_max * 2 ** n < 2 ** 53


def _log_codes_float64(logits, scale, bits, n, mask):
    """The same codes in float64 (callers check :func:`float64_exact` first).

    Every quantity below is an integer held exactly in float64, so the
    results equal :func:`_log_codes_int64` bit for bit — ~2x faster on CPU,
    where int64 division and ``log2`` are slow:

    * ``q = floor(x / x0)``: for ``|x| <= n |x0|`` the correctly rounded
      quotient is within ``30 * 2^-53`` of the exact one, closer than any
      fraction ``1/|x0|``, so its floor is exact while ``|x0| < 2^20``.
    * ``z = r (r + b') + c'`` stays below 2^45 then; ``z << (n - q)`` is a
      multiplication by a power of two (exact at any size; where the int64
      shift would overflow, the row sum check below sends the call back to
      the int64 path).
    * The row sums of non-negative integers are exact while they stay below
      2^53; the bound ``5 * total < 2^53`` (:func:`float64_exact`) also makes
      ``floor((2 total + e) / (2 e))`` exact: numerator plus denominator
      ``2 total + 3 e <= 5 total`` keeps the rounded quotient off the next
      integer.
    * ``log_round(v) = floor(log2(v / 1.5)) + 1`` is the biased exponent of
      ``v / 1.5`` (a positive normal float) minus 1022, read from its bits:
      no ``log2`` or ``frexp``. The rounded ``v / 1.5`` has the exact
      quotient's exponent, because an integer ``v < 1.5 * 2^j`` gives
      ``v / 1.5 <= 2^j - 2/3``, far from ``2^j`` (see :func:`log_round`).

    Returns:
        Tensor: unclamped codes ``k`` (int64); ``k >= 2^bits`` is zero.
    """
    a, b, c = POLY
    x0 = math.floor(-LN2 / scale)
    c_int = math.floor(c / a / scale ** 2)
    x = torch.round(logits.double() / scale)
    if mask is not None:
        x = x + torch.round(mask.double() / scale)
    x = x - x.amax(dim=-1, keepdim=True)
    x.clamp_(min=n * x0)
    q = torch.div(x, x0).floor_()
    r = torch.add(x, q, alpha=-x0)                        # x - q x0, in [0, |x0|)
    z = r.add(math.floor(b / a / scale)).mul_(r).add_(c_int)
    e = z.mul_(pow2_biased(n + 1023 - q.long()))          # z * 2^(n - q)
    total = e.sum(dim=-1, keepdim=True)
    v = torch.add(e, total, alpha=2.0).div_(e).mul_(0.5).floor_()     # round(total / e)
    if 2 ** bits > 40:
        v.clamp_(max=(1 << 40) - 1)                      # as the int64 path
    # log_round(v) = floor(log2(v / 1.5)) + 1 = biased exponent of v / 1.5 - 1022
    return torch.bitwise_right_shift(v.div_(1.5).view(torch.int64), 52).sub_(1022)


def _chunks(logits, mask, chunk_elems):
    """Slices of ``logits`` (and of ``mask`` where it is not broadcast) along
    the first dimension longer than 1, each of about ``chunk_elems``."""
    dim = next((d for d in range(logits.dim() - 1) if logits.shape[d] > 1), 0)
    inner = math.prod(logits.shape[dim + 1:])
    step = max(1, chunk_elems // max(1, inner))
    size = logits.shape[dim]
    for start in range(0, size, step):
        length = min(step, size - start)
        m = mask
        if mask is not None and mask.dim() == logits.dim() and mask.shape[dim] == size and size > 1:
            m = mask.narrow(dim, start, length)
        yield dim, start, length, logits.narrow(dim, start, length), m


def log_int_softmax(logits, scale, bits=4, n=30, mask=None, dtype=None):
    """Integer softmax followed by log2 quantization.

    Args:
        logits (Tensor): fake-quantized logits (multiples of ``scale``).
        scale (float): their scale.
        bits (int): code bits of the log2 quantizer (FQ-ViT: 4).
        n (int): i-exp range limit.
        mask (Tensor | None): additive mask (0 / negative) broadcastable to
            ``logits``, added on the integer grid.
        dtype (torch.dtype | None): ``torch.float64`` or ``torch.int64``
            representation (:func:`mmvq.quantizers.exact.integer_dtype` of
            the device when ``None``); float64 falls back to int64 where it
            would not be exact. Both give the same codes.

    Returns:
        tuple[Tensor, Tensor]: codes ``k`` (int64, ``2^b - 1`` at most) and a
        bool tensor, ``True`` where the probability is an exact zero.
    """
    if _use_float64(logits, scale, n, dtype):
        k = _log_codes_float64(logits, scale, bits, n, mask)
        return torch.clamp(k, 0, 2 ** bits - 1).long(), k >= 2 ** bits
    return _log_codes_int64(logits, scale, bits, n, mask)


def _use_float64(logits, scale, n, dtype):
    dtype = dtype or integer_dtype(logits.device)
    return dtype == torch.float64 and float64_exact(scale, n, logits.shape[-1])


def lis_softmax(logits, scale, bits=4, n=30, mask=None, dtype=None, chunk_elems=None):
    """``lis_dequantize(*log_int_softmax(...))`` in one gather: ``2^-k``, 0 for k >= 2^b.

    Rows are independent, so the work is done in slices of about
    ``chunk_elems`` logits (default :func:`mmvq.quantizers.exact.chunk_elems`
    of the device) written into one output: the float64/int64 temporaries
    (about ten per element) stay bounded whatever the image size, with the
    same results as one pass.
    """
    levels = 2 ** bits
    table = torch.pow(2.0, -torch.arange(levels + 1, dtype=logits.dtype, device=logits.device))
    table[-1] = 0.0
    use_f64 = _use_float64(logits, scale, n, dtype)
    out = torch.empty_like(logits)
    for dim, start, length, part, m in _chunks(logits, mask, chunk_elems or default_chunk(logits.device)):
        if use_f64:
            k = _log_codes_float64(part, scale, bits, n, m).clamp_(0, levels)
            out.narrow(dim, start, length).copy_(table[k])
        else:
            codes, zero = _log_codes_int64(part, scale, bits, n, m)
            out.narrow(dim, start, length).copy_(table[codes.masked_fill_(zero, levels)])
    return out


def lis_dequantize(codes, zero, dtype=torch.float32):
    """``2^-k`` with exact zeros."""
    out = torch.pow(2.0, -codes.to(dtype))
    return out.masked_fill(zero, 0.0)


def lis_attn_v_shift(codes, zero, v_int, bits=4):
    """attn @ V with integer V and shifts only (FQ-ViT Eq. 13).

    ``sum_j 2^-k_ij V_int[j] = 2^-K sum_j (V_int[j] << (K - k_ij))``, with
    ``K = 2^b - 1``; the integer accumulation is returned with ``K`` so the
    caller applies the single scale ``s_v 2^-K``.

    Args:
        codes (Tensor): int64 ``(..., N, M)``.
        zero (Tensor): bool ``(..., N, M)``.
        v_int (Tensor): int64 ``(..., M, D)`` (V codes minus zero point).
        bits (int): log2 code bits.

    Returns:
        tuple[Tensor, int]: int64 ``(..., N, D)`` accumulator and ``K``.
    """
    k_max = 2 ** bits - 1
    shift = (k_max - codes).masked_fill(zero, 0)
    terms = v_int.unsqueeze(-3) << shift.unsqueeze(-1)           # (..., N, M, D)
    terms = terms.masked_fill(zero.unsqueeze(-1), 0)
    return terms.sum(dim=-2), k_max


def lis_fused(lis, iq, logits, mask=None):
    """The logits' fake quantization (uniform per-tensor ``iq``) and LIS in
    one fused pass per row (:func:`mmvq.quantizers.fused.lis_softmax`), bit
    for bit ``lis.softmax(iq(logits), iq.scale, mask)``; ``None`` where the
    float64 representation would not be exact (the caller runs the eager
    int64 path) or the tensors do not fit the kernel."""
    scale = host_value(lis, 'logit_scale', iq.scale, float)
    n_row = logits.shape[-1]
    if (iq.scale.dtype != torch.float32 or iq.zero_point.dtype != torch.float32
            or not float64_exact(scale, lis.n, n_row)
            or (mask is not None and (mask.dim() > logits.dim() or mask.device != logits.device))):
        return None
    a, b, c = POLY
    consts = (math.floor(-LN2 / scale), math.floor(b / a / scale), math.floor(c / a / scale ** 2))
    table = lis.pow2_table
    if table.device != logits.device:
        return None
    offsets = None
    if mask is not None:
        m = mask.float()
        if m.shape[-1] != n_row or m.stride(-1) != 1:
            m = m.expand(logits.shape).contiguous()
        key = (tuple(logits.shape), tuple(m.shape), tuple(m.stride()))
        cache = lis.__dict__.setdefault('_mmvq_mask_offsets', {})
        offsets = cache.get(key)
        if offsets is None:
            if len(cache) > 32:
                cache.clear()
            offsets = cache[key] = _fused.mask_offsets(m, logits.shape)
        mask = m
    return _fused.lis_softmax(logits, iq, scale, lis.bits, lis.n, consts, table, mask, offsets)


@QUANTIZERS.register_module()
class LogIntSoftmax(BaseQuantizer):
    """LIS as a softmax replacement: takes logits and their scale.

    Used by :class:`mmvq.modules.QuantSoftmax` instead of a float softmax;
    it needs no calibration of its own (the logits quantizer provides the
    scale), exactly as the reference bypasses the softmax observer.

    Args:
        bits (int): log2 code bits (FQ-ViT: 4).
        n (int): i-exp range limit (reference: 30).
    """

    kind = 'lis'
    integer_softmax = True

    def __init__(self, bits=4, n=30, enabled=True):
        super().__init__(check_bits(bits), enabled)
        self.n = n
        self.calibrated.fill_(True)
        # 2^-k for every code, 0 at index 2^b (the fused kernel's table for
        # codes past 2^b - 1 at 7-8 bits); follows model.to, not saved
        table = torch.pow(2.0, -torch.arange(2 ** self.bits + 1, dtype=torch.float32))
        table[-1] = 0.0
        self.register_buffer('pow2_table', table, persistent=False)

    def observe(self, x):
        pass

    def calibrate(self):
        pass

    def softmax(self, logits, scale, mask=None):
        """LIS of ``logits`` whose quantizer has ``scale`` (a 1-element tensor;
        read on the host once per change of that tensor, never per call)."""
        return lis_softmax(logits, host_value(self, 'logit_scale', scale, float), self.bits,
                           self.n, mask)

    def fake_quant(self, x):
        raise RuntimeError('LogIntSoftmax quantizes logits, call .softmax(logits, scale)')

    def levels(self):
        return [2.0 ** -k for k in range(2 ** self.bits)]

    def summary(self):
        return dict(kind=self.kind, bits=self.bits, granularity='tensor (log2, int softmax)')

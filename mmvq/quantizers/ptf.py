"""FQ-ViT Power-of-Two Factor (PTF) quantizer and integer LayerNorm.

PTF (FQ-ViT, Sec. 3.2, Eq. 5-6; reference ``models/ptq/observer/ptf.py``):
the LayerNorm input has strong inter-channel variation, so every channel c
gets its own power-of-two factor ``2^alpha_c`` (``alpha_c in {0..K}``, K=3) on
one layer-wise scale ``s`` and one zero point ``z``:

    x_q[c] = clamp(round(x[c] / (s 2^alpha_c)) + z, 0, 2^b - 1)

Calibration (as the reference): from the layer-wise range [min, max] over all
channels, ``s_K = (max - min) / (2^b - 1)`` (the scale of the largest factor),
``z = clamp(-round(min / s_K))``, ``s = s_K / 2^K``; then per channel the
``alpha`` in ``0..K`` minimising the L2 quantization error. Deliberate
differences: the reference searches on the last calibration batch only; we
search on a bounded sample of all calibration batches, and the range is the
running min/max over all of them. ``tied_channels=k`` makes k consecutive
channels share one factor: mmdet's ``PatchMerging`` builds its 4C LayerNorm
input with ``nn.Unfold`` whose channel order is ``c * 4 + offset``, so k=4
gives FQ-ViT's ``in_scale_expand=4`` (one factor per original channel).

Integer LayerNorm (FQ-ViT Eq. 7-8; reference ``QIntLayerNorm`` mode ``int``):
with the factors, ``x_q[c] 2^alpha_c`` (a left shift of the code minus the
zero point) is an integer on the common scale ``s``. Mean and variance are
integer sums (``sum x``, ``sum x^2`` in int64, exact). Per row, the affine
``gamma / (std * s_out)`` is encoded as a dyadic ``sign * M / 2^N`` with an
8-bit ``M`` and the shift ``B`` as an integer, and the output code is
``round((sign M x + B) / 2^N)`` (plus the output zero point, clamped).
As in the reference, the square root and the per-row dyadic coefficients are
computed in float (one per row, not per element) and LayerNorm's ``eps`` is
dropped; everything applied elementwise to activations is integer.
"""
import torch

from ..registry import QUANTIZERS
from . import fused as _fused
from .base import BaseQuantizer
from .observers import MinMaxObserver, SampleStore
from .uniform import fake_quant_affine


@QUANTIZERS.register_module()
class PTFQuantizer(BaseQuantizer):
    """Layer-wise scale with per-channel power-of-two factors (last axis).

    Args:
        bits (int): bit width (unsigned, asymmetric).
        max_factor (int): K, factors are ``2^0 .. 2^K`` (FQ-ViT: 3).
        tied_channels (int): consecutive channels sharing one factor.
        enabled (bool): ``False`` makes it the identity.
    """

    kind = 'ptf'
    power_of_two_factors = True

    def __init__(self, bits=8, max_factor=3, tied_channels=1, enabled=True):
        super().__init__(bits, enabled)
        self.max_factor = max_factor
        self.tied_channels = tied_channels
        self.qmin, self.qmax = 0, 2 ** bits - 1
        self.register_buffer('scale', torch.ones(1))        # base scale s
        self.register_buffer('zero_point', torch.zeros(1))
        self.register_buffer('alpha', torch.zeros(1, dtype=torch.long))
        self.reset_observer()

    def reset_observer(self):
        self.observer = MinMaxObserver(ch_axis=-1)
        self.store = SampleStore(ch_axis=-1, max_columns=8192)

    def observe(self, x):
        self.observer.update(x)
        self.store.update(x)

    def calibrate(self):
        if self.observer.empty:
            raise RuntimeError('PTFQuantizer: no calibration data was observed')
        dev = self.scale.device
        xmin = torch.clamp(self.observer.min.min().to(dev), max=0.0)
        xmax = torch.clamp(self.observer.max.max().to(dev), min=0.0)
        scale_k = torch.clamp((xmax - xmin) / (self.qmax - self.qmin), min=1e-8)
        zp = torch.clamp(self.qmin - torch.round(xmin / scale_k), self.qmin, self.qmax)
        base = scale_k / 2 ** self.max_factor
        data = self.store.data(dev)                                   # (C, N)
        c = data.shape[0]
        if c % self.tied_channels:
            raise ValueError(f'tied_channels={self.tied_channels} does not divide {c} channels')
        factors = 2.0 ** torch.arange(self.max_factor + 1, dtype=torch.float32, device=dev)
        scales = (base * factors)[:, None, None]                       # (K+1, 1, 1)
        err = (fake_quant_affine(data[None], scales, zp, self.qmin, self.qmax)
               - data[None]).pow(2).sum(dim=2)                         # (K+1, C)
        err = err.reshape(len(factors), c // self.tied_channels, self.tied_channels).sum(2)
        alpha = err.argmin(dim=0).repeat_interleave(self.tied_channels)
        self._set_buffer('scale', base.reshape(1))
        self._set_buffer('zero_point', zp.reshape(1))
        self._set_buffer('alpha', alpha)
        self.calibrated.fill_(True)

    def channel_scale(self):
        """Per-channel scales ``s * 2^alpha_c`` (C,)."""
        return self.scale * (2.0 ** self.alpha.float())

    def quantize(self, x):
        return torch.clamp(torch.round(x / self.channel_scale()) + self.zero_point,
                           self.qmin, self.qmax)

    def dequantize(self, q):
        return (q - self.zero_point) * self.channel_scale()

    inplace_ok = True

    def fake_quant(self, x, inplace=False):
        if _fused.use_fused(self, x):
            y = _fused.fake_quant_planned(
                self, x, (self.scale, self.alpha, self.zero_point),
                lambda: (self.channel_scale(), self.zero_point), self.qmin, self.qmax, inplace)
            if y is not None:
                return y
        return fake_quant_affine(x, self.channel_scale(), self.zero_point, self.qmin, self.qmax)

    def summary(self):
        hist = torch.bincount(self.alpha.reshape(-1), minlength=self.max_factor + 1).tolist()
        return dict(kind=self.kind, bits=self.bits,
                    granularity=f'tensor+pow2(channel) K={self.max_factor}',
                    alpha_hist=hist if self.is_calibrated() else '-')


def pow2_biased(e):
    """Exact ``2.0 ** (e - 1023)`` (float64) for an int64 tensor ``e`` in [1, 2046].

    The IEEE-754 double with biased exponent ``e`` and a zero mantissa: one
    shift and a bit cast. Callers that already hold ``n + 1023`` (integer
    LayerNorm, LIS) skip :func:`pow2`'s add.
    """
    return torch.bitwise_left_shift(e, 52).view(torch.float64)


def pow2(n):
    """Exact ``2.0 ** n`` (float64) for an integer tensor ``n`` in [-1022, 1023].

    Built from the IEEE-754 bits (:func:`pow2_biased` of ``n + 1023``):
    ``torch.ldexp`` computes ``x * pow(2, n)`` with a float power per element,
    several times slower on CPU; multiplying by an exact power of two is
    exact, so ``x * pow2(n) == ldexp(x, n)`` bit for bit.
    """
    return pow2_biased(n.long() + 1023)


def dyadic(a, bits=8, max_shift=31):
    """Encode positive ``a`` as ``M / 2^N`` with a ``bits``-bit ``M`` (FQ-ViT get_MN).

    ``N = clamp(bits - 1 - floor(log2 a), 0, max_shift)``,
    ``M = clamp(floor(a 2^N), 0, 2^bits - 1)``; ``floor(log2 a)`` is taken
    exactly from the float exponent (``frexp``) rather than from a rounded
    ``log2``, and ``2^N`` scaling is exact (multiplication by :func:`pow2`).
    This is the definition; :func:`int_layer_norm` computes the same ``M``,
    ``N`` in place from the exponent bits (tested equal against it).
    """
    _, exp = torch.frexp(a)                    # a = mant * 2^exp, mant in [0.5, 1)
    n = torch.clamp(bits - exp, 0, max_shift)  # bits - 1 - (exp - 1)
    m = torch.clamp(torch.floor(a * pow2(n)), 0, 2 ** bits - 1)
    return m, n


def int_layer_norm(codes, zero_point, alpha, in_scale, weight, bias, out_scale,
                   out_zero_point, out_qmin, out_qmax, m_bits=8, return_codes=True,
                   has_zero_weight=None):
    """Integer LayerNorm over the last axis on PTF codes.

    All quantities are integers held exactly in float64 (codes shifted by
    ``alpha`` stay below 2^11, the sums below 2^53), which runs much faster
    on CPU than int64 and gives the same results; rounding of ``v / 2^N`` is
    half-up, ``floor(v / 2^N + 1/2)``. Element-wise work is done in place on
    two buffers, and ``sign(A) M`` is ``trunc(A 2^N)`` (clamped to
    ``±(2^m_bits - 1)``), which equals ``copysign(floor(|A| 2^N), A)``.
    Scales and zero points stay tensors on the data's device (read as
    float64, the exact value of each float32): nothing is read back to the
    host, except ``has_zero_weight`` when the caller does not pass it.

    Args:
        codes (Tensor): PTF integer codes ``x_q`` (any float/int dtype).
        zero_point (Tensor): PTF zero point (1 element).
        alpha (Tensor): per-channel factors (C,), long.
        in_scale (Tensor): PTF base scale ``s`` (1 element).
        weight, bias (Tensor): LayerNorm affine (C,).
        out_scale, out_zero_point (Tensor): uniform output quantizer (1 element each).
        out_qmin, out_qmax (int): output code range.
        m_bits (int): bits of the dyadic multiplier ``M``.
        return_codes (bool): also return the int64 codes (else None).
        has_zero_weight (bool | None): whether ``weight`` has zeros (their
            ``frexp(0)`` exponent is patched); ``None`` checks (a device sync).

    Returns:
        tuple[Tensor | None, Tensor]: integer output codes (int64) and their
        dequantized values ``(y_q - z_out) * s_out`` (float32).
    """
    f64 = torch.float64

    def scalar(t):
        return t.reshape(()).to(f64) if isinstance(t, torch.Tensor) else torch.tensor(
            float(t), dtype=f64, device=codes.device)

    x = codes.to(f64, copy=True).sub_(scalar(zero_point)).mul_(pow2(alpha))
    c = x.shape[-1]
    sum1 = x.sum(dim=-1, keepdim=True)
    sum2 = (x * x).sum(dim=-1, keepdim=True)
    s, s_out = scalar(in_scale), scalar(out_scale)
    std = (s / c) * torch.sqrt(c * sum2 - sum1 * sum1).clamp(min=1e-12)    # float std of x_hat
    w = weight.double()
    a = (s / std) * (w / s_out)                                            # (..., C)
    # dyadic(|a|): n = clamp(m_bits - exp, 0, 31) with exp = frexp(a)'s exponent,
    # read from the IEEE bits (biased exponent - 1022; frexp itself is ~6x
    # slower than an element-wise op), kept as n + 1023 so that 2^n and 2^-n
    # are bit casts. frexp(0) has exponent 0: zero weights are patched.
    pe = (torch.bitwise_right_shift(a.view(torch.int64), 52).bitwise_and_(0x7FF)
          .neg_().add_(m_bits + 2045).clamp_(1023, 1023 + 31))             # n + 1023
    if has_zero_weight is None:
        has_zero_weight = bool((weight == 0).any())
    if has_zero_weight:
        pe.masked_fill_(a == 0, m_bits + 1023)
    p = pow2_biased(pe)                                                    # 2^n
    m = a.mul_(p).trunc_().clamp_(-(2 ** m_bits - 1), 2 ** m_bits - 1)    # sign(a) M
    mean = sum1 / c * s
    b = (mean / std) * w
    b = torch.sub(bias.double(), b).div_(s_out).mul_(p).round_()
    p_inv = pow2_biased(2046 - pe)                                        # 2^-n
    y = m.mul_(x).add_(b).mul_(p_inv).add_(0.5).floor_()
    zp = scalar(out_zero_point)
    y.clamp_min_(out_qmin - zp).clamp_max_(out_qmax - zp)
    y_q = y.add(zp).to(torch.int64) if return_codes else None
    return y_q, y.mul_(s_out).float()

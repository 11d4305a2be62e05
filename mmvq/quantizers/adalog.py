"""AdaLog: adaptive-logarithm-base quantizer (AdaLog, ECCV'24).

Follows the reference ``quantizers/logarithm.py::AdaLogQuantizer`` and
``ShiftAdaLogQuantizer`` (GoatWu/AdaLog):

* base ``b = 2^(q/r)`` with ``r = 37`` fixed and the integer ``q`` searched
  (candidates 10..138; ``q = r`` is log2): codes
  ``x_q = round(-log2(clamp(x / s, 1e-15, 1)) * r / q)``; codes ``>= 2^b``
  (values too small for the grid) dequantize to exact 0, the rest are clamped
  to ``[0, 2^b - 1]``. **Deliberate difference:** the reference rounds a
  float32 ``log2`` (itself within an ulp or so); mmvq rounds the exact
  logarithm: ``x_q >= j + 1`` exactly when ``t <= 2^(-(j + 1/2) q / r)``, so
  the code is the number of these thresholds (computed in float64, rounded
  down to float32 — for a float32 ``t`` the comparison is then the exact
  one) that ``t`` does not exceed (:func:`adalog_thresholds`). The two agree
  except where ``-log2(t) r / q`` lies within float32 rounding (``< 1e-5``)
  of a half-integer; the threshold form is what the fused CPU kernel
  computes too, so eager and fused evaluation give identical results.
* hardware-friendly dequantization by two lookup tables of ``2^b`` entries:
  ``T1[i] = floor(i q / r)`` (an integer shift) and
  ``T2[i] = round(2^(-((q i) mod r) / r) (2^(b+1) - 2)) / (2^(b+1) - 2)``
  (a fractional multiplier on a (b+1)-bit grid), ``x_hat = 2^-T1 T2 s``.
* shifted variant for post-GELU activations: quantizes ``x + shift``
  (``shift`` initialised to 0.16997, about ``|min GELU|``) and returns
  ``Q(x + shift) - shift``; after :meth:`fold_shift_into` the following
  Linear's bias absorbs ``-W shift`` (bias reparameterization,
  ``b' = b - W (shift 1)``) and the quantizer returns ``Q(x + shift)``.

Calibration here is a self-contained MSE search on (16k points of) the
observed data: all 129 ``q`` candidates, jointly with 8 scale candidates from
the 0.9..1.0 upper percentiles for post-GELU, scale fixed to 1 for
post-softmax as the reference.
The layer-output FPCS of the paper lives in :mod:`mmvq.calibration` and
refines these parameters; the quantizer only exposes
:meth:`fake_quant_candidates` so searches can evaluate many (q, s) at once.
"""
import torch

from ..registry import QUANTIZERS
from . import fused as _fused
from .base import BaseQuantizer, host_value
from .observers import SampleStore

GELU_SHIFT = 0.16997124254703522


def adalog_tables(q, r, bits):
    """Lookup tables T1 (int shift) and T2 (multiplier) for each code."""
    i = torch.arange(2 ** bits, dtype=torch.float64, device=q.device)
    q = q.double().reshape(-1, 1)
    grid = 2 ** (bits + 1) - 2
    t1 = torch.floor(i * q / r)
    t2 = torch.round(2.0 ** (-torch.remainder(q * i, r) / r) * grid) / grid
    return t1, t2


def adalog_thresholds(q, r, bits):
    """``[+inf, T_0, ..., T_(L-1), -inf]`` (float32, ``L = 2^bits``) with
    ``T_j = 2^(-(j + 1/2) q / r)`` computed in float64 and rounded down to
    float32: for a float32 ``t``, ``t <= T_j`` is the exact comparison, and
    ``round(-log2(t) r / q) >= j + 1`` exactly when it holds."""
    j = torch.arange(2 ** bits, dtype=torch.float64, device=q.device)
    thr = torch.exp2(-(j + 0.5) * q.double().reshape(()) / r)
    thr32 = thr.float()
    thr32 = torch.where(thr32.double() > thr,
                        torch.nextafter(thr32, torch.full_like(thr32, float('-inf'))), thr32)
    inf = thr32.new_full((1, ), float('inf'))
    return torch.cat([inf, thr32, -inf]).contiguous()


def _unclamped_codes(x, scale, q, r, thresholds, shift=None):
    """``round(-log2(clamp((x + shift) / s, 1e-15, 1)) * r / q)`` capped at
    ``2^b`` (every code from ``2^b`` on is the exact zero), as floats: the number
    of thresholds ``t`` does not exceed. Computed as the rounded float32
    logarithm (within one of that count), then one comparison with the
    threshold on each side."""
    t = torch.div(x, scale) if shift is None else torch.add(x, shift).div_(scale)
    t.clamp_(min=1e-15, max=1.0)
    levels = thresholds.numel() - 2
    k = torch.log2(t).neg_().mul_(r).div_(q).round_().clamp_(0, levels)
    idx = k.long()
    k += t <= torch.take(thresholds[1:], idx)
    k -= (t > torch.take(thresholds, idx)).to(k.dtype)
    return k


def adalog_codes(x, scale, q, r, bits, thresholds=None):
    """Codes (float) and the zero mask for base ``2^(q/r)`` (one ``q``)."""
    if thresholds is None:
        thresholds = adalog_thresholds(q, r, bits)
    codes = _unclamped_codes(x, scale, q.float(), r, thresholds)
    zero = codes >= 2 ** bits
    return torch.clamp(codes, 0, 2 ** bits - 1), zero


@QUANTIZERS.register_module()
class AdaLogQuantizer(BaseQuantizer):
    """Adaptive-base log quantizer for post-Softmax / post-GELU activations.

    Args:
        bits (int): code bits.
        r (int): fixed denominator of the base exponent (reference: 37).
        shift (float | None): ``None`` for post-softmax (non-negative input);
            a float (default :data:`GELU_SHIFT`) for the shifted post-GELU
            variant.
        fixed_scale (float | None): keep the scale fixed (post-softmax: 1).
        q_candidates (tuple[int, int]): inclusive range of searched ``q``.
        enabled (bool): ``False`` makes it the identity.
    """

    kind = 'adalog'

    def __init__(self, bits=4, r=37, shift=None, fixed_scale=None, q_candidates=(10, 138),
                 enabled=True):
        super().__init__(bits, enabled)
        self.r = int(r)
        self.fixed_scale = fixed_scale
        self.q_candidates = tuple(q_candidates)
        self.shifted = shift is not None
        self.register_buffer('q', torch.tensor([self.r], dtype=torch.long))
        self.register_buffer('scale', torch.ones(1) * (fixed_scale or 1.0))
        self.register_buffer('shift', torch.tensor([float(shift or 0.0)]))
        self.register_buffer('bias_folded', torch.tensor(False))
        t1, t2 = adalog_tables(self.q, self.r, bits)
        self.register_buffer('table1', t1.reshape(-1).float())
        self.register_buffer('table2', t2.reshape(-1).float())
        self.reset_observer()

    def reset_observer(self):
        self.store = SampleStore(None, max_columns=1 << 16)

    def observe(self, x):
        self.store.update(x)

    def set_params(self, q=None, scale=None, shift=None):
        dev = self.scale.device
        if q is not None:
            self._set_buffer('q', torch.as_tensor(q, dtype=torch.long, device=dev).reshape(1))
            t1, t2 = adalog_tables(self.q, self.r, self.bits)
            self._set_buffer('table1', t1.reshape(-1).float())
            self._set_buffer('table2', t2.reshape(-1).float())
        if scale is not None:
            self._set_buffer('scale', torch.as_tensor(scale, dtype=torch.float32, device=dev).reshape(1))
        if shift is not None:
            self._set_buffer('shift', torch.as_tensor(shift, dtype=torch.float32, device=dev).reshape(1))
        self.calibrated.fill_(True)

    # ---------------------------------------------------------- arithmetic
    def quantize(self, x):
        """Codes (float tensor) and the zero mask of ``x`` (shift applied)."""
        return adalog_codes(x + self.shift, self.scale, self.q, self.r, self.bits,
                            self.fused_tables()[0])

    def lut(self):
        """Dequantized value of every code: ``2^-T1[i] * T2[i] * s``."""
        return torch.pow(2.0, -self.table1) * self.table2 * self.scale

    def dequantize(self, codes, zero):
        # one gather from the 2^b-entry table (same products as per element)
        return self.lut()[codes.long()].masked_fill(zero, 0.0)

    def fused_tables(self):
        """:func:`adalog_thresholds` and :meth:`lut` extended by exact zeros
        (at least 17 entries, as the fused kernel reads them); cached until a
        buffer they derive from changes (no host read)."""
        key = tuple((id(b), b._version) for b in (self.q, self.scale, self.table1, self.table2))
        hit = self.__dict__.get('_mmvq_fused_tables')
        if hit is None or hit[0] != key:
            levels = 2 ** self.bits
            thr32 = adalog_thresholds(self.q, self.r, self.bits)
            lut = self.lut()
            hit = (key, thr32, torch.cat([lut, lut.new_zeros(max(1, 17 - levels))]).float().contiguous())
            self.__dict__['_mmvq_fused_tables'] = hit
        return hit[1], hit[2]

    def fake_quant(self, x):
        if _fused.use_fused(self, x):
            thr, lut = self.fused_tables()
            return _fused.adalog(x, self.scale, self.shift, thr, 2 ** self.bits, lut,
                                 self.shifted and not self.is_folded())
        # quantize + dequantize in one gather: the codes of adalog_codes
        # (capped at 2^b, the exact zero) index the table extended by zeros
        thr, lut = self.fused_tables()
        idx = _unclamped_codes(x, self.scale, self.q.float(), self.r, thr, self.shift).long()
        out = torch.take(lut, idx).to(x.dtype)
        if self.shifted and not self.is_folded():
            out = out - self.shift
        return out

    def passthrough(self, x):
        """``x + shift`` once the shift is folded into the next bias (which now
        subtracts ``W_q shift``, :meth:`fold_shift_into`): a disabled quantizer,
        or ``float`` mode, then leaves the next Linear's input float — exactly
        while that Linear's weight quantizer is on (``W_q x + b``), and up to
        ``(W - W_q) shift`` when it is off too."""
        if self.shifted and self.is_folded():
            return x + self.shift
        return x

    def is_folded(self):
        """Whether the shift was folded into the next bias (host copy, one sync per change)."""
        return host_value(self, 'bias_folded', self.bias_folded, bool)

    def prime(self):
        super().prime()
        self.is_folded()
        self.fused_tables()

    def fake_quant_candidates(self, x, q, scale):
        """Fake-quantize ``x`` for many (q, scale) at once (search helper).

        ``-log2(x + shift)`` is computed once; each candidate then costs a
        multiply-add, a rounding and a gather from its own ``2^b + 1`` entry
        table (the last entry is the exact zero), instead of a ``log2`` and a
        ``pow`` per element and candidate. Equal to :meth:`fake_quant` up to
        float rounding at exact code ties.

        Args:
            x (Tensor): input, any shape ``S``.
            q (Tensor): ``(K,)`` candidate q values.
            scale (Tensor): ``(K,)`` candidate scales.

        Returns:
            Tensor: ``(K, *S)``; the shift is applied and removed as in
            :meth:`fake_quant` before folding.
        """
        levels = 2 ** self.bits
        k = q.numel()
        view = (-1, ) + (1, ) * x.dim()
        neg_log = -torch.log2((x + self.shift).clamp(min=1e-15))
        e = (neg_log[None] + torch.log2(scale.float()).reshape(view)).clamp(0.0, 49.8289)
        codes = torch.round(e * (self.r / q.float()).reshape(view)).clamp_(max=levels)
        t1, t2 = adalog_tables(q.reshape(-1), self.r, self.bits)
        lut = torch.cat([(2.0 ** -t1 * t2).float() * scale.float().reshape(-1, 1),
                         x.new_zeros(k, 1, dtype=torch.float32)], dim=1)  # (K, levels + 1)
        offset = (torch.arange(k, device=x.device) * (levels + 1)).reshape(view)
        out = torch.take(lut, codes.long() + offset)
        if self.shifted and not self.is_folded():
            out = out - self.shift
        return out

    def candidate_grid(self, data, n_scales=8):
        """All (q, scale) pairs of the default search."""
        dev = data.device
        qs = torch.arange(self.q_candidates[0], self.q_candidates[1] + 1, dtype=torch.float32,
                          device=dev)
        if self.fixed_scale is not None:
            scales = torch.tensor([float(self.fixed_scale)], device=dev)
        else:
            flat = (data + self.shift).reshape(-1)
            pos = flat[flat > 0]
            if pos.numel() == 0:
                pos = flat.abs() + 1e-8
            hi = pos.max()
            lo = torch.quantile(pos[:1 << 24].float(), 0.9) if pos.numel() > 1 else hi
            scales = torch.linspace(float(lo), float(hi), n_scales, device=dev)
        qq, ss = torch.meshgrid(qs, scales, indexing='ij')
        return qq.reshape(-1), ss.reshape(-1)

    def calibrate(self):
        if self.store.empty:
            raise RuntimeError('AdaLogQuantizer: no calibration data was observed')
        data = self.store.data(self.scale.device).reshape(-1)
        data = data[::max(1, data.numel() // (1 << 14))]          # 16k points suffice here
        qs, scales = self.candidate_grid(data)
        best_err, best = None, 0
        chunk = 64
        for st in range(0, qs.numel(), chunk):
            out = self.fake_quant_candidates(data, qs[st:st + chunk], scales[st:st + chunk])
            err = (out - data[None]).pow(2).mean(dim=1)
            val, idx = err.min(dim=0)
            if best_err is None or val < best_err:
                best_err, best = val, st + int(idx)
        self.set_params(q=qs[best], scale=scales[best])

    # ------------------------------------------------ bias reparameterization
    def fold_shift_into(self, linear):
        """Fold ``-W shift`` into ``linear.bias`` (AdaLog bias reparameterization).

        After folding, :meth:`fake_quant` returns ``Q(x + shift)`` and
        ``linear(Q(x + shift))`` equals ``linear_before(Q(x + shift) - shift)``.
        The weight used is the one the layer computes with (its weight
        quantizer's output if it has one), so the equality is exact up to
        float rounding.
        """
        if not self.shifted:
            raise ValueError('fold_shift_into needs the shifted (post-GELU) AdaLog variant')
        if self.is_folded():
            return
        weight = linear.weight
        wq = getattr(linear, 'weight_quantizer', None)
        with torch.no_grad():
            if wq is not None:
                weight = wq(weight)
            delta = -weight.sum(dim=1) * self.shift
            if linear.bias is None:
                linear.bias = torch.nn.Parameter(delta.clone())
            else:
                linear.bias.add_(delta.to(linear.bias.dtype))
        self.bias_folded.fill_(True)

    def levels(self):
        t = (2.0 ** -self.table1 * self.table2 * self.scale).tolist()
        return [v - float(self.shift) if self.shifted and not self.is_folded() else v for v in t]

    def summary(self):
        base = f'2^({int(self.q)}/{self.r})'
        return dict(kind=self.kind + ('+shift' if self.shifted else ''), bits=self.bits,
                    granularity=f'tensor base={base}',
                    scale=round(float(self.scale), 6))

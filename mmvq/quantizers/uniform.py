"""Uniform (linear) quantizer: the baseline of every ViT PTQ paper.

Fake quantization follows the standard affine scheme
``q = clamp(round(x / s) + z, qmin, qmax)``, ``x_hat = (q - z) * s``.

* asymmetric: ``[qmin, qmax] = [0, 2^b - 1]``, ``s = (max - min) / (2^b - 1)``,
  ``z = clamp(qmin - round(min / s))``; the range is widened to contain 0 so
  that zero (padding, masked tokens) is exact.
* symmetric: ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``, ``z = 0``,
  ``s = max(|min|, |max|) / (2^(b-1) - 1)`` by default, so the largest
  magnitude is representable without clamping. ``half_range=True`` divides
  by ``(qmax - qmin) / 2`` (127.5 at 8 bit) as FQ-ViT's ``MinmaxObserver``
  does (``models/ptq/observer/minmax.py``): the largest magnitude rounds to
  128 and is clamped to 127. The FQ-ViT blocks set it.

Range estimators (FQ-ViT ``--quant-method``): ``minmax`` (running extremes),
``ema`` (EMA of per-batch extremes), ``percentile`` (mean over batches of the
per-batch ``100-p``/``p`` percentiles), ``omse`` (FQ-ViT's OMSE: shrink the
min-max range by ``1 - 0.01 i``, ``i = 0..89``, and keep the one with the
least squared quantization error on the stored calibration sample, per
channel when per-channel).

Granularity: ``tensor``; ``channel`` along ``ch_axis`` (weights: axis 0 =
output channel); ``head`` is channel-wise along axis 1 of ``(B, heads, N, d)``
attention operands (AdaLog's ``head_channel_wise``).
"""
import torch

from ..registry import QUANTIZERS
from . import fused as _fused
from .base import BaseQuantizer, along_axis
from .observers import MinMaxObserver, PercentileObserver, SampleStore, move_channel_first

OBSERVERS = ('minmax', 'ema', 'percentile', 'omse')


def qrange(bits, symmetric):
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def affine_params(xmin, xmax, bits, symmetric, eps=1e-8, half_range=False):
    """Scale and zero point covering ``[xmin, xmax]`` (tensors of equal shape);
    ``half_range``: symmetric scale over ``(qmax - qmin) / 2`` (FQ-ViT)."""
    qmin, qmax = qrange(bits, symmetric)
    xmin = torch.clamp(xmin, max=0.0)
    xmax = torch.clamp(xmax, min=0.0)
    if symmetric:
        scale = torch.maximum(xmin.abs(), xmax) / ((qmax - qmin) / 2 if half_range else qmax)
        scale = torch.clamp(scale, min=eps)
        zero_point = torch.zeros_like(scale)
    else:
        scale = torch.clamp((xmax - xmin) / (qmax - qmin), min=eps)
        zero_point = torch.clamp(qmin - torch.round(xmin / scale), qmin, qmax)
    return scale, zero_point


def fake_quant_affine(x, scale, zero_point, qmin, qmax):
    """``(clamp(round(x / s) + z, qmin, qmax) - z) * s``.

    Computed as ``clamp(round(x / s), qmin - z, qmax - z) * s`` in place on one
    buffer: ``z`` is an integer, so both forms give the same floats (also for
    values clamped at the ends), with four passes and one allocation instead of
    six passes and six allocations. A tensor ``z`` (0-dim or broadcastable)
    stays on its device: the bounds are applied with ``clamp_min_`` /
    ``clamp_max_``, which take tensors at the speed of scalar bounds (a
    ternary ``clamp`` with tensor bounds is ~15x slower on CPU), and no value
    is read back to the host.
    """
    q = torch.div(x, scale)
    q.round_()
    if isinstance(zero_point, torch.Tensor):
        return q.clamp_min_(qmin - zero_point).clamp_max_(qmax - zero_point).mul_(scale)
    z = float(zero_point)
    return q.clamp_(qmin - z, qmax - z).mul_(scale)


@QUANTIZERS.register_module()
class UniformQuantizer(BaseQuantizer):
    """Uniform affine quantizer with min-max / EMA / percentile / OMSE ranges.

    Args:
        bits (int): bit width (2-8).
        symmetric (bool): signed symmetric (weights) or unsigned asymmetric.
        granularity (str): ``'tensor'``, ``'channel'`` or ``'head'``.
        ch_axis (int): channel axis for ``'channel'`` (default -1; weights use 0).
        observer (str): ``'minmax'``, ``'ema'``, ``'percentile'`` or ``'omse'``.
        momentum (float): EMA momentum for ``'ema'``.
        percentile (float): upper percentile for ``'percentile'``.
        enabled (bool): ``False`` makes it the identity.
        half_range (bool): symmetric scale ``max|x| / ((qmax - qmin) / 2)``,
            FQ-ViT's (default: ``max|x| / qmax``).
    """

    kind = 'uniform'
    quantizes_weights = True
    affine = True
    free_affine = True

    def __init__(self, bits=8, symmetric=False, granularity='tensor', ch_axis=-1,
                 observer='minmax', momentum=0.9, percentile=99.99, enabled=True,
                 half_range=False):
        super().__init__(bits, enabled)
        self.half_range = bool(half_range)
        if granularity not in ('tensor', 'channel', 'head'):
            raise ValueError(f"granularity={granularity!r}: use 'tensor', 'channel' or 'head'")
        if observer not in OBSERVERS:
            raise ValueError(f'observer={observer!r}: use one of {OBSERVERS}')
        self.symmetric = symmetric
        self.granularity = granularity
        self.ch_axis = {'tensor': None, 'channel': ch_axis, 'head': 1}[granularity]
        self.observer_name = observer
        self.momentum = momentum
        self.percentile = percentile
        self.qmin, self.qmax = qrange(bits, symmetric)
        self.register_buffer('scale', torch.ones(1))
        self.register_buffer('zero_point', torch.zeros(1))
        self.reset_observer()

    def reset_observer(self):
        if self.observer_name == 'percentile':
            self.observer = PercentileObserver(self.ch_axis, self.percentile)
        else:
            self.observer = MinMaxObserver(
                self.ch_axis, self.momentum if self.observer_name == 'ema' else None)
        self.store = SampleStore(self.ch_axis) if self.observer_name == 'omse' else None

    def observe(self, x):
        self.observer.update(x)
        if self.store is not None:
            self.store.update(x)

    # --------------------------------------------------------- parameters
    def set_range(self, xmin, xmax):
        """Set parameters from a range (1-D tensors of length C or 1)."""
        scale, zp = affine_params(xmin.float().reshape(-1), xmax.float().reshape(-1),
                                  self.bits, self.symmetric, half_range=self.half_range)
        self._set_buffer('scale', scale)
        self._set_buffer('zero_point', zp)
        self.calibrated.fill_(True)

    def set_params(self, scale, zero_point):
        dev = self.scale.device
        self._set_buffer('scale', torch.as_tensor(scale, dtype=torch.float32, device=dev).reshape(-1))
        self._set_buffer('zero_point',
                         torch.as_tensor(zero_point, dtype=torch.float32, device=dev).reshape(-1))
        self.calibrated.fill_(True)

    def calibrate(self):
        if self.observer.empty:
            raise RuntimeError(f'{type(self).__name__}: no calibration data was observed')
        dev = self.scale.device
        xmin, xmax = self.observer.min.to(dev), self.observer.max.to(dev)
        if self.observer_name == 'omse':
            xmin, xmax = self._omse_search(self.store.data(dev), xmin, xmax)
        self.set_range(xmin, xmax)

    def _omse_search(self, data, xmin, xmax, steps=90):
        """FQ-ViT OMSE: per channel, the shrink factor with least L2 error."""
        ratios = 1.0 - 0.01 * torch.arange(steps, dtype=torch.float32, device=data.device)
        cand_min = xmin[None, :] * ratios[:, None]              # (S, C)
        cand_max = xmax[None, :] * ratios[:, None]
        scale, zp = affine_params(cand_min, cand_max, self.bits, self.symmetric,
                                  half_range=self.half_range)
        x = data[None]                                          # (1, C, N)
        err = (fake_quant_affine(x, scale[..., None], zp[..., None], self.qmin, self.qmax)
               - x).pow(2).sum(dim=2)                           # (S, C)
        best = err.argmin(dim=0)
        idx = torch.arange(xmin.numel(), device=data.device)
        return cand_min[best, idx], cand_max[best, idx]

    # ---------------------------------------------------------- arithmetic
    def _view(self, p, x):
        return along_axis(p, x, self.ch_axis)

    def quantize(self, x):
        """Integer codes in ``[qmin, qmax]`` (as float tensor)."""
        s, z = self._view(self.scale, x), self._view(self.zero_point, x)
        return torch.clamp(torch.round(x / s) + z, self.qmin, self.qmax)

    def dequantize(self, q, dtype=torch.float32):
        """``(q - z) s`` (``q`` of any dtype; float result in ``dtype``)."""
        out = q.to(dtype).sub_(self._view(self.zero_point, q))
        return out.mul_(self._view(self.scale, q))

    def codes(self, x):
        """Integer codes of ``x`` in the smallest integer dtype that holds them
        (``int8``/``uint8`` up to 8 bits): ``dequantize(codes(x))`` equals
        ``fake_quant(x)`` bit for bit."""
        dtype = torch.uint8 if self.qmin >= 0 else torch.int8
        return self.quantize(x).to(dtype)

    inplace_ok = True

    def fake_quant(self, x, inplace=False):
        if _fused.use_fused(self, x):
            y = _fused.fake_quant_planned(
                self, x, (self.scale, self.zero_point),
                lambda: (self._view(self.scale, x), self._view(self.zero_point, x)),
                self.qmin, self.qmax, inplace)
            if y is not None:
                return y
        return fake_quant_affine(x, self._view(self.scale, x), self._view(self.zero_point, x),
                                 self.qmin, self.qmax)

    def levels(self):
        s, z = float(self.scale.reshape(-1)[0]), float(self.zero_point.reshape(-1)[0])
        return [(k - z) * s for k in range(self.qmin, self.qmax + 1)]

    def summary(self):
        gran = self.granularity if self.granularity != 'channel' else f'channel(axis={self.ch_axis})'
        return dict(kind=self.kind, bits=self.bits, granularity=gran,
                    symmetric=self.symmetric, observer=self.observer_name)


__all__ = ['UniformQuantizer', 'affine_params', 'fake_quant_affine', 'qrange', 'move_channel_first']

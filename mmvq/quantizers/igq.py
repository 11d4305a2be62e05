"""IGQ-ViT: instance-aware group quantization (Moon et al., CVPR'24).

There is no official code; this follows the paper (arXiv 2404.00928, Sec. 3.2
and the project page) and states every decision the text leaves open.

What the paper fixes:
* activations of every FC input are split, *per input instance*, into G
  groups of channels with similar statistics, each group with its own
  uniform quantizer; softmax attention is grouped the same way over rows;
* the assignment is dynamic (computed for each instance at inference);
  the group quantizers are calibrated once;
* "upper bound" = one quantizer per channel (G = number of channels).

What we decided:
* **Unit statistics.** For an instance ``i`` and unit ``u`` (a channel of a
  ``(B, T, C)`` FC input, or a row of a ``(B, H, N, N)`` attention map) the
  statistic is its dynamic range ``(min_iu, max_iu)`` over the instance's
  elements (tokens for channels, keys for rows). In an input of rank 2
  (``(N, C)``: a classifier head's features, RoI-head FCs) every row is its
  own instance of one token, so no prediction depends on the rest of its
  batch (treating the batch as one instance let a batch of one class share
  its ranges: +8 top-1 "gained" on a class-sorted test set); 4-D conv inputs
  ``(B, C, H, W)`` use channel axis 1.
* **Assignment (inference).** Unit ``u`` goes to the group whose calibrated
  range centre is nearest: ``g(u) = argmin_g (min_u - l_g)^2 + (max_u - h_g)^2``.
  Vectorised: one ``(I, U, G)`` distance tensor and an ``argmin``; the
  fake-quant then gathers each unit's (scale, zero point). Equivalent to
  permuting channels by group and running G partial matmuls with their own
  scales, which is how the paper realises it in hardware.
* **Group calibration.** k-means on the calibration units' ``(min, max)``
  points (init: quantiles of the sorted range widths, 25 Lloyd iterations,
  deterministic); each group's quantizer then covers the extremes of the
  units assigned to it (asymmetric uniform, min-max over members).
* Weights are not grouped (uniform per-output-channel), as in the paper.
"""
import torch

from ..registry import QUANTIZERS
from . import fused as _fused
from .base import BaseQuantizer
from .observers import SampleStore
from .uniform import affine_params, fake_quant_affine, qrange


def unit_ranges(x, unit):
    """Per-instance, per-unit ``(min, max)`` and the ``(I, U, R)`` view.

    Args:
        x (Tensor): activation.
        unit (str): ``'channel'`` or ``'row'``.

    Returns:
        tuple: ``(view, mins, maxs, restore)`` where ``view`` is ``(I, U, R)``,
        ``mins``/``maxs`` are ``(I, U)`` and ``restore(y)`` maps a tensor of the
        view's shape back to ``x``'s shape.
    """
    shape = x.shape
    if unit == 'row':
        # (B, ..., N, M): instance = B, units = all middle dims, range over M
        view = x.reshape(shape[0], -1, shape[-1])

        def restore(y):
            return y.reshape(shape)
    elif x.dim() == 4:                                 # conv input (B, C, H, W)
        view = x.reshape(shape[0], shape[1], -1)

        def restore(y):
            return y.reshape(shape)
    else:
        # channels last; in rank 2 every row is an instance of one token
        view = x.reshape(shape[0], -1, shape[-1]).transpose(1, 2)

        def restore(y):
            return y.transpose(1, 2).reshape(shape)
    return view, view.amin(dim=2), view.amax(dim=2), restore


def kmeans_ranges(points, groups, iters=25):
    """Deterministic k-means on ``(n, 2)`` (min, max) points.

    Returns:
        tuple[Tensor, Tensor]: centres ``(G, 2)`` and the assignment ``(n,)``.
    """
    n = points.shape[0]
    width = points[:, 1] - points[:, 0]
    order = torch.argsort(width)
    pick = order[torch.linspace(0, n - 1, groups, device=points.device).round().long()]
    centres = points[pick].clone()
    assign = torch.zeros(n, dtype=torch.long, device=points.device)
    for _ in range(iters):
        dist = torch.cdist(points, centres)
        new_assign = dist.argmin(dim=1)
        if torch.equal(new_assign, assign) and _ > 0:
            break
        assign = new_assign
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=groups).float()[:, None]
        filled = counts[:, 0] > 0
        centres[filled] = sums[filled] / counts[filled]
    return centres, assign


@QUANTIZERS.register_module()
class IGQQuantizer(BaseQuantizer):
    """Instance-aware group quantizer for FC inputs and attention rows.

    Args:
        bits (int): bit width of every group quantizer.
        num_groups (int): G.
        unit (str): ``'channel'`` (FC/conv inputs) or ``'row'`` (softmax).
        max_units (int): cap on stored calibration units for k-means.
        enabled (bool): ``False`` makes it the identity.
    """

    kind = 'igq'
    allocates_groups = True

    def __init__(self, bits=4, num_groups=8, unit='channel', max_units=200000, enabled=True):
        super().__init__(bits, enabled)
        if unit not in ('channel', 'row'):
            raise ValueError(f"unit={unit!r}: use 'channel' or 'row'")
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f'num_groups={num_groups!r} must be a positive integer')
        self.num_groups = num_groups
        self.unit = unit
        self.max_units = max_units
        self.qmin, self.qmax = qrange(bits, False)
        self.register_buffer('centres', torch.zeros(num_groups, 2))
        self.register_buffer('scale', torch.ones(num_groups))
        self.register_buffer('zero_point', torch.zeros(num_groups))
        self.reset_observer()

    def reset_observer(self):
        self.store = SampleStore(ch_axis=0, max_columns=self.max_units)

    def observe(self, x):
        _, mins, maxs, _ = unit_ranges(x.float(), self.unit)
        if self.unit == 'channel' and self.num_groups > mins.shape[1]:
            raise ValueError(f'num_groups={self.num_groups} is larger than the {mins.shape[1]} '
                             'channels of this input: use at most that many groups')
        # one (min, max) column per unit and instance
        self.store.update(torch.stack([mins.reshape(-1), maxs.reshape(-1)], dim=0))

    def calibrate(self):
        if self.store.empty:
            raise RuntimeError('IGQQuantizer: no calibration data was observed')
        # k-means runs on the host whatever the model's device: the points are
        # few (at most max_units), and CUDA's index_add_ sums in a
        # nondeterministic order, which would let ranks disagree
        dev = torch.device('cpu')
        pts = self.store.data(dev).t().contiguous()                   # (n, 2)
        groups = min(self.num_groups, pts.shape[0])
        centres, assign = kmeans_ranges(pts, groups)
        lo = torch.full((groups, ), float('inf'), device=dev).scatter_reduce(0, assign, pts[:, 0], 'amin')
        hi = torch.full((groups, ), float('-inf'), device=dev).scatter_reduce(0, assign, pts[:, 1],
                                                                            'amax')
        empty = ~torch.isfinite(lo)
        lo[empty], hi[empty] = centres[empty, 0], centres[empty, 1]
        scale, zp = affine_params(lo, hi, self.bits, False)
        if groups < self.num_groups:      # fewer units than groups: pad unused groups
            pad = self.num_groups - groups
            centres = torch.cat([centres, centres[-1:].expand(pad, 2)])
            scale = torch.cat([scale, scale[-1:].expand(pad)])
            zp = torch.cat([zp, zp[-1:].expand(pad)])
        self._set_buffer('centres', centres)
        self._set_buffer('scale', scale)
        self._set_buffer('zero_point', zp)
        self.calibrated.fill_(True)

    def assign(self, mins, maxs):
        """Group index of every unit, ``(I, U)`` (the instance-aware step)."""
        d = (mins[..., None] - self.centres[:, 0]).pow(2) + (maxs[..., None] - self.centres[:, 1]).pow(2)
        return d.argmin(dim=-1)

    def fake_quant(self, x):
        if (x.dim() >= 2 and _fused.use_fused(self, x) and self.centres.dtype == torch.float32
                and self.centres.is_contiguous()
                and self.scale.numel() == self.zero_point.numel() == self.centres.shape[0]):
            return _fused.igq(x, self, rows=self.unit == 'row' or x.dim() == 4)
        view, mins, maxs, restore = unit_ranges(x, self.unit)
        g = self.assign(mins, maxs)                                   # (I, U)
        s = self.scale[g].to(x.dtype)
        z = self.zero_point[g].to(x.dtype)
        if self.unit == 'channel' and x.dim() != 4:
            # channels last: scale each (instance, channel) in x's own layout,
            # so no transposed copy is made (the same values as on the view)
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])
            out = fake_quant_affine(x3, s[:, None, :], z[:, None, :], self.qmin, self.qmax)
            return out.reshape(x.shape)
        return restore(fake_quant_affine(view, s[..., None], z[..., None], self.qmin, self.qmax))

    def regrouped(self, num_groups):
        """A copy with ``num_groups`` groups fitted on this quantizer's stored
        samples (IGQ's group-count allocation), on this quantizer's device."""
        with torch.device(self.scale.device):
            g = type(self)(bits=self.bits, num_groups=num_groups, unit=self.unit,
                           max_units=self.max_units)
        g.store = self.store
        g.calibrate()
        return g

    def summary(self):
        return dict(kind=self.kind, bits=self.bits,
                    granularity=f'{self.num_groups} dynamic groups of {self.unit}s')

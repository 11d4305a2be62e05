"""Statistics collectors (observers) used by quantizers during calibration.

Observers are plain Python objects, not modules: their state is transient
calibration data and never enters a checkpoint. Every reduction is over all
dimensions except the channel axis (``ch_axis=None`` means per tensor), so the
same observer serves per-tensor, per-channel and per-head quantizers.
"""
import torch


def move_channel_first(x, ch_axis):
    """Return ``x`` as a 2-D ``(C, N)`` view (``C=1`` for per-tensor)."""
    if ch_axis is None:
        return x.reshape(1, -1)
    ch_axis = ch_axis % x.dim()
    return x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)


class MinMaxObserver:
    """Running min/max (``momentum=None``) or EMA min/max (FQ-ViT ``ema``).

    Args:
        ch_axis (int | None): channel axis kept apart; ``None`` per tensor.
        momentum (float | None): EMA momentum ``m`` in
            ``v <- m * v + (1 - m) * v_batch``; ``None`` keeps the running
            extreme over all batches.
    """

    def __init__(self, ch_axis=None, momentum=None):
        self.ch_axis = ch_axis
        self.momentum = momentum
        self.min = None
        self.max = None

    def update(self, x):
        x2d = move_channel_first(x.float(), self.ch_axis)
        bmin, bmax = x2d.amin(dim=1), x2d.amax(dim=1)
        if self.min is None:
            self.min, self.max = bmin, bmax
        elif self.momentum is None:
            self.min = torch.minimum(self.min, bmin)
            self.max = torch.maximum(self.max, bmax)
        else:
            m = self.momentum
            self.min = m * self.min + (1 - m) * bmin
            self.max = m * self.max + (1 - m) * bmax

    @property
    def empty(self):
        return self.min is None


class PercentileObserver:
    """Per-batch lower/upper percentiles, averaged over batches.

    ``kthvalue`` is used instead of ``torch.quantile`` so tensors of any size
    work. The percentile is taken per channel when ``ch_axis`` is set.

    Args:
        ch_axis (int | None): channel axis, ``None`` per tensor.
        percentile (float): upper percentile in (50, 100]; the lower one is
            ``100 - percentile``.
    """

    def __init__(self, ch_axis=None, percentile=99.99):
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f'percentile={percentile} must lie in (50, 100]')
        self.ch_axis = ch_axis
        self.percentile = percentile
        self.sum_min = None
        self.sum_max = None
        self.count = 0

    def update(self, x):
        x2d = move_channel_first(x.float(), self.ch_axis)
        n = x2d.shape[1]
        k_hi = max(1, min(n, int(round(n * self.percentile / 100.0))))
        k_lo = max(1, min(n, n + 1 - k_hi))
        bmax = x2d.kthvalue(k_hi, dim=1).values
        bmin = x2d.kthvalue(k_lo, dim=1).values
        if self.sum_min is None:
            self.sum_min, self.sum_max = bmin, bmax
        else:
            self.sum_min = self.sum_min + bmin
            self.sum_max = self.sum_max + bmax
        self.count += 1

    @property
    def min(self):
        return None if self.sum_min is None else self.sum_min / self.count

    @property
    def max(self):
        return None if self.sum_max is None else self.sum_max / self.count

    @property
    def empty(self):
        return self.count == 0


class SampleStore:
    """Keep a bounded, deterministic sample of ``(C, N)`` columns for searches.

    Searches (OMSE clipping, PTF factors, group fitting) need data, not only
    extremes. Each batch contributes an evenly strided subset of its columns so
    the store never exceeds ``max_columns`` per channel; when full, the oldest
    half is thinned (every other column dropped). Deterministic: no RNG.

    Args:
        ch_axis (int | None): channel axis, ``None`` per tensor.
        max_columns (int): maximum columns kept per channel.
    """

    def __init__(self, ch_axis=None, max_columns=65536):
        self.ch_axis = ch_axis
        self.max_columns = max_columns
        self.chunks = []

    def update(self, x):
        x2d = move_channel_first(x.detach().float(), self.ch_axis)
        step = max(1, -(-x2d.shape[1] // self.max_columns))
        self.chunks.append(x2d[:, ::step].clone())
        while sum(c.shape[1] for c in self.chunks) > self.max_columns and len(self.chunks) > 1:
            # thin every stored chunk by two, oldest first
            self.chunks = [c[:, ::2] for c in self.chunks]

    def data(self):
        """Return the stored ``(C, N)`` sample."""
        if not self.chunks:
            return None
        return torch.cat(self.chunks, dim=1)

    @property
    def empty(self):
        return not self.chunks

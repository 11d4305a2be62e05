"""Statistics collectors (observers) used by quantizers during calibration.

Observers are plain Python objects, not modules: their state is transient
calibration data and never enters a checkpoint. Every reduction is over all
dimensions except the channel axis (``ch_axis=None`` means per tensor), so the
same observer serves per-tensor, per-channel and per-head quantizers.

**Keyed records.** Each call stores one record under a key
``(calibration step, call index within the step)``; the step is set by the
calibration driver (:func:`calibration_step`), e.g. the global index of the
calibration image. Statistics are always reduced in key order, so sharding the
calibration images over several processes and merging the records
(:meth:`KeyedObserver.merge`) gives bit-identical results to one process
seeing every image — the property the distributed PTQ loop relies on.
Without a driver, keys are a per-observer call counter.

**Where records live** (:func:`store_policy`). Records are moved to
``store_device`` as they are made — the host (``'cpu'``) by default, so
that calibrating a large detector on a GPU keeps only the model and one
image's activations in GPU memory; ``'same'`` keeps them on the device of
the data. Sample stores are bounded in bytes (``max_bytes`` per store, the
column budget shrinks for wide tensors), and every record is dropped when
calibration ends (:func:`mmvq.calibration.driver.finalize`). Whoever
computes from records moves them to its own device first (a quantizer to
its buffers' device), so parameters are computed where the model runs.
"""
import contextlib

import torch

from ..schema import CalibSettings

DEFAULT_STORE = CalibSettings().store()      # dict(device='cpu', max_bytes=64 MiB)


class _Step:
    key = None          # current calibration step (int) or None
    expected = 1        # number of calibration steps, bounds stored samples
    store_device = DEFAULT_STORE['device']   # where records live: a device or 'same' (the data's)
    max_bytes = DEFAULT_STORE['max_bytes']   # per sample store


def expected_steps():
    """Number of calibration steps of the current pass (bounds stored samples)."""
    return _Step.expected


@contextlib.contextmanager
def store_policy(device=DEFAULT_STORE['device'], max_bytes=DEFAULT_STORE['max_bytes']):
    """Where observer records live and how large one sample store may grow.

    Args:
        device (str | torch.device): ``'cpu'`` (default: host memory),
            ``'same'`` (the device of the observed data) or any device.
        max_bytes (int): bound of one :class:`SampleStore` (all records).
    """
    old = _Step.store_device, _Step.max_bytes
    _Step.store_device, _Step.max_bytes = device, int(max_bytes)
    try:
        yield
    finally:
        _Step.store_device, _Step.max_bytes = old


def to_store(t):
    """Move a record tensor to the store device of the current policy."""
    dev = _Step.store_device
    if dev == 'same':
        return t
    return t.to(dev)


@contextlib.contextmanager
def calibration_step(key, expected=None):
    """Tag observer records made inside the block with ``key``."""
    old_key, old_expected = _Step.key, _Step.expected
    _Step.key = int(key)
    if expected is not None:
        _Step.expected = max(1, int(expected))
    try:
        yield
    finally:
        _Step.key, _Step.expected = old_key, old_expected


def move_channel_first(x, ch_axis):
    """Return ``x`` as a 2-D ``(C, N)`` view (``C=1`` for per-tensor)."""
    if ch_axis is None:
        return x.reshape(1, -1)
    ch_axis = ch_axis % x.dim()
    return x.movedim(ch_axis, 0).reshape(x.shape[ch_axis], -1)


class KeyedObserver:
    """Base: records keyed by calibration step, reduced in key order."""

    def __init__(self):
        self.records = {}
        self._last_step = None
        self._sub = 0
        self._auto = 0

    def _key(self):
        step = _Step.key
        if step is None:
            self._auto += 1
            return (self._auto, 0)
        self._sub = self._sub + 1 if step == self._last_step else 0
        self._last_step = step
        return (step, self._sub)

    def update(self, x):
        self.records[self._key()] = self.record(x)

    def record(self, x):
        raise NotImplementedError

    def ordered(self):
        return [self.records[k] for k in sorted(self.records)]

    def merge(self, states):
        """Union of record dicts gathered from several processes."""
        for state in states:
            self.records.update(state)

    @property
    def empty(self):
        return not self.records


class MinMaxObserver(KeyedObserver):
    """Running min/max (``momentum=None``) or EMA min/max (FQ-ViT ``ema``).

    Args:
        ch_axis (int | None): channel axis kept apart; ``None`` per tensor.
        momentum (float | None): EMA momentum ``m`` in
            ``v <- m * v + (1 - m) * v_batch`` (in key order); ``None`` keeps
            the extremes over all records.
    """

    def __init__(self, ch_axis=None, momentum=None):
        super().__init__()
        self.ch_axis = ch_axis
        self.momentum = momentum

    def record(self, x):
        x2d = move_channel_first(x.float(), self.ch_axis)
        return to_store(x2d.amin(dim=1)), to_store(x2d.amax(dim=1))

    def _reduce(self):
        recs = self.ordered()
        mins, maxs = recs[0]
        for bmin, bmax in recs[1:]:
            if self.momentum is None:
                mins, maxs = torch.minimum(mins, bmin), torch.maximum(maxs, bmax)
            else:
                m = self.momentum
                mins, maxs = m * mins + (1 - m) * bmin, m * maxs + (1 - m) * bmax
        return mins, maxs

    @property
    def min(self):
        return None if self.empty else self._reduce()[0]

    @property
    def max(self):
        return None if self.empty else self._reduce()[1]


class PercentileObserver(KeyedObserver):
    """Per-record lower/upper percentiles, averaged over records.

    ``kthvalue`` is used instead of ``torch.quantile`` so tensors of any size
    work. The percentile is taken per channel when ``ch_axis`` is set.

    Args:
        ch_axis (int | None): channel axis, ``None`` per tensor.
        percentile (float): upper percentile in (50, 100]; the lower one is
            ``100 - percentile``.
    """

    def __init__(self, ch_axis=None, percentile=99.99):
        super().__init__()
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f'percentile={percentile} must lie in (50, 100]')
        self.ch_axis = ch_axis
        self.percentile = percentile

    def record(self, x):
        x2d = move_channel_first(x.float(), self.ch_axis)
        n = x2d.shape[1]
        k_hi = max(1, min(n, int(round(n * self.percentile / 100.0))))
        k_lo = max(1, min(n, n + 1 - k_hi))
        return to_store(x2d.kthvalue(k_lo, dim=1).values), to_store(x2d.kthvalue(k_hi, dim=1).values)

    @property
    def min(self):
        return None if self.empty else torch.stack([r[0] for r in self.ordered()]).mean(0)

    @property
    def max(self):
        return None if self.empty else torch.stack([r[1] for r in self.ordered()]).mean(0)


class SampleStore(KeyedObserver):
    """A bounded, deterministic sample of ``(C, N)`` columns for searches.

    Searches (OMSE clipping, PTF factors, AdaLog bases) need data, not only
    extremes. Each record keeps an evenly strided subset of at most
    ``columns / expected_steps`` columns, where ``columns`` is
    ``max_columns`` or fewer so that the whole store stays within the
    policy's ``max_bytes`` (float32, ``C`` rows); :meth:`data` concatenates
    the records in key order and strides the result down to that budget.
    Records live on the policy's store device (:func:`store_policy`).

    Args:
        ch_axis (int | None): channel axis, ``None`` per tensor.
        max_columns (int): maximum columns kept per channel.
    """

    def __init__(self, ch_axis=None, max_columns=65536):
        super().__init__()
        self.ch_axis = ch_axis
        self.max_columns = max_columns
        self.budget = max_columns

    def _columns(self, channels):
        return max(1, min(self.max_columns, _Step.max_bytes // (4 * max(1, channels))))

    def record(self, x):
        x2d = move_channel_first(x.detach().float(), self.ch_axis)
        self.budget = self._columns(x2d.shape[0])
        cap = max(1, self.budget // _Step.expected)
        step = max(1, -(-x2d.shape[1] // cap))
        return to_store(x2d[:, ::step].clone())

    def data(self, device=None):
        """Return the stored ``(C, N)`` sample (``None`` if empty), on ``device``
        (default: where it is stored)."""
        if self.empty:
            return None
        data = torch.cat(self.ordered(), dim=1)
        step = max(1, -(-data.shape[1] // self.budget))
        data = data[:, ::step]
        return data if device is None else data.to(device)

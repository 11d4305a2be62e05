"""Peak resident memory of one phase of a run (FP eval vs quantized eval).

Three ways, the best the machine supports, chosen once per process by a probe
(:func:`method`):

* ``'hwm'`` (exact, free): on Linux the kernel's high-water mark ``VmHWM`` is
  reset to the current RSS by writing ``5`` to ``/proc/self/clear_refs``, so
  the peak of a phase is read at its end, with no sampling thread.
* ``'sampled'`` (approximate): where the reset is accepted but has no effect
  (seen on a sandboxed CI machine: the write succeeds, ``VmHWM`` keeps the
  lifetime peak) while ``VmRSS`` does follow allocations, a daemon thread
  samples ``VmRSS`` every few milliseconds; a spike shorter than the period
  can be missed, so ``exact`` is False.
* ``None``: neither counter follows allocations (or there is no ``/proc``);
  ``peak_mb`` is None and reports say "n/a" rather than a lifetime peak
  dressed up as a phase peak.

The probe touches a 64 MiB buffer and checks that ``VmRSS``/``VmHWM`` rise with
it and that the reset brings ``VmHWM`` back down, so a kernel whose counters
lie is detected instead of trusted.
"""
import threading
import time

_STATUS = '/proc/self/status'
_CLEAR_REFS = '/proc/self/clear_refs'
_PROBE_MB = 64
_SAMPLE_S = 0.002

_method = ...          # not probed yet


def _status_kb(key):
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm():
    try:
        with open(_CLEAR_REFS, 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _probe():
    """Return ``'hwm'``, ``'sampled'`` or None for this process (see module doc)."""
    if _status_kb('VmRSS') is None:
        return None
    need = _PROBE_MB * 1024 * 3 // 4             # KiB that must show up
    reset_ok = _reset_hwm()
    rss0, hwm0 = _status_kb('VmRSS'), _status_kb('VmHWM')
    buf = b'\x01' * (_PROBE_MB << 20)            # filled, so every page is touched
    rss1 = _status_kb('VmRSS')
    del buf
    hwm1 = _status_kb('VmHWM')
    rss_follows = rss1 - rss0 >= need
    if reset_ok and hwm0 is not None and hwm1 is not None and hwm1 - hwm0 >= need:
        _reset_hwm()
        hwm2 = _status_kb('VmHWM')
        if hwm2 is not None and hwm1 - hwm2 >= need:
            return 'hwm'
    return 'sampled' if rss_follows else None


def method():
    """The measurement this process uses: ``'hwm'``, ``'sampled'`` or None."""
    global _method
    if _method is ...:
        _method = _probe()
    return _method


class _Sampler(threading.Thread):

    def __init__(self, start_kb):
        super().__init__(daemon=True, name='mmvq-peak-rss')
        self.peak_kb = start_kb
        self._done = threading.Event()

    def run(self):
        while not self._done.is_set():
            kb = _status_kb('VmRSS')
            if kb is not None and kb > self.peak_kb:
                self.peak_kb = kb
            time.sleep(_SAMPLE_S)

    def finish(self):
        self._done.set()
        self.join()
        return self.peak_kb


class PeakRSS:
    """Context manager measuring the peak RSS (MiB) reached inside it.

    Attributes after exit: ``start_mb`` (RSS on entry, None without
    ``/proc``), ``peak_mb`` (peak RSS inside, None where this machine cannot
    measure a phase peak), ``method`` (see :func:`method`) and ``exact``
    (True only for the kernel high-water mark).
    """

    def __enter__(self):
        self.method = method()
        self.exact = self.method == 'hwm'
        self.peak_mb = None
        self._sampler = None
        if self.method == 'hwm':
            _reset_hwm()
        start_kb = _status_kb('VmRSS')
        self.start_mb = None if start_kb is None else start_kb / 1024
        if self.method == 'sampled':
            self._sampler = _Sampler(start_kb)
            self._sampler.start()
        return self

    def __exit__(self, *exc):
        if self.method == 'hwm':
            hwm = _status_kb('VmHWM')
            self.peak_mb = None if hwm is None else hwm / 1024
        elif self._sampler is not None:
            end_kb = _status_kb('VmRSS') or 0
            self.peak_mb = max(self._sampler.finish(), end_kb) / 1024
            self._sampler = None
        return False

    def as_dict(self):
        def r(v):
            return None if v is None else round(v, 1)
        return dict(start_mb=r(self.start_mb), peak_mb=r(self.peak_mb), method=self.method,
                    exact=self.exact)

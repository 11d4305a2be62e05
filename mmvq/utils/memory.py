"""Peak resident memory of one phase of a run (FP eval vs quantized eval).

On Linux the kernel's high-water mark (``VmHWM``) can be reset to the current
RSS by writing ``5`` to ``/proc/self/clear_refs``, so the peak of a phase is
exact and costs nothing while it runs (no sampling thread). Elsewhere the
process-lifetime ``ru_maxrss`` is reported, with ``exact=False``.

RSS counts pages the process holds, so memory malloc keeps after ``free``
(a previous phase's activations) is reused without raising it: a phase's
peak is how far RSS rose above what the process already held.
"""
import ctypes
import ctypes.util
import gc
import resource
import sys

_STATUS = '/proc/self/status'


def _status_kb(key):
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(key + ':'):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm():
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


class PeakRSS:
    """Context manager measuring the peak RSS (MiB) reached inside it.

    Attributes after exit: ``start_mb`` (RSS on entry), ``peak_mb`` (peak RSS
    inside), ``exact`` (False when only the lifetime peak was available).
    """

    def __enter__(self):
        self.exact = _reset_hwm() and _status_kb('VmHWM') is not None
        self.start_mb = (_status_kb('VmRSS') or 0) / 1024
        return self

    def __exit__(self, *exc):
        if self.exact:
            self.peak_mb = _status_kb('VmHWM') / 1024
        else:
            unit = 2 ** 20 if sys.platform == 'darwin' else 2 ** 10    # bytes vs KiB
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit
        return False

    def as_dict(self):
        return dict(start_mb=round(self.start_mb, 1), peak_mb=round(self.peak_mb, 1),
                    exact=self.exact)


def release_memory():
    """Hand memory freed by the caller back to the system.

    ``gc.collect()`` frees unreachable tensors; on CUDA the caching
    allocator's unused blocks are released (``torch.cuda.empty_cache``); on
    glibc, ``malloc_trim(0)`` returns free heap pages, which glibc otherwise
    keeps after large temporary allocations (calibration records, search
    candidates), inflating the RSS of everything that follows.
    """
    gc.collect()
    torch = sys.modules.get('torch')
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def _libc():
    if not sys.platform.startswith('linux'):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        return lib if hasattr(lib, 'malloc_trim') else None
    except OSError:
        return None

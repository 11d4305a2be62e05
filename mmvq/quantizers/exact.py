"""Per-device representation of the bit-exact integer paths (dtype policy).

FQ-ViT's integer paths (Log-Int-Softmax, integer LayerNorm) are defined on
integers. mmvq holds them either in **int64** (the definition, exact for
every input) or in **float64** where every intermediate is an integer below
2^53 (exact, proven per function and tested bit for bit against int64).
Which is faster depends on the device:

* CPU: float64 (int64 division and the ``log2`` of the int64 path are
  slow; float64 element-wise ops vectorise) — about 2x on LIS.
* CUDA GPUs with full-rate FP64 (compute capability 6.0 P100, 7.0 V100,
  8.0 A100, 9.0 H100/H200, 10.0 B200): float64.
* Every other accelerator (consumer and workstation GPUs run FP64 at
  1/32-1/64 of FP32; MPS has no float64): int64.

Narrower types do not fit the ranges: LIS row sums reach ``N c' 2^30``
(far beyond 2^31 and 2^24), and integer LayerNorm's ``M x + B`` before the
final shift reaches ``2^8 2^11 + |B|`` with ``|B|`` up to ``2^39``, so
neither int32 nor float32 is exact there (integer LayerNorm's per-row
dyadic coefficients are float64 by definition, as in the reference, on every
device). :func:`set_integer_dtype` forces one representation (tests run
both on CPU).

Temporaries are bounded by processing rows in slices of
:func:`chunk_elems` elements (2^18 on CPU, 2^24 on accelerators): tens of
MB of temporaries on CPU instead of GBs for a 1333x800 detector.
"""
import functools

import torch

# (major, minor) compute capabilities with full-rate FP64
FAST_FP64 = {(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)}
CHUNK_ELEMS = {'cpu': 1 << 18, 'accelerator': 1 << 24}
_FORCED = [None]


def set_integer_dtype(dtype):
    """Force ``torch.float64`` or ``torch.int64`` everywhere (``None``: per device)."""
    if dtype not in (None, torch.float64, torch.int64):
        raise ValueError(f'integer dtype must be torch.float64, torch.int64 or None, got {dtype}')
    _FORCED[0] = dtype


@functools.lru_cache(maxsize=None)
def _device_dtype(dev_type, index):
    if dev_type == 'cpu':
        return torch.float64
    if dev_type == 'cuda' and torch.cuda.is_available():
        cap = torch.cuda.get_device_capability(index if index is not None else torch.cuda.current_device())
        return torch.float64 if tuple(cap) in FAST_FP64 else torch.int64
    return torch.int64


def integer_dtype(device):
    """The representation of the exact integer paths on ``device``."""
    if _FORCED[0] is not None:
        return _FORCED[0]
    device = torch.device(device)
    return _device_dtype(device.type, device.index)


def chunk_elems(device):
    """Elements per slice of the integer paths on ``device``."""
    return CHUNK_ELEMS['cpu' if torch.device(device).type == 'cpu' else 'accelerator']


__all__ = ['integer_dtype', 'set_integer_dtype', 'chunk_elems', 'FAST_FP64']

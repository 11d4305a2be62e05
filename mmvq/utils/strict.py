"""Device-strict and host-sync checks for mmvq's own code (tests, debugging).

Running on a GPU fails in two ways that a CPU run never shows: a tensor made
without naming a device lands on the default device (the CPU) and the first
op mixing it with CUDA data raises; and a tensor read back to the host
(``bool(t)``, ``t.item()``, ``float(t)`` ...) makes the host wait for the
device, in every layer of every image. Both are found on CPU with a
``TorchFunctionMode`` that sees every torch call and attributes it to the
first calling frame outside torch:

* :func:`device_strict`: a tensor factory (``torch.zeros``, ``arange``,
  ``tensor`` ...) called from a file under ``roots`` (default: the mmvq
  package) without ``device=`` raises :class:`ImplicitDeviceError` naming
  the file and line. ``with torch.device(d):`` counts as naming the device
  (it fills ``device=`` before the call reaches this mode), which is how
  ``mmvq.convert`` builds quantizer buffers on the wrapped module's device.
  ``meta_default=True`` additionally sets the global default device to
  ``meta`` (the user-level check: any tensor anyone makes without a device
  becomes a meta tensor and fails when it meets real data); use it where the
  host library is meta-clean (mmpretrain's ViT), not for mmdet detectors.
* :func:`count_host_syncs`: counts (and records the call sites of) the calls
  that read device data on the host, made from ``roots``.
"""
import contextlib
import os.path as osp
import sys

import torch
from torch.overrides import TorchFunctionMode

MMVQ_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TORCH_ROOT = osp.dirname(osp.abspath(torch.__file__))

FACTORIES = frozenset(getattr(torch, name) for name in (
    'zeros', 'ones', 'empty', 'full', 'arange', 'range', 'linspace', 'logspace', 'tensor',
    'as_tensor', 'scalar_tensor', 'eye', 'rand', 'randn', 'randint', 'randperm', 'normal',
    'empty_strided', 'tril_indices', 'triu_indices') if hasattr(torch, name))

# reads of device data by the host: each is a synchronisation on CUDA
SYNC_NAMES = frozenset(('__bool__', 'item', '__float__', '__int__', '__index__', 'tolist', 'cpu',
                        'numpy', 'nonzero', 'masked_select', 'unique', 'unique_consecutive',
                        'equal', 'allclose'))


class ImplicitDeviceError(RuntimeError):
    """A tensor factory in checked code named no device."""


def _caller(roots):
    """``(file, line, function)`` of the first frame outside torch and this file,
    if it lies under one of ``roots``; else ``None``."""
    frame = sys._getframe(2)
    here = osp.abspath(__file__)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(TORCH_ROOT) and path != here and not path.startswith('<'):
            if any(path.startswith(r) for r in roots):
                return path, frame.f_lineno, frame.f_code.co_name
            return None
        frame = frame.f_back
    return None


class _StrictMode(TorchFunctionMode):

    def __init__(self, roots):
        super().__init__()
        self.roots = tuple(roots)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get('device') is None:
            where = _caller(self.roots)
            if where is not None:
                raise ImplicitDeviceError(
                    f'{func.__name__}() without device= at {where[0]}:{where[1]} ({where[2]}): '
                    'name the device of the data or module it meets')
        return func(*args, **kwargs)


class _SyncCounter(TorchFunctionMode):

    def __init__(self, roots):
        super().__init__()
        self.roots = tuple(roots)
        self.sites = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, '__name__', '')
        sync = name in SYNC_NAMES
        if name == '__getitem__' and len(args) > 1:          # boolean-mask indexing
            idx = args[1] if isinstance(args[1], tuple) else (args[1], )
            sync = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)
        if name == 'to' and any(_is_cpu(a) for a in list(args[1:]) + list(kwargs.values())):
            sync = True                                        # a copy to the host
        if sync:
            where = _caller(self.roots)
            if where is not None:
                self.sites.append(f'{name} at {osp.relpath(where[0], osp.dirname(MMVQ_ROOT))}:'
                                  f'{where[1]} ({where[2]})')
        return func(*args, **kwargs)


def _is_cpu(a):
    return (isinstance(a, str) and a.startswith('cpu')) or (
        isinstance(a, torch.device) and a.type == 'cpu')


@contextlib.contextmanager
def device_strict(roots=(MMVQ_ROOT, ), meta_default=False):
    """Raise on tensor factories without a device in code under ``roots``.

    Args:
        roots (Sequence[str]): folders whose code is checked (default mmvq).
        meta_default (bool): also make ``meta`` the global default device.
    """
    old = torch.get_default_device()
    if meta_default:
        torch.set_default_device('meta')
    try:
        with _StrictMode(roots):
            yield
    finally:
        if meta_default:
            torch.set_default_device(old)


@contextlib.contextmanager
def count_host_syncs(roots=(MMVQ_ROOT, )):
    """Record host reads of tensor data made from code under ``roots``.

    Yields a list that fills with ``'<op> at <file>:<line> (<function>)'``
    entries (an empty list: no synchronisation). Reads of CPU tensors count
    too: on CPU they are free, but the same line waits for the device on a
    GPU, which is what this check is for.
    """
    mode = _SyncCounter(roots)
    with mode:
        yield mode.sites

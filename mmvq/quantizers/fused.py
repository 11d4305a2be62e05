"""Fused fake quantization on the CPU: one pass over the data per quantizer.

The eager quantizers are chains of element-wise PyTorch ops (uniform: 4
passes; LIS ~25; integer LayerNorm ~20; AdaLog ~8; IGQ ~12), each a
memory-bound pass with its own temporary. ``fused_cpu.c`` holds one loop
nest per quantizer family that repeats the eager operations in the same
IEEE order on each element while it is in registers:

============================  =======================================  ==============
quantizer                     kernel                                   equal to eager
============================  =======================================  ==============
uniform (tensor/channel/head) ``mmvq_fq`` (strided input)              bit for bit
PTF (fake quant)              ``mmvq_fq`` with ``s 2^alpha``           bit for bit
integer LayerNorm             ``mmvq_int_ln`` (PTF codes + LN, a row)  bit for bit
LIS (logits quantizer + LIS)  ``mmvq_lis`` (a row of logits)           bit for bit
IGQ (rows / channels)         ``mmvq_igq_rows`` / ``_channels``        bit for bit
AdaLog (and shifted)          ``mmvq_adalog`` (threshold count)        bit for bit
============================  =======================================  ==============

AdaLog: both paths round the exact logarithm, ``round(-log2(t) r / q)`` =
the number of thresholds ``2^(-(j + 1/2) q / r)`` (float64, rounded down
to float32) that ``t`` does not exceed; the kernel counts them, the eager
code corrects its float32 ``log2`` guess with one comparison each side
(:mod:`mmvq.quantizers.adalog`; the official code's float32 rounding
differs only within ``1e-5`` of a half-integer).

**Build.** At first use the C source is compiled (``cc -O3 -march=native
-fopenmp -ffp-contract=off``; no multiply-add contraction, so no product is
rounded differently) into ``~/.cache/mmvq/kernels/<hash>.so`` (the hash
covers the source, the compiler and the CPU's feature flags) and loaded
with ``ctypes``; later processes load the cached library. The compile time
is recorded (:func:`build_info`). If there is no compiler or the build
fails, mmvq warns once and every quantizer stays on its eager code.

**When it is used.** A quantizer's ``fused`` flag (``quant.fused`` in the
quantization block, default ``True``; ``--cfg-options quant.fused=False``
turns it off) and :func:`use_fused` of the input: a contiguous-last-axis
float32 CPU tensor outside autograd (calibration searches that
differentiate keep the eager code). Other devices run the eager code (GPU
kernels are not part of this module). ``MMVQ_FUSED=0`` in the environment
turns it off process-wide.
"""
import collections
import ctypes
import hashlib
import os
import os.path as osp
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings

import torch

SRC = osp.join(osp.dirname(osp.abspath(__file__)), 'fused_cpu.c')
FLAGS = ['-O3', '-march=native', '-fopenmp', '-ffp-contract=off', '-fno-math-errno',
         '-fno-trapping-math', '-fPIC', '-shared', '-std=c99']
_LOCK = threading.Lock()
_STATE = dict(lib=None, tried=False, info=None)
# kernel calls per kernel name, for tests and reports (an int increment per call)
CALLS = collections.Counter()

f32p = ctypes.c_void_p
i64 = ctypes.c_int64
SIGNATURES = dict(
    mmvq_fq=[f32p, f32p, i64, i64, i64, i64, i64, i64, i64, f32p, f32p] + [i64] * 8
    + [ctypes.c_float, ctypes.c_float, ctypes.c_int],
    mmvq_int_ln=[f32p, f32p, i64, i64, f32p, f32p, f32p, ctypes.c_float, f32p, f32p, f32p, f32p,
                 ctypes.c_double, ctypes.c_double, ctypes.c_int, ctypes.c_int, ctypes.c_int],
    mmvq_lis=[f32p, f32p, i64, i64, f32p, f32p, ctypes.c_float, ctypes.c_float, ctypes.c_double,
              f32p, f32p, ctypes.c_double, ctypes.c_double, ctypes.c_double, ctypes.c_int,
              ctypes.c_int, f32p, ctypes.c_int],
    mmvq_adalog=[f32p, f32p, i64, f32p, f32p, f32p, ctypes.c_int, f32p, ctypes.c_int, ctypes.c_int],
    mmvq_igq_rows=[f32p, f32p, i64, i64, f32p, f32p, f32p, i64, ctypes.c_float, ctypes.c_float,
                   ctypes.c_int],
    mmvq_igq_channels=[f32p, f32p, i64, i64, i64, f32p, f32p, f32p, i64, ctypes.c_float,
                       ctypes.c_float, ctypes.c_int],
)
# below this many elements one thread does the work (thread start-up costs more)
PARALLEL_MIN = 1 << 15


def _cpu_flags():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith(('flags', 'Features')):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler():
    for cc in (os.environ.get('MMVQ_CC'), os.environ.get('CC'), 'cc', 'gcc', 'clang'):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def cache_dir():
    return os.environ.get('MMVQ_KERNEL_CACHE') or osp.join(osp.expanduser('~'), '.cache', 'mmvq',
                                                            'kernels')


def _build():
    """Compile (or find) the library; returns ``(lib, info)``, ``lib`` None on failure."""
    t0 = time.perf_counter()
    cc = _compiler()
    if cc is None:
        return None, dict(error='no C compiler found (set CC or MMVQ_CC)')
    with open(SRC, 'rb') as f:
        src = f.read()
    key = hashlib.sha256(src + cc.encode() + ' '.join(FLAGS).encode()
                         + _cpu_flags().encode() + platform.machine().encode()).hexdigest()[:16]
    path = osp.join(cache_dir(), f'mmvq_fused_{key}.so')
    cached = osp.exists(path)
    if not cached:
        os.makedirs(cache_dir(), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix='.so', dir=cache_dir())
        os.close(fd)
        proc = subprocess.run([cc, *FLAGS, SRC, '-o', tmp, '-lm'], capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            return None, dict(error=f'{osp.basename(cc)} failed: {msg[-1] if msg else proc.returncode}')
        os.replace(tmp, path)                   # atomic: never a half-written library
    try:
        lib = ctypes.CDLL(path)
        for name, argtypes in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, None
    except (OSError, AttributeError) as e:
        return None, dict(error=f'loading {path} failed: {e}')
    return lib, dict(path=path, cached=cached, compile_s=round(time.perf_counter() - t0, 3),
                     compiler=cc)


def kernels():
    """The loaded kernel library, or ``None`` (built once per process; one
    warning if that fails)."""
    if _STATE['tried']:
        return _STATE['lib']
    with _LOCK:
        if not _STATE['tried']:
            try:
                lib, info = _build()
            except Exception as e:            # noqa: BLE001 - never crash an evaluation
                lib, info = None, dict(error=f'{type(e).__name__}: {e}')
            _STATE.update(lib=lib, info=info, tried=True)
            if lib is None:
                warnings.warn(f'mmvq fused kernels unavailable ({info["error"]}); quantizers run '
                              'their eager PyTorch code', RuntimeWarning, stacklevel=3)
    return _STATE['lib']


def build_info():
    """``dict(path, cached, compile_s, compiler)`` or ``dict(error)``; None if never built."""
    return _STATE['info']


def reset():
    """Forget the loaded library (tests; a later call builds again)."""
    _STATE.update(lib=None, tried=False, info=None)


def fused_record(quantizers):
    """The ``results.json`` record: how many of ``quantizers`` may run fused,
    whether the environment turned it off, and the kernel build (path,
    whether it was cached, compile seconds) or why it failed."""
    qs = [q for q in quantizers if q.enabled]
    on = sum(1 for q in qs if getattr(q, 'fused', False))
    return dict(enabled=bool(on) and enabled_by_env(), quantizers=len(qs), fused_quantizers=on,
                env_off=not enabled_by_env(), kernels=build_info(),
                scope='CPU float32 tensors; other devices run the eager code')


def enabled_by_env():
    """``MMVQ_FUSED`` is not 0/false/no/off (read at import; :func:`refresh_env` re-reads)."""
    return _ENV[0]


def refresh_env():
    _ENV[0] = os.environ.get('MMVQ_FUSED', '1').strip().lower() not in ('0', 'false', 'no', 'off')
    return _ENV[0]


_ENV = [True]
refresh_env()


def use_fused(quantizer, x):
    """Whether ``quantizer`` may run its fused kernel on ``x`` (float32 CPU
    tensor, last or second-last axis contiguous, no gradient wanted, kernels
    available and not turned off by ``MMVQ_FUSED=0``)."""
    return (getattr(quantizer, 'fused', False) and x.is_cpu and x.dtype == torch.float32
            and x.dim() > 0 and x.numel() > 0
            and (x.stride(-1) == 1 or x.shape[-1] == 1 or x.dim() >= 2 and x.stride(-2) == 1)
            and not (x.requires_grad and torch.is_grad_enabled())
            and (_STATE['lib'] is not None if _STATE['tried'] else kernels() is not None)
            and _ENV[0])


def threads_for(numel):
    return torch.get_num_threads() if numel >= PARALLEL_MIN else 1


def _call(name, *args):
    """Run kernel ``mmvq_<name>``; under torch.profiler it is a labelled range
    (``mmvq.fused::<name>``) inside its quantizer's."""
    CALLS[name] += 1
    fn = getattr(_STATE['lib'], 'mmvq_' + name)
    if torch._C._autograd._profiler_enabled():
        with torch.profiler.record_function('mmvq.fused::' + name):
            return fn(*args)
    return fn(*args)


def ptr(t):
    return ctypes.c_void_p(t.data_ptr())


# ---------------------------------------------------------------- kernels
def _as4d(t):
    """``t`` with exactly 4 dims: leading dims merged (a view where strides
    allow, else a copy) or leading 1-dims added (a view)."""
    if t.dim() > 4:
        t = t.flatten(0, t.dim() - 4)
    return t.reshape((1, ) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t


def _param4d(p, x):
    """``p`` (broadcastable to ``x``) as a 4-D view expanded to ``x``'s shape
    whose strides index ``p``'s own storage, or ``None``."""
    if p.dim() > x.dim():
        return None
    if x.dim() > 4:
        if p.numel() != 1:
            return None
        v = p.reshape(()).expand((1, 1, 1, 1))
    else:
        v = _as4d(p.reshape((1, ) * (x.dim() - p.dim()) + tuple(p.shape)).expand(x.shape))
    if v is None or v.data_ptr() != p.data_ptr() or v.stride(3) not in (0, 1):
        return None
    return v.stride()


def _fq_plan(x, scale, zero_point, qmin, qmax):
    """The kernel arguments of :func:`fake_quant_planned` for ``x``'s layout
    (all but the data pointers and the thread count), or ``None``."""
    if not isinstance(zero_point, torch.Tensor) or scale.dtype != torch.float32 \
            or zero_point.dtype != torch.float32:
        return None
    transposed = x.dim() >= 2 and x.stride(-1) != 1 and x.stride(-2) == 1
    if transposed:
        # a transposed operand (k^T): quantize its transpose, return the view
        scale = scale.reshape((1, ) * (x.dim() - scale.dim()) + tuple(scale.shape)).mT
        zero_point = zero_point.reshape((1, ) * (x.dim() - zero_point.dim())
                                        + tuple(zero_point.shape)).mT
        x = x.mT
    if x.dim() > 4 and not x.is_contiguous():
        return None
    x4 = _as4d(x)
    ss, zs = _param4d(scale, x), _param4d(zero_point, x)
    if ss is None or zs is None or x4.stride(3) != 1 and x4.shape[3] != 1 \
            or x4.data_ptr() != x.data_ptr():
        return None
    d0, d1, d2, L = x4.shape
    xs = x4.stride()
    args = (d0, d1, d2, L, xs[0], xs[1], xs[2], scale.data_ptr(), zero_point.data_ptr(), *ss, *zs,
            float(qmin), float(qmax))
    return transposed, tuple(x.shape), args, (scale, zero_point)


def _run_fq(x, plan, inplace=False):
    transposed, shape, args, _ = plan
    if inplace and not transposed and x.is_contiguous():
        y = x                       # element i is read before it is written
    else:
        y = torch.empty(shape, dtype=torch.float32, device=x.device)
    _call('fq', x.data_ptr(), y.data_ptr(), *args, threads_for(x.numel()))
    return y.mT if transposed else y


def fake_quant_planned(owner, x, params, views, qmin, qmax, inplace=False):
    """Fused :func:`mmvq.quantizers.uniform.fake_quant_affine` (float32 scale
    and zero point broadcastable to ``x``; ``None`` where the layout does not
    fit the kernel and the caller runs the eager code), its kernel arguments cached on ``owner``
    per input layout and per version of the parameter tensors ``params``
    (``views()`` gives the broadcastable scale and zero point on a miss; the
    plan keeps them alive): a call costs a dictionary lookup, an allocation
    and the kernel, about 20 us less than building the views each time.
    ``inplace``: write the result into ``x`` when it is contiguous (the
    caller owns ``x``, e.g. a layer's fresh output)."""
    key = (x.shape, x.stride()) + tuple((id(t), t._version) for t in params)
    plans = owner.__dict__.setdefault('_mmvq_fq_plans', {})
    plan = plans.get(key)
    if plan is None:
        if len(plans) > 32:
            plans.clear()
        plan = plans[key] = _fq_plan(x, *views(), qmin, qmax) or False
    return None if plan is False else _run_fq(x, plan, inplace)


def int_layer_norm(x, iq, oq, weight, bias, zero_weight, m_bits=8):
    """Fused PTF codes + :func:`mmvq.quantizers.ptf.int_layer_norm` (dequantized output)."""
    x = x.contiguous()
    c = x.shape[-1]
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    w = weight.detach().float().contiguous()
    b = bias.detach().float().contiguous()
    alpha = iq.alpha.long().contiguous()
    _call('int_ln', ptr(x), ptr(y), x.numel() // c, c, ptr(iq.scale), ptr(iq.zero_point),
          ptr(alpha), float(iq.qmax), ptr(w), ptr(b), ptr(oq.scale), ptr(oq.zero_point),
          float(oq.qmin), float(oq.qmax), int(zero_weight), m_bits, threads_for(x.numel()))
    return y


def mask_offsets(mask, shape):
    """Offsets (elements) of every row's mask in ``mask``'s storage."""
    m = mask.expand(shape)
    offs = torch.zeros(shape[:-1], dtype=torch.int64, device=mask.device)
    for d, (n, st) in enumerate(zip(shape[:-1], m.stride()[:-1])):
        if st and n > 1:
            view = [1] * (len(shape) - 1)
            view[d] = n
            offs += torch.arange(n, dtype=torch.int64, device=mask.device).reshape(view) * st
    return offs.reshape(-1).contiguous()


def lis_softmax(x, iq, scale, bits, n, consts, table, mask=None, offsets=None):
    """Fused logits fake quantization + :func:`mmvq.quantizers.lis.lis_softmax`
    (float64 path; the caller checks it is exact). ``mask``: float32 with
    a contiguous last axis of the logits' length, ``offsets`` its
    :func:`mask_offsets` (:func:`mmvq.quantizers.lis.lis_fused` prepares both)."""
    x = x.contiguous()
    N = x.shape[-1]
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    x0, b_int, c_int = consts
    masked = mask is not None
    _call('lis', ptr(x), ptr(y), x.numel() // N, N, ptr(iq.scale), ptr(iq.zero_point),
          float(iq.qmin), float(iq.qmax), float(scale), ptr(mask) if masked else None,
          ptr(offsets) if masked else None, float(x0), float(b_int), float(c_int), int(n),
          int(bits), ptr(table), threads_for(x.numel()))
    return y


def adalog(x, scale, shift, thresholds, levels, lut, unshift):
    """Fused AdaLog fake quantization (``thresholds``: ``levels + 2`` float32
    entries, see ``fused_cpu.c``; ``lut``: at least ``max(17, levels + 1)``)."""
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _call('adalog', ptr(x), ptr(y), x.numel(), ptr(scale), ptr(shift), ptr(thresholds),
          int(levels), ptr(lut), int(unshift), threads_for(x.numel()))
    return y


def igq(x, q, rows):
    """Fused IGQ fake quantization: ``rows`` (units are rows of the last
    axis, or of the flattened spatial axes of a 4-D input) or channels."""
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    # the buffers' length, not ``num_groups``: IGQ allocation gives layers other
    # group counts, and a loaded checkpoint brings its buffers' shapes
    args = (ptr(q.centres), ptr(q.scale), ptr(q.zero_point), q.centres.shape[0], float(q.qmin),
            float(q.qmax), threads_for(x.numel()))
    x = x.contiguous()
    if rows:
        m = x.shape[-1] if x.dim() != 4 or q.unit == 'row' else x.shape[2] * x.shape[3]
        _call('igq_rows', ptr(x), ptr(y), x.numel() // m, m, *args)
    else:
        _call('igq_channels', ptr(x), ptr(y), x.shape[0], x.numel() // (x.shape[0] * x.shape[-1]),
              x.shape[-1], *args)
    return y

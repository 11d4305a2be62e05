"""mmvq's onnxruntime custom operators: build, find, register.

``ort_ops.c`` wraps the fused integer kernels of
:mod:`mmvq.quantizers.fused` (``fused_cpu.c``, the loops mmvq's own CPU
evaluation runs) as onnxruntime operators in the ``mmvq`` domain
(``IntLayerNorm``, ``IntLayerNormS8``, ``FakeQuantRow``, ``LogIntSoftmax``,
``AdaLog``, ``IGQ``; :mod:`mmvq.deploy.export` writes them with
``custom_ops=True``). It is compiled at first use against onnxruntime's C API
header into ``~/.cache/mmvq/kernels/mmvq_ort_<hash>.so``, like the fused
kernels.

**The header.** onnxruntime's wheels carry no headers. mmvq uses the C API
header of Debian's ``libonnxruntime-dev`` package (version
:data:`HEADER_VERSION`, C API version 21): found in ``MMVQ_ORT_INCLUDE``,
``/usr/include/onnxruntime`` or mmvq's cache, else fetched once from
Debian's archive and checked against its SHA-256 (:func:`fetch_header`;
``tools/setup_env.sh`` does it at set-up). onnxruntime's C API is
append-only — ``OrtApiBase::GetApi(N)`` serves every API version up to the
runtime's own — so a library built against API 21 runs in onnxruntime 1.21
and later; :func:`library` refuses an older runtime with one line.
"""
import ctypes
import hashlib
import io
import os
import os.path as osp
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.request

from ..quantizers import fused as _fused
from ..utils.optional import require

SRC = osp.join(osp.dirname(osp.abspath(__file__)), 'ort_ops.c')
KERNELS_SRC = _fused.SRC
DOMAIN = 'mmvq'
#: Debian's libonnxruntime-dev (trixie) whose C API header mmvq builds against
HEADER_VERSION = '1.21.0'
HEADER_API = 21
HEADER_DEB = ('http://deb.debian.org/debian/pool/main/o/onnxruntime/'
              'libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb')
HEADER_SHA256 = '14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08'
HEADER = 'onnxruntime_c_api.h'
# no OpenMP runtime inside onnxruntime (its own thread pool splits the rows);
# the kernels' simd loops stay vectorised
FLAGS = ['-O3', '-march=native', '-fopenmp-simd', '-ffp-contract=off', '-fno-math-errno',
         '-fno-trapping-math', '-fPIC', '-shared', '-std=c99', '-Wno-unknown-pragmas']
_LOCK = threading.Lock()
_STATE = dict(path=None, error=None, info=None)


def _cache():
    return osp.join(osp.expanduser('~'), '.cache', 'mmvq')


def header_dir():
    """The folder holding ``onnxruntime_c_api.h`` (no download), or ``None``."""
    for d in (os.environ.get('MMVQ_ORT_INCLUDE'), '/usr/include/onnxruntime',
              osp.join(_cache(), f'onnxruntime-{HEADER_VERSION}', 'include')):
        if d and osp.isfile(osp.join(d, HEADER)):
            return d
    return None


def _ar_members(data):
    """``{name: bytes}`` of a Unix ``ar`` archive (a ``.deb``)."""
    if not data.startswith(b'!<arch>\n'):
        raise ValueError('not an ar archive')
    out, pos = {}, 8
    while pos + 60 <= len(data):
        head = data[pos:pos + 60]
        name = head[:16].decode().strip().rstrip('/')
        size = int(head[48:58].decode().strip())
        out[name] = data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    return out


def fetch_header(url=HEADER_DEB, sha256=HEADER_SHA256, timeout=60, dest=None):
    """Download Debian's ``libonnxruntime-dev``, check its SHA-256 and unpack
    its headers into ``dest`` (default: mmvq's cache); returns the include folder."""
    dest = dest or osp.join(_cache(), f'onnxruntime-{HEADER_VERSION}', 'include')
    if osp.isfile(osp.join(dest, HEADER)):
        return dest
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            data = r.read()
    except OSError as e:
        raise RuntimeError(f'fetching onnxruntime\'s C API header ({url}) failed: {e}; set '
                           'MMVQ_ORT_INCLUDE to a folder holding onnxruntime_c_api.h') from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise RuntimeError(f'{url}: sha256 {digest}, expected {sha256}: not the package mmvq '
                           'was checked against; set MMVQ_ORT_INCLUDE instead')
    members = _ar_members(data)
    tar_name = next(n for n in members if n.startswith('data.tar'))
    os.makedirs(osp.dirname(dest), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=osp.dirname(dest))
    with tarfile.open(fileobj=io.BytesIO(members[tar_name])) as tar:
        for m in tar.getmembers():
            if m.isfile() and '/usr/include/onnxruntime/' in '/' + m.name.lstrip('./') and \
                    m.name.endswith('.h'):
                rel = m.name.split('usr/include/onnxruntime/', 1)[1]
                path = osp.join(tmp, rel)
                os.makedirs(osp.dirname(path), exist_ok=True)
                with open(path, 'wb') as f:
                    f.write(tar.extractfile(m).read())
    try:
        os.replace(tmp, dest)              # atomic: never a half-unpacked header folder
    except OSError:
        if not osp.isfile(osp.join(dest, HEADER)):
            raise
    return dest


def _runtime_version():
    import onnxruntime as ort
    return tuple(int(p) for p in ort.__version__.split('+')[0].split('.')[:2])


def _build():
    t0 = time.perf_counter()
    cc = _fused._compiler()
    if cc is None:
        raise RuntimeError('mmvq custom ops: no C compiler found (set CC or MMVQ_CC), or export '
                           'with custom_ops=False')
    inc = header_dir() or fetch_header()
    with open(SRC, 'rb') as f, open(KERNELS_SRC, 'rb') as g, open(osp.join(inc, HEADER), 'rb') as h:
        src = f.read() + g.read() + h.read()
    key = hashlib.sha256(src + cc.encode() + ' '.join(FLAGS).encode()
                         + _fused._cpu_flags().encode()).hexdigest()[:16]
    cache = _fused.cache_dir()
    path = osp.join(cache, f'mmvq_ort_{key}.so')
    cached = osp.exists(path)
    if not cached:
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix='.so', dir=cache)
        os.close(fd)
        proc = subprocess.run([cc, *FLAGS, f'-I{inc}', SRC, '-o', tmp, '-lm'], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise RuntimeError(f'building mmvq custom ops failed ({osp.basename(cc)}: '
                               f'{msg[-1] if msg else proc.returncode})')
        os.replace(tmp, path)
    api = ctypes.CDLL(path).mmvq_ort_api_version()
    return path, dict(path=path, cached=cached, compile_s=round(time.perf_counter() - t0, 3),
                      header=inc, api_version=api)


def library():
    """Path of the built custom-op library (built once per process)."""
    require('onnxruntime')
    if _STATE['path'] is None:
        with _LOCK:
            if _STATE['path'] is None:
                if _runtime_version() < (1, 21):
                    import onnxruntime as ort
                    raise RuntimeError(f'mmvq custom ops need onnxruntime >= 1.21 (C API '
                                       f'{HEADER_API}); this is {ort.__version__}: upgrade it or '
                                       'export with custom_ops=False')
                _STATE['path'], _STATE['info'] = _build()
    return _STATE['path']


def build_info():
    """``dict(path, cached, compile_s, header, api_version)`` once built, else ``None``."""
    return _STATE['info']


def available():
    """Whether the custom ops can be built and loaded here (builds them)."""
    try:
        library()
        return True
    except (RuntimeError, ImportError, OSError):
        return False


def uses_custom_ops(proto):
    """Whether an ONNX model has nodes of the ``mmvq`` domain."""
    return any(n.domain == DOMAIN for n in proto.graph.node)


def register(options):
    """Register the library with onnxruntime ``SessionOptions``."""
    options.register_custom_ops_library(library())
    return options


__all__ = ['DOMAIN', 'library', 'build_info', 'available', 'register', 'uses_custom_ops',
           'header_dir', 'fetch_header']

"""Atomic file writes and hashing (no mmvq imports).

Writes go through a temporary file in the destination folder, then
``os.replace``: a crash mid-write leaves any previous file intact, never a
half-written one.
"""
import hashlib
import os
import os.path as osp
import tempfile


def atomic_write(path, mode, write):
    """Write via a temporary file in the same folder, then ``os.replace``."""
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.' + osp.basename(path) + '.', suffix='.tmp', dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the permissions open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj, path):
    """``torch.save`` to ``path`` atomically."""
    import torch
    atomic_write(path, 'wb', lambda f: torch.save(obj, f))


def atomic_write_text(text, path):
    """Write a text file atomically."""
    atomic_write(path, 'w', lambda f: f.write(text))


def file_sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()

"""Shared helpers of the benchmark datasets: stamped, atomic dataset folders."""
import json
import os
import os.path as osp
import shutil


def partial_dir(out):
    """A fresh ``<out>.partial`` folder to build a dataset in."""
    tmp = out.rstrip('/') + '.partial'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def publish(tmp, out):
    """Swap a finished dataset into place (never a half-written dataset)."""
    if osp.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)


def ensure_stamped(out, want, build):
    """Run ``build()`` unless ``out/STAMP.json`` already records ``want``."""
    stamp = osp.join(out, 'STAMP.json')
    if osp.isfile(stamp):
        with open(stamp) as f:
            if json.load(f) == want:
                return out
    build()
    with open(stamp, 'w') as f:
        json.dump(want, f)
    return out

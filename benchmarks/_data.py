"""Shared helpers of the benchmarks: stamped, atomic dataset folders; result tables."""
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


def write_table(work_dir, stem, rows, table):
    """``<stem>.json`` (the rows) and ``<stem>.md`` (the table) in ``work_dir``,
    each written atomically; the table is printed."""
    from mmvq.utils.io import atomic_write_text
    os.makedirs(work_dir, exist_ok=True)
    atomic_write_text(json.dumps(rows, indent=2, default=str) + '\n', osp.join(work_dir, stem + '.json'))
    atomic_write_text(table, osp.join(work_dir, stem + '.md'))
    print(table)

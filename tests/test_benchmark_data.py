"""Benchmark data: the generated shapes set is deterministic and consistent,
Fashion-MNIST IDX decoding, and the per-phase peak-memory probe."""
import gzip
import hashlib
import json
import mmap
import os.path as osp
import struct
import sys

import numpy as np
import pytest

from helpers import ROOT

sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
import fashion_mnist  # noqa: E402
import shapes  # noqa: E402


def _digest(folder):
    h = hashlib.sha256()
    for split in ('train', 'val'):
        for name in sorted(__import__('os').listdir(osp.join(folder, split))):
            with open(osp.join(folder, split, name), 'rb') as f:
                h.update(f.read())
    for split in ('train', 'val'):
        with open(osp.join(folder, 'annotations', f'instances_{split}.json'), 'rb') as f:
            h.update(f.read())
    return h.hexdigest()


def test_shapes_dataset_is_deterministic_and_consistent(tmp_path):
    from pycocotools import mask as mask_utils
    a, b, c = (str(tmp_path / n) for n in 'abc')
    shapes.make_det(a, n_train=3, n_val=2, seed=0)
    shapes.make_det(b, n_train=3, n_val=2, seed=0)
    shapes.make_det(c, n_train=5, n_val=2, seed=0)
    assert _digest(a) == _digest(b)
    # the held-out split does not depend on the train size
    for i in (1, 2):
        assert open(osp.join(a, 'val', f'{i - 1:06d}.png'), 'rb').read() == \
            open(osp.join(c, 'val', f'{i - 1:06d}.png'), 'rb').read()
    ann = json.load(open(osp.join(a, 'annotations', 'instances_train.json')))
    assert [c['name'] for c in ann['categories']] == list(shapes.SHAPES)
    assert len(ann['images']) == 3 and len(ann['annotations']) >= 3
    for an in ann['annotations']:
        m = mask_utils.decode(an['segmentation'])
        ys, xs = np.nonzero(m)
        x0, y0, w, h = an['bbox']
        assert (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (x0, y0, w, h)
        assert int(m.sum()) == an['area'] >= 30 and an['iscrowd'] == 0
    assert not osp.exists(a + '.partial')


def test_fashion_mnist_idx_decoding_and_layout(tmp_path, monkeypatch):
    cache = tmp_path / 'cache'
    cache.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (('train', 12), ('val', 5)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labs = np.arange(n, dtype=np.uint8) % 10
        img_name, lab_name = fashion_mnist.FILES[split]
        with gzip.open(cache / img_name, 'wb') as f:
            f.write(struct.pack('>BBBBIII', 0, 0, 8, 3, n, 28, 28) + imgs.tobytes())
        with gzip.open(cache / lab_name, 'wb') as f:
            f.write(struct.pack('>BBBBI', 0, 0, 8, 1, n) + labs.tobytes())
    decoded = fashion_mnist.read_idx(str(cache / fashion_mnist.FILES['val'][0]))
    assert decoded.shape == (5, 28, 28) and np.array_equal(decoded, imgs)
    monkeypatch.setattr(fashion_mnist, 'fetch', lambda cache_dir=None: str(cache))
    out = str(tmp_path / 'fm')
    fashion_mnist.ensure(out, n_train=10, n_val=5)
    from PIL import Image
    got = np.array(Image.open(osp.join(out, 'val', '04_coat', '00004.png')))
    assert np.array_equal(got, imgs[4])
    assert sum(1 for _ in __import__('glob').glob(osp.join(out, 'train', '*', '*.png'))) == 10
    with pytest.raises(ValueError, match='has 5 val images'):
        fashion_mnist.make(str(tmp_path / 'fm2'), n_train=1, n_val=6)


def _fresh_pages(mb):
    """``mb`` MiB of newly mapped, touched pages: RSS must grow by that much.

    Not ``np.ones``: after a detector's forward the heap holds hundreds of MB
    of freed but still resident memory, malloc serves new arrays from it and
    RSS rightly does not move (that made this test fail in CI).
    """
    buf = mmap.mmap(-1, mb << 20)
    for off in range(0, mb << 20, mmap.PAGESIZE):
        buf[off] = 1
    return buf


def test_peak_rss_measures_the_phase_only():
    from mmvq.utils.memory import PeakRSS
    _fresh_pages(400).close()                 # an earlier, higher peak
    with PeakRSS() as mem:
        _fresh_pages(200).close()             # 200 MiB inside the phase, unmapped before exit
    assert mem.exact
    assert 190 < mem.peak_mb - mem.start_mb < 260
    with PeakRSS() as mem:                    # nothing allocated: the earlier peaks do not count
        pass
    assert mem.peak_mb - mem.start_mb < 10


def test_profile_report_labels_mmvq_modules(tmp_path):
    import torch
    import torch.nn as nn
    from mmvq.modules.base import swap_class
    from mmvq.modules.linear import QuantLinear
    from mmvq.runner.profiling import profile_to
    lin = swap_class(nn.Linear(16, 8), QuantLinear)
    lin.quant_setup(dict(input=dict(type='UniformQuantizer', bits=8)))
    q = lin.input_quantizer.set_mode('calib')
    lin(torch.randn(4, 16))
    q.calibrate()
    q.set_mode('quant')
    out = tmp_path / 'p.txt'
    with torch.no_grad(), profile_to(lin, str(out), 'unit'):
        for _ in range(3):
            lin(torch.randn(4, 16))
    text = out.read_text()
    assert '| mmvq.QuantLinear | 3 |' in text and '| mmvq.quantizer[uniform] | 3 |' in text
    assert '| mmvq.fused::fq | 3 |' in text                 # the fused kernel, labelled
    assert 'aten::' in text
    assert not lin._forward_hooks and not lin._forward_pre_hooks      # hooks removed
    assert '_mmvq_rf' not in lin.__dict__

"""Benchmark data: the generated shapes set is deterministic and consistent,
Fashion-MNIST IDX decoding, and the per-phase peak-memory probe."""
import gzip
import hashlib
import json
import os.path as osp
import struct
import sys
import time

import numpy as np
import pytest

from conftest import ROOT

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


def _phase_with_200mb(PeakRSS):
    big = np.ones(50_000_000)                 # 400 MB, freed before the phase
    del big
    with PeakRSS() as mem:
        x = np.ones(25_000_000)               # 200 MB inside the phase
        x += 1
        time.sleep(0.05)                      # long enough for a sampler too
        del x
    return mem


def test_peak_rss_measures_the_phase_only():
    from mmvq.utils import memory
    if memory.method() is None:
        pytest.skip('this machine exposes no RSS counter that follows allocations')
    mem = _phase_with_200mb(memory.PeakRSS)
    assert mem.exact == (mem.method == 'hwm')
    assert 150 < mem.peak_mb - mem.start_mb < 350


def test_peak_rss_falls_back_to_sampling_when_the_hwm_reset_is_ignored(monkeypatch):
    """The CI sandbox accepted the clear_refs write and kept the lifetime VmHWM."""
    from mmvq.utils import memory
    if memory._status_kb('VmRSS') is None:
        pytest.skip('no /proc/self/status')
    real = memory._status_kb
    monkeypatch.setattr(memory, '_status_kb',
                        lambda key: 10 ** 9 if key == 'VmHWM' else real(key))
    monkeypatch.setattr(memory, '_reset_hwm', lambda: True)
    monkeypatch.setattr(memory, '_method', ...)
    assert memory.method() == 'sampled'
    mem = _phase_with_200mb(memory.PeakRSS)
    assert not mem.exact and mem.method == 'sampled'
    assert 150 < mem.peak_mb - mem.start_mb < 350
    assert mem.as_dict()['method'] == 'sampled'


def test_peak_rss_reports_nothing_when_counters_do_not_move(monkeypatch, tmp_path):
    from mmvq.utils import memory
    status = tmp_path / 'status'
    status.write_text('Name:\tpython\nVmHWM:\t 2299120 kB\nVmRSS:\t 2299120 kB\n')
    monkeypatch.setattr(memory, '_STATUS', str(status))
    monkeypatch.setattr(memory, '_reset_hwm', lambda: True)
    monkeypatch.setattr(memory, '_method', ...)
    assert memory.method() is None
    with memory.PeakRSS() as mem:
        pass
    assert mem.as_dict() == dict(start_mb=2245.2, peak_mb=None, method=None, exact=False)
    monkeypatch.setattr(memory, '_STATUS', str(tmp_path / 'missing'))
    monkeypatch.setattr(memory, '_method', ...)
    with memory.PeakRSS() as mem:
        pass
    assert mem.start_mb is None and mem.peak_mb is None


def test_profile_report_labels_mmvq_modules(tmp_path):
    import torch
    import torch.nn as nn
    from mmvq.modules.base import swap_class
    from mmvq.modules.linear import QuantLinear
    from mmvq.utils.profiling import profile_to
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
    assert 'aten::' in text
    assert not lin._forward_hooks and not lin._forward_pre_hooks      # hooks removed
    assert '_mmvq_rf' not in lin.__dict__

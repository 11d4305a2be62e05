"""Device-strict tier: every quantization block on a detector and two classifier families.

What runs on a GPU is proven here on the CPU: each of the 13 blocks of
``configs/_base_/quant/`` is converted, calibrated (its searches included),
run quantized, saved and re-loaded (bit-identical outputs) and analysed
(per-layer sensitivity, activation capture, quantization levels) under
:func:`mmvq.utils.strict.device_strict`, where any tensor factory in mmvq's
code that names no device raises. For the mmpretrain classifiers the global
default device is ``meta`` as well, so any tensor made anywhere without a
device becomes a meta tensor and fails when it meets real data (mmdet's own
detector code is not meta-clean, so the detector is checked on mmvq's code
only). The quantized forward must also make no host synchronisation from
mmvq's code (:func:`mmvq.utils.strict.count_host_syncs`), the first one after
calibration included.
"""
import glob
import os.path as osp

import numpy as np
import pytest
import torch

import mmvq
from mmvq import analysis
from mmvq.checkpoint import load_quantized, save_quantized
from mmvq.utils.strict import ImplicitDeviceError, count_host_syncs, device_strict

from helpers import CONFIGS, ROOT, flat
from helpers import quant_block as block
from helpers import tiny_detector_case as tiny_detector
from helpers import tiny_swin_cls_case as tiny_swin_cls
from helpers import tiny_vit_case as tiny_vit

BLOCKS = sorted(osp.splitext(osp.basename(p))[0]
                for p in glob.glob(osp.join(CONFIGS, '_base_', 'quant', '*.py')))


# ------------------------------------------------------------------ models
MODELS = dict(detector=(tiny_detector, False), vit=(tiny_vit, True), swin_cls=(tiny_swin_cls, True))


def features_fn(model, kind):
    """Output whose error ``analyze`` measures: logits, or backbone+neck features."""
    if kind == 'detector':
        def fn(m, batch):
            return m.extract_feat(m.data_preprocessor(batch, False)['inputs'])
        return fn
    return lambda m, x: m(x, mode='tensor')


@pytest.mark.parametrize('method', BLOCKS)
@pytest.mark.parametrize('kind', list(MODELS))
def test_block_is_device_clean(kind, method, tmp_path):
    build, meta = MODELS[kind]
    model, data, forward = build()
    qcfg = block(method)
    for search in qcfg.get('searches', []):
        if search['type'] == 'fpcs':     # two alternation rounds reach every code path of three
            search['rounds'] = 2
        if search['type'] == 'block_recon':   # past the warm-up: the regulariser runs too
            search.update(iters=3, warmup=0.3, units=['*blocks.0', '*layers.0', '*patch_embed'])
    with torch.no_grad():
        ref = flat(forward(model, data[0]))
    with device_strict(meta_default=meta), torch.no_grad():
        mmvq.convert(model, qcfg)
        mmvq.calibrate(model, data, forward)
        with count_host_syncs() as syncs:
            out = flat(forward(model, data[0]))
        assert syncs == [], f'{kind}/{method}: host syncs in the quantized forward: {syncs[:5]}'
        with count_host_syncs() as syncs:
            again = flat(forward(model, data[0]))
        assert syncs == []
    assert all(torch.equal(a, b) for a, b in zip(out, again))
    assert all(t.device.type == 'cpu' and torch.isfinite(t).all() for t in out)
    if kind != 'detector':        # float logits differ from quantized ones, finitely
        assert not torch.equal(out[0], ref[0])

    # nothing but parameters and buffers holds tensors (all follow model.to)
    for name, m in model.named_modules():
        stray = [k for k, v in vars(m).items() if isinstance(v, torch.Tensor)]
        assert not stray, f'{name} holds plain tensor attributes {stray}'
    for _, q in mmvq.iter_quantizers(model):
        assert all(not getattr(q, a).records for a in ('observer', 'store')
                   if getattr(q, a, None) is not None), 'observer records survive calibration'

    # save / load into a fresh float model: identical outputs, also under strictness
    path = str(tmp_path / 'q.pth')
    fresh, _, _ = build()
    with device_strict(meta_default=meta), torch.no_grad():
        save_quantized(model, path, qcfg)
        load_quantized(fresh, path, qcfg)
        loaded = flat(forward(fresh, data[0]))
    assert all(torch.equal(a, b) for a, b in zip(out, loaded))

    # analyze: one layer at a time, activations, levels
    fn = features_fn(model, kind)
    with device_strict(meta_default=meta):
        rows, total = analysis.layer_sensitivity(model, data[:1], fn)
        assert len(rows) == len(list(analysis.quantized_layers(model)))
        assert np.isfinite(total['sqnr_db'])
        mods = dict(model.named_modules())
        ln = [n for n, m in mods.items() if isinstance(m, mmvq.modules.QuantLayerNorm)][:2]
        sm = [n for n, m in mods.items() if n.endswith('matmul2')][:2]
        acts = analysis.capture(model, data[:1], fn, ln, sm, [])
        assert set(acts) == set(ln + sm)
        for _, q in mmvq.iter_quantizers(model):
            q.levels()
    mmvq.format_summary(model)


def test_strict_mode_catches_implicit_factories_and_syncs():
    """The checks fail when they should: code under mmvq's folder (compiled
    with a file name there) that makes a tensor without a device, or reads
    one on the host, is caught; the same code elsewhere is not checked."""
    from mmvq.quantizers import UniformQuantizer
    from mmvq.utils.strict import MMVQ_ROOT
    inside = osp.join(MMVQ_ROOT, 'quantizers', '_probe.py')
    outside = osp.join(ROOT, 'tests', '_probe.py')

    def run(src, where, **env):
        exec(compile(src, where, 'exec'), dict(torch=torch, **env))

    with device_strict():
        run('torch.zeros(3, device="cpu")', inside)
        run('torch.zeros(3)', outside)
        with torch.device('cpu'):
            run('torch.arange(3)', inside)             # named by the device context
        for src in ('torch.zeros(3)', 'torch.arange(4)', 'torch.tensor([1.0])',
                    'torch.full((2,), 1.0)', 'torch.linspace(0, 1, 5)'):
            with pytest.raises(ImplicitDeviceError, match='without device=.*_probe.py:1'):
                run(src, inside)
    t = torch.ones(3)
    with count_host_syncs() as syncs:
        run('bool(t.sum() > 0); t.sum().item(); float(t[0]); t[t > 0]; t.cpu()', inside, t=t)
        run('bool(t.sum() > 0)', outside, t=t)
    assert [s.split(' ')[0] for s in syncs] == ['__bool__', 'item', '__float__', '__getitem__', 'cpu']

    q = UniformQuantizer(bits=8)
    q.set_mode('calib')
    q(torch.randn(4, 8))
    q.calibrate()
    q.set_mode('quant')                                # reads `calibrated` once, here
    with count_host_syncs() as syncs:
        q(torch.randn(4, 8))
    assert syncs == []
    q.calibrated.fill_(True)                           # a write invalidates the host copy
    with count_host_syncs() as syncs:
        q(torch.randn(4, 8))
    assert len(syncs) == 1 and syncs[0].startswith('__bool__ at mmvq/quantizers/base.py')

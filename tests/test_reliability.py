"""Determinism of calibration and safety of written files."""
import json
import os

import pytest
import torch

import mmvq
from mmvq.checkpoint import read_quantized, save_quantized
from mmvq.utils.io import atomic_torch_save
from helpers import TEST_CFG, compose, ptq


def test_same_seed_gives_identical_parameters_and_metrics(coco_mini, tmp_path):
    from mmengine.registry import MODELS

    from mmvq.utils import load_config
    model_cfg = load_config(TEST_CFG).model
    torch.manual_seed(0)
    ckpt = tmp_path / 'float.pth'
    torch.save({'state_dict': MODELS.build(model_cfg).state_dict()}, ckpt)
    cfg = compose(tmp_path, 'igq_w4a4_g8')
    runs = []
    for name in ('a', 'b'):
        ptq(cfg, coco_mini, tmp_path / name, '--max-eval-images', '1', '--calib-images', '2',
            '--seed', '3', '--save-quantized', str(tmp_path / f'{name}.pth'), checkpoint=ckpt)
        _, _, state = read_quantized(str(tmp_path / f'{name}.pth'))
        res = json.loads((tmp_path / name / 'results.json').read_text())
        runs.append((state, res))
    (sa, ra), (sb, rb) = runs
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert ra['metrics'] == rb['metrics']
    assert ra['calibration']['image_ids'] == rb['calibration']['image_ids']
    assert len(ra['calibration']['image_ids']) == 2
    # another seed draws other images
    ptq(cfg, coco_mini, tmp_path / 'c', '--max-eval-images', '1', '--calib-images', '2',
        '--seed', '4', '--skip-fp', checkpoint=ckpt)
    assert ra['checkpoint_sha256'] == rb['checkpoint_sha256'] and len(ra['checkpoint_sha256']) == 64
    rc = json.loads((tmp_path / 'c' / 'results.json').read_text())
    assert rc['calibration']['image_ids'] != ra['calibration']['image_ids']


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from helpers import small_swin
    model = small_swin()
    qcfg = dict(scope='backbone', roles=dict(act=dict(type='UniformQuantizer', bits=8)))
    mmvq.quantize(model, qcfg, [torch.randn(1, 3, 64, 64)])
    path = tmp_path / 'q.pth'
    save_quantized(model, path, qcfg)
    before = path.read_bytes()

    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        f.write(b'partial bytes')              # some data reaches the disk, then the crash
        raise KeyboardInterrupt('simulated crash')

    monkeypatch.setattr(torch, 'save', crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, path, qcfg)
    monkeypatch.setattr(torch, 'save', real_save)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ['q.pth']          # no temp file left
    payload = torch.load(path, weights_only=True)
    assert payload['format'] == 'mmvq-quantized'


def test_atomic_save_replaces_whole_file(tmp_path):
    path = tmp_path / 'x.pth'
    atomic_torch_save({'a': torch.ones(3)}, path)
    atomic_torch_save({'a': torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)['a'], torch.zeros(2))

"""mmvq.PTQHook in the test scripts shipped inside the installed mmdet and
mmpretrain wheels (``<package>/.mim/tools/test.py``): the same quantizer
parameters, predictions and metrics as ``tools/ptq.py --skip-fp`` with the
same seed, since both run one :class:`mmvq.runner.PTQSession`."""
import importlib.util
import json
import os.path as osp
import pickle
import subprocess
import sys

import pytest
import torch

from helpers import (FASHION_MINI, QUANT_BLOCKS, ROOT, TEST_CFG, TINY_VIT_CKPT, coco_data_opts,
                     compose)
from mmvq.checkpoint import read_quantized


def wheel_test_script(package):
    """``tools/test.py`` as the installed wheel ships it (``mim test`` runs it)."""
    path = osp.join(osp.dirname(importlib.util.find_spec(package).origin), '.mim', 'tools',
                    'test.py')
    assert osp.isfile(path), path
    return path


def run(cmd):
    proc = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    return proc


def hook_config(tmp_path, model_cfg, block):
    """The user's model config + the hook form of a block: one ``_base_`` line."""
    path = tmp_path / f'hook_{block}.py'
    path.write_text(f"_base_ = ['{model_cfg}', '{osp.join(QUANT_BLOCKS, 'hook', block + '.py')}']\n")
    return str(path)


def same_state(a, b):
    _, _, sa = read_quantized(str(a))
    _, _, sb = read_quantized(str(b))
    assert sa.keys() == sb.keys()
    quantizer_keys = [k for k in sa if '_quantizer.' in k]
    assert len(quantizer_keys) > 100
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_mmdet_test_script_with_the_hook_matches_ptq(coco_mini, tmp_path):
    from mmengine.registry import MODELS

    from mmvq.utils import load_config
    torch.manual_seed(0)
    ckpt = tmp_path / 'float.pth'
    torch.save({'state_dict': MODELS.build(load_config(TEST_CFG).model).state_dict()}, ckpt)
    block, seed = 'igq_w4a4_g8', 3
    opts = coco_data_opts(coco_mini)
    run(['tools/ptq.py', compose(tmp_path, block), ckpt, '--work-dir', tmp_path / 'loop',
         '--skip-fp', '--seed', seed, '--save-quantized', tmp_path / 'loop.pth',
         '--out', tmp_path / 'loop.pkl', *opts])
    proc = run([wheel_test_script('mmdet'), hook_config(tmp_path, TEST_CFG, block), ckpt,
                '--work-dir', tmp_path / 'hook', '--out', tmp_path / 'hook.pkl', *opts,
                f'quant.calib.seed={seed}', f'custom_hooks.0.save_quantized={tmp_path}/hook.pth'])
    assert '[mmvq] calibration: 1 images of the train split, seed 3' in proc.stdout
    same_state(tmp_path / 'loop.pth', tmp_path / 'hook.pth')
    loop = json.loads((tmp_path / 'loop' / 'results.json').read_text())
    hook = json.loads((tmp_path / 'hook' / 'results.json').read_text())
    assert hook['entry'] == 'PTQHook' and loop['entry'] == 'PTQLoop'
    assert hook['metrics']['fp'] is None and hook['eval_time']['quantized_vs_fp'] is None
    assert hook['metrics']['quantized'] == loop['metrics']['quantized']
    assert hook['calibration']['image_ids'] == loop['calibration']['image_ids']
    assert hook['calibration']['searches'] == loop['calibration']['searches']
    assert hook['eval_images'] == loop['eval_images'] == 10
    assert (tmp_path / 'hook' / 'quant_summary.txt').read_text() == \
        (tmp_path / 'loop' / 'quant_summary.txt').read_text()
    with open(tmp_path / 'loop.pkl', 'rb') as f:
        preds_loop = pickle.load(f)
    with open(tmp_path / 'hook.pkl', 'rb') as f:
        preds_hook = pickle.load(f)
    assert len(preds_loop) == len(preds_hook) == 10
    for a, b in zip(preds_loop, preds_hook):
        assert a['img_id'] == b['img_id']
        for key in ('bboxes', 'scores', 'labels'):
            assert torch.equal(a['pred_instances'][key], b['pred_instances'][key]), key


def test_mmpretrain_test_script_with_the_hook_matches_ptq(tmp_path):
    base = osp.join(ROOT, 'benchmarks', 'configs', 'tiny_vit_cls.py')
    data = [f'train_dataloader.dataset.data_root={FASHION_MINI}',
            f'test_dataloader.dataset.data_root={FASHION_MINI}']
    block = 'fqvit_w8a8_attn4'              # PTF, integer LayerNorm, LIS, the head
    loop_cfg = tmp_path / f'loop_{block}.py'
    loop_cfg.write_text(f"_base_ = ['{base}', '{osp.join(QUANT_BLOCKS, block + '.py')}']\n")
    run(['tools/ptq.py', loop_cfg, TINY_VIT_CKPT, '--work-dir', tmp_path / 'loop', '--skip-fp',
         '--calib-images', 16, '--save-quantized', tmp_path / 'loop.pth', '--cfg-options', *data])
    run([wheel_test_script('mmpretrain'), hook_config(tmp_path, base, block), TINY_VIT_CKPT,
         '--work-dir', tmp_path / 'hook', '--cfg-options', *data,
         'custom_hooks.0.calib.images=16', f'custom_hooks.0.save_quantized={tmp_path}/hook.pth'])
    same_state(tmp_path / 'loop.pth', tmp_path / 'hook.pth')
    loop = json.loads((tmp_path / 'loop' / 'results.json').read_text())
    hook = json.loads((tmp_path / 'hook' / 'results.json').read_text())
    assert hook['metrics']['quantized'] == loop['metrics']['quantized']
    assert 70.0 < hook['metrics']['quantized']['accuracy/top1'] <= 100.0
    assert hook['task'] == 'classification' and hook['scope'] == 'model'
    assert hook['calibration']['images'] == 16 and hook['eval_images'] == 300


def test_hook_with_the_ptq_loop_is_an_error(tmp_path):
    from mmengine.config import Config
    from mmengine.runner import Runner
    base = osp.join(ROOT, 'benchmarks', 'configs', 'tiny_vit_cls.py')
    cfg = Config.fromfile(hook_config(tmp_path, base, 'uniform_w8a8'))
    cfg.work_dir = str(tmp_path / 'wd')
    cfg.train_dataloader.dataset.data_root = FASHION_MINI
    cfg.test_dataloader.dataset.data_root = FASHION_MINI
    cfg.test_cfg = dict(type='mmvq.PTQLoop', quant=cfg.quant.to_dict(), skip_fp=True)
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ValueError, match='would quantize twice'):
        runner.test()

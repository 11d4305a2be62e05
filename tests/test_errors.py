"""Bad input: one-line error naming the fix, non-zero exit, nothing half-written."""
import os.path as osp
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, TEST_CFG, compose
from helpers import coco_data_opts as data_opts

PTQ = osp.join(ROOT, 'tools', 'ptq.py')


def run_ptq(args, cwd=ROOT):
    proc = subprocess.run([sys.executable, PTQ, *args], capture_output=True, text=True, cwd=cwd)
    lines = [line.split('\r')[-1] for line in proc.stderr.splitlines()]   # drop progress-bar remnants
    err = [line for line in lines if line.startswith('ptq.py: error:')]
    return proc.returncode, err, proc


def assert_error(args, pattern, tmp_path=None):
    rc, err, proc = run_ptq(args)
    assert rc == 2, proc.stderr[-2000:]
    assert len(err) == 1, proc.stderr[-2000:]
    assert pattern in err[0], err[0]
    assert 'Traceback' not in proc.stderr
    if tmp_path is not None:
        assert not list(tmp_path.rglob('results.json')) and not list(tmp_path.rglob('*.pth.tmp'))
    return err[0]


@pytest.fixture(scope='module')
def uniform_cfg(tmp_path_factory):
    return compose(tmp_path_factory.mktemp('cfg'), 'uniform_w8a8')


@pytest.fixture(scope='module')
def float_ckpt(tmp_path_factory):
    """A real float checkpoint of the test config's model (random weights)."""
    from mmengine.registry import MODELS

    from mmvq.utils import load_config
    cfg = load_config(TEST_CFG)
    torch.manual_seed(0)
    state = MODELS.build(cfg.model).state_dict()
    path = tmp_path_factory.mktemp('ckpt') / 'float.pth'
    torch.save({'state_dict': state}, path)
    return path, state


def test_config_errors(tmp_path):
    assert_error([str(tmp_path / 'nope.py')], 'does not exist: pass the path')
    yaml = tmp_path / 'x.yaml'
    yaml.write_text('a: 1\n')
    assert_error([str(yaml)], 'is not a Python config (.py)')


def test_checkpoint_errors(tmp_path, uniform_cfg, coco_mini):
    assert_error([uniform_cfg, str(tmp_path / 'none.pth')], 'checkpoint')
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'this is not a checkpoint' * 10)
    assert_error([uniform_cfg, str(junk)], 'is not a readable PyTorch checkpoint')
    from mmdet.models.backbones import SwinTransformer
    other = tmp_path / 'other.pth'
    torch.save({'state_dict': SwinTransformer(embed_dims=32, depths=[2, 2], num_heads=[1, 2],
                                              out_indices=(0, 1), init_cfg=None).state_dict()}, other)
    msg = assert_error([uniform_cfg, str(other), '--work-dir', str(tmp_path / 'wd'), *data_opts(coco_mini)],
                       "does not fit the config's model", tmp_path)
    assert 'missing' in msg and 'unexpected' in msg


def test_data_errors(tmp_path, uniform_cfg, coco_mini):
    assert_error([uniform_cfg, '--cfg-options', f'test_dataloader.dataset.data_root={tmp_path}/nowhere/'],
                 'data root')
    bad = tmp_path / 'data'
    (bad / 'annotations').mkdir(parents=True)
    (bad / 'annotations' / 'instances_val2017.json').write_text('{"images": [')
    assert_error([uniform_cfg, '--cfg-options', f'test_dataloader.dataset.data_root={bad}/'],
                 'is not readable JSON')


def test_quant_block_errors(tmp_path, uniform_cfg, coco_mini):
    wd = ['--work-dir', str(tmp_path / 'wd')]
    opts = data_opts(coco_mini)
    assert_error([uniform_cfg, *wd, *opts, 'quant.roles.act.bits=9'], 'bits=9 is outside the supported range')
    assert_error([uniform_cfg, *wd, *opts, 'quant.roles.weight.type=mmvq.AdaLogQuantizer'],
                 'cannot quantize weights')
    assert_error([uniform_cfg, *wd, *opts, 'quant.roles.linear_input.type=mmvq.IGQQuantizer',
                  'quant.roles.linear_input.num_groups=200'], 'is larger than the 96 input channels')
    assert_error([uniform_cfg, *wd, *opts, 'quant.roles.act.type=Nope'], "unknown quantizer type 'Nope'")
    assert_error([uniform_cfg, *wd, *opts, 'quant.rolez=1'], "unknown key(s) ['rolez']")
    resnet = tmp_path / 'resnet.py'
    resnet.write_text(f"_base_ = ['{uniform_cfg}']\nmodel = dict(backbone=dict(_delete_=True, type='ResNet', "
                      "depth=18, init_cfg=None), neck=dict(in_channels=[64, 128, 256, 512]))\n")
    assert_error([str(resnet), *wd, *opts], 'is not supported by mmvq; supported: mmdet.SwinTransformer',
                 tmp_path)


def test_calibration_size_errors(tmp_path, uniform_cfg, coco_mini):
    wd = ['--work-dir', str(tmp_path / 'wd')]
    assert_error([uniform_cfg, *wd, '--calib-images', '0', *data_opts(coco_mini)], 'at least 1')
    assert_error([uniform_cfg, *wd, '--eval-repeats', '0', *data_opts(coco_mini)],
                 '--eval-repeats must be at least 1, got 0')
    assert_error([uniform_cfg, *wd, '--calib-images', '11', *data_opts(coco_mini)],
                 'more than the 10 images of the train split', tmp_path)


def test_nan_activations_name_the_layer(tmp_path, uniform_cfg, coco_mini, float_ckpt):
    path, state = float_ckpt
    poisoned = dict(state)
    w = poisoned['backbone.stages.0.blocks.0.norm1.weight'].clone()
    w[3] = float('nan')                       # NaN activations from the first LayerNorm on
    poisoned['backbone.stages.0.blocks.0.norm1.weight'] = w
    bad = tmp_path / 'nan.pth'
    torch.save({'state_dict': poisoned}, bad)
    msg = assert_error([uniform_cfg, str(bad), '--skip-fp', '--work-dir', str(tmp_path / 'wd'),
                        '--save-quantized', str(tmp_path / 'q.pth'), *data_opts(coco_mini)],
                       'contain NaN/Inf', tmp_path)
    assert 'backbone.stages.0.blocks.0.attn.w_msa.qkv.input_quantizer' in msg
    assert not (tmp_path / 'q.pth').exists()


def test_load_quantized_errors(tmp_path, uniform_cfg, coco_mini):
    from mmvq.checkpoint import FORMAT, save_quantized
    import mmvq
    from helpers import small_swin
    model = small_swin()
    qcfg = dict(scope='backbone', roles=dict(act=dict(type='UniformQuantizer', bits=8)))
    mmvq.quantize(model, qcfg, [torch.randn(1, 3, 64, 64)])
    other = tmp_path / 'other.pth'
    save_quantized(model, other, qcfg)
    wd = ['--work-dir', str(tmp_path / 'wd'), *data_opts(coco_mini)]
    assert_error([uniform_cfg, '--load-quantized', str(other), '--skip-fp', *wd],
                 'was made with a different quantization config', tmp_path)
    old = tmp_path / 'old.pth'
    torch.save(dict(format=FORMAT, format_version=0, qcfg='{}', meta='{}', state_dict={}), old)
    assert_error([uniform_cfg, '--load-quantized', str(old), '--skip-fp', *wd], 'format version 0')


def test_work_dir_not_writable(tmp_path, uniform_cfg, coco_mini):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    assert_error([uniform_cfg, '--work-dir', str(blocker / 'wd'), *data_opts(coco_mini)],
                 'is not writable')

"""A user's own classifier, first try: their model config + a block, test-only.

The user writes an mmpretrain config the way they evaluate (a ViT, image
folders read by ``CustomDataset`` sorted by class, a test split and a train
split for calibration, but no ``train_cfg``/``optim_wrapper``), adds one of
mmvq's quantization blocks as a second ``_base_`` and runs ``tools/ptq.py``.
The classifier is the project's trained tiny ViT; the images are the first
Fashion-MNIST images shipped in ``tests/data/fashion_mnist_mini`` (64 train,
300 test, in class folders).
"""
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

from helpers import CONFIGS, ROOT, build_wheel, make_venv

DATA = osp.join(ROOT, 'tests', 'data', 'fashion_mnist_mini')
CKPT = osp.join(ROOT, 'benchmarks', 'checkpoints', 'tiny_vit_cls.pth')

USER_MODEL = """
default_scope = 'mmpretrain'
model = dict(
    type='ImageClassifier',
    data_preprocessor=dict(num_classes=10, mean=[72.9] * 3, std=[90.0] * 3, to_rgb=True),
    backbone=dict(type='VisionTransformer',
                  arch=dict(embed_dims=96, num_layers=6, num_heads=3, feedforward_channels=384),
                  img_size=28, patch_size=4),
    neck=None,
    head=dict(type='VisionTransformerClsHead', num_classes=10, in_channels=96))
pipeline = [dict(type='LoadImageFromFile'), dict(type='PackInputs')]
test_dataloader = dict(
    batch_size=50, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(type='CustomDataset', data_root={root!r}, data_prefix='val', pipeline=pipeline))
test_evaluator = dict(type='Accuracy', topk=(1, ))
test_cfg = dict()
"""
TRAIN_SPLIT = """
train_dataloader = dict(
    batch_size=64, num_workers=0, sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(type='CustomDataset', data_root={root!r}, data_prefix='train',
                 pipeline=pipeline))
"""


def user_config(tmp_path, block, train_split=True):
    model = tmp_path / 'my_vit.py'
    model.write_text(USER_MODEL.format(root=DATA) + (TRAIN_SPLIT.format(root=DATA)
                                                     if train_split else ''))
    cfg = tmp_path / f'my_vit_{block}.py'
    cfg.write_text(f"_base_ = ['./my_vit.py', "
                   f"'{osp.join(CONFIGS, '_base_', 'quant', block + '.py')}']\n")
    return str(cfg)


def ptq(*args):
    return subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'ptq.py'), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_user_test_only_classifier_config_end_to_end(tmp_path):
    cfg = user_config(tmp_path, 'fqvit_w8a8_attn4')
    wd = tmp_path / 'wd'
    proc = ptq(cfg, CKPT, '--work-dir', wd, '--max-eval-images', 100)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    res = json.loads((wd / 'results.json').read_text())
    # FQ-ViT's protocol asks for 1000 train images of a classifier; a train split
    # of 64 is used whole, and the console and the record say so
    assert res['task'] == 'classification' and res['scope'] == 'model'
    calib = res['calibration']
    assert calib['images'] == 64
    assert calib['images_from'] == ('quant.calib.images.classification asks for 1000; '
                                    'the train split holds 64, all used')
    assert calib['split'] == 'train' and len(set(calib['image_ids'])) == 64
    assert '[mmvq] calibration: 64 images of the train split' in proc.stdout
    assert 'asks for 1000; the train split holds 64, all used' in proc.stdout
    # the head is quantized as FQ-ViT does: int8 weights, uint8 logits, and its
    # input is the final LayerNorm's 8-bit output (quantized once, there)
    rows = {tuple(line.split()[:2]): line.split()
            for line in (wd / 'quant_summary.txt').read_text().splitlines()[2:-1]}
    for layer, slot in (('head.layers.head', 'weight'), ('head.layers.head', 'output'),
                        ('backbone.ln1', 'output')):
        kind, bits = rows[(layer, slot)][2:4]
        assert (kind, bits) == ('uniform', '8'), (layer, slot, kind, bits)
    assert ('head.layers.head', 'input') not in rows
    # a seeded subset spread over the class-sorted folders, not the first 100
    sub = res['eval_subset']
    assert sub['images'] == 100 and sub['of'] == 300 and sub['seed'] == 0
    idx = sub['indices']
    assert idx == sorted(idx) and len(set(idx)) == 100 and idx[-1] > 250
    from mmpretrain.datasets import CustomDataset
    labels = [int(d['gt_label']) for d in
              CustomDataset(data_root=DATA, data_prefix='val', pipeline=[]).load_data_list()]
    assert labels == sorted(labels)                          # class-sorted, as on disk
    assert len({labels[i] for i in idx}) == 10               # every class evaluated
    assert len({labels[i] for i in range(100)}) <= 4         # what "first 100" would have been
    fp = res['metrics']['fp']['accuracy/top1']
    q = res['metrics']['quantized']['accuracy/top1']
    assert 70.0 < fp <= 100.0 and abs(q - fp) <= 4.0
    assert res['eval_images'] == 100
    # timing with its load record and the ratio
    t = res['eval_time']
    assert t['quantized_vs_fp'] == pytest.approx(t['total']['quantized'] / t['total']['fp'])
    for phase in ('fp', 'quantized'):
        load = t['load'][phase]
        assert load['cpus'] >= 1 and load['wall_s'] > 0 and load['process_cpu_s'] > 0
        assert isinstance(load['busy'], bool)
    assert t['reliable'] == (not any(t['load'][p]['busy'] for p in ('fp', 'quantized')))
    # a quiet console: no torch build dump, config or hook tables, no progress bars
    out = proc.stdout + proc.stderr
    for noise in ('PyTorch compiling details', 'Hooks will be executed', 'pkg_resources',
                  'optim_wrapper', '\r'):
        assert noise not in out, noise
    assert '[mmvq] accuracy/top1: FP' in proc.stdout
    logs = list(wd.glob('*/*.log'))
    assert len(logs) == 1 and 'PyTorch compiling details' in logs[0].read_text()


def test_user_config_without_train_split_names_the_fix(tmp_path):
    cfg = user_config(tmp_path, 'uniform_w8a8', train_split=False)
    proc = ptq(cfg, CKPT, '--work-dir', tmp_path / 'wd', '--max-eval-images', 20)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('ptq.py: error: the config has no train_dataloader')
    assert '--calib-split test' in err[0]
    # and that way works, calibrating on (other) test images
    proc = ptq(cfg, CKPT, '--work-dir', tmp_path / 'wd2', '--max-eval-images', 20,
               '--calib-split', 'test', '--calib-images', 8, '--skip-fp')
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / 'wd2' / 'results.json').read_text())
    assert res['calibration']['split'] == 'test' and res['calibration']['images'] == 8
    assert res['calibration']['images_from'] == '--calib-images'


def installed_wheel(tmp_path):
    """A fresh venv outside the checkout with mmvq installed from its wheel; every
    other package comes from the project's environment (a ``.pth`` line naming its
    site-packages, whose editable mmvq finder is therefore never run)."""
    import sysconfig
    wheel = build_wheel(tmp_path / 'build')
    venv = tmp_path / 'venv'
    py, site = make_venv(venv)
    with open(osp.join(site, 'project_site.pth'), 'w') as f:
        f.write(sysconfig.get_paths()['purelib'] + '\n')
    subprocess.run([sys.executable, '-m', 'pip', '--disable-pip-version-check', '--python', py,
                    'install', '-q', '--no-deps', '--no-index', wheel], check=True)
    return venv, site


def test_installed_wheel_runs_a_scoped_config_from_outside_the_checkout(tmp_path):
    """``pip install mmvq`` (not editable), then a config whose bases are only
    ``mmpretrain::`` and ``mmvq::`` paths, run by the ``mmvq-ptq`` entry point in
    a folder outside the checkout."""
    venv, site = installed_wheel(tmp_path)
    user = tmp_path / 'user'
    user.mkdir()
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    where = subprocess.run([str(venv / 'bin' / 'python'), '-c',
                            'import mmvq, mmvq.utils; print(mmvq.__file__); '
                            'print(mmvq.utils.resolve_config_path("mmvq::_base_/quant/uniform_w8a8.py"))'],
                           cwd=user, env=env, capture_output=True, text=True, check=True)
    pkg_file, block = where.stdout.split()
    # the example: a detector config + a block, both by scope
    (user / 'det.py').write_text("_base_ = ['mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', "
                                 "'mmvq::_base_/quant/fqvit_w8a8_attn4.py']\n")
    det = subprocess.run([str(venv / 'bin' / 'python'), '-c',
                          'import mmvq; from mmengine.config import Config; '
                          'c = Config.fromfile("det.py"); print(c.model.backbone.type, c.quant.name)'],
                         cwd=user, env=env, capture_output=True, text=True)
    assert det.stdout.strip() == ('SwinTransformer FQ-ViT W8A8/Attn4 (PTF, integer LayerNorm, '
                                  'LIS)'), det.stderr[-2000:]
    assert pkg_file.startswith(site) and not pkg_file.startswith(ROOT)
    assert block == osp.join(site, 'mmvq', '.mim', 'configs', '_base_', 'quant', 'uniform_w8a8.py')
    cfg = user / 'my_vit_fqvit.py'
    cfg.write_text("_base_ = ['mmpretrain::_base_/default_runtime.py', "
                   "'mmvq::_base_/quant/fqvit_w8a8_attn4.py']\n"
                   + USER_MODEL.format(root=DATA) + TRAIN_SPLIT.format(root=DATA))
    proc = subprocess.run([str(venv / 'bin' / 'mmvq-ptq'), cfg.name, CKPT, '--work-dir', 'wd',
                           '--calib-images', '16', '--max-eval-images', '50'],
                          cwd=user, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    res = json.loads((user / 'wd' / 'results.json').read_text())
    assert res['method'] == 'FQ-ViT W8A8/Attn4 (PTF, integer LayerNorm, LIS)'
    fp = res['metrics']['fp']['accuracy/top1']
    q = res['metrics']['quantized']['accuracy/top1']
    assert 70.0 < fp <= 100.0 and abs(q - fp) <= 6.0
    # errors name the command the user typed
    proc = subprocess.run([str(venv / 'bin' / 'mmvq-ptq'), 'missing.py'], cwd=user, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith('mmvq-ptq: error: '), proc.stderr
    # the other entry points are there and are the tools
    for tool in ('mmvq-export', 'mmvq-analyze'):
        proc = subprocess.run([str(venv / 'bin' / tool), '--help'], cwd=user, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.startswith('usage: ' + tool), proc.stderr


@pytest.mark.parametrize('block', ['igq_w4a4_g8', 'fqvit_w8a8_attn4'])
def test_quantized_classifier_predictions_do_not_depend_on_the_batch(block, tmp_path):
    """A quantized classifier scores each image on its own: batches of one
    class (a class-sorted folder) must not share anything (IGQ's dynamic
    groups included). Trained tiny ViT, head quantized, real images."""
    import glob

    import mmcv
    import torch
    from mmengine.config import Config

    import mmvq
    from helpers import build_classifier as build_from_cfg
    cfg = Config.fromfile(user_config(tmp_path, block))
    model = build_from_cfg(cfg)
    model.load_state_dict(torch.load(CKPT, weights_only=True)['state_dict'])
    files = sorted(glob.glob(osp.join(DATA, 'val', '*', '*.png')))

    def batch(paths):
        x = torch.stack([torch.from_numpy(mmcv.imread(p, channel_order='rgb')).permute(2, 0, 1)
                         for p in paths]).float()
        return (x - 72.9) / 90.0

    calib = [batch(files[i:i + 1]) for i in range(0, 300, 37)]
    mmvq.quantize(model, cfg.quant.to_dict(), calib, lambda m, x: m(x, mode='tensor'))
    same_class = batch(files[:16])                       # the first class folder
    with torch.no_grad():
        together = model(same_class, mode='tensor')
        alone = torch.cat([model(same_class[i:i + 1], mode='tensor') for i in range(16)])
    assert torch.equal(together.argmax(1), alone.argmax(1))
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    assert any(n.startswith('head.') for n, _ in mmvq.iter_quantizers(model))


"""Helpers shared by the test files (paths, composing configs, running the
tools, metrics); fixtures are in ``conftest.py``. No test file imports another."""
import os
import os.path as osp
import subprocess
import sys

import numpy as np
import torch
from mmengine.config import Config

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SHARED = osp.abspath(os.environ.get('MMVQ_SHARED', osp.join(ROOT, '..', 'shared')))
COCO_MINI = osp.join(SHARED, 'data', 'coco_mini')
CONFIGS = osp.join(ROOT, 'configs')
QUANT_BLOCKS = osp.join(CONFIGS, '_base_', 'quant')
FASHION_MINI = osp.join(ROOT, 'tests', 'data', 'fashion_mnist_mini')
TINY_VIT_CKPT = osp.join(ROOT, 'benchmarks', 'checkpoints', 'tiny_vit_cls.pth')

TEST_CFG = osp.join(ROOT, 'tests', 'configs', 'mask_rcnn_swin_t_coco_mini.py')
METRIC_KEYS = ('coco/bbox_mAP', 'coco/segm_mAP', 'coco/bbox_mAP_50', 'coco/segm_mAP_50')


def compose(tmp_path, method):
    """TEST_CFG + the quantization block ``method`` (one ``_base_`` line)."""
    path = tmp_path / f'{method}.py'
    path.write_text(f"_base_ = ['{TEST_CFG}', '{osp.join(QUANT_BLOCKS, method + '.py')}']\n")
    return str(path)


def ptq(cfg, coco_mini, work_dir, *extra, check=True, checkpoint=None):
    """``tools/ptq.py`` on ``cfg`` (TEST_CFG-based) over coco_mini."""
    ckpt = [str(checkpoint)] if checkpoint else []
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'ptq.py'), cfg, *ckpt, '--work-dir', str(work_dir),
           *coco_data_opts(coco_mini), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def coco_data_opts(coco_mini):
    """``--cfg-options`` pointing TEST_CFG's splits and metric at coco_mini."""
    data = coco_mini + '/'
    return ['--cfg-options', f'train_dataloader.dataset.data_root={data}',
            f'test_dataloader.dataset.data_root={data}',
            f'test_evaluator.ann_file={data}annotations/instances_val2017.json']


def tiny_config(tmp_path, model, block):
    """A benchmark tiny model (``benchmarks/configs``) + a quantization block."""
    base = osp.join(ROOT, 'benchmarks', 'configs', model + '.py')
    cfg = tmp_path / f'{model}_{block}.py'
    cfg.write_text(f"_base_ = ['{base}', '{osp.join(QUANT_BLOCKS, block + '.py')}']\n")
    return cfg


def sqnr(a, b):
    """Signal-to-quantization-noise ratio of ``b`` against ``a`` (dB)."""
    return float(10 * torch.log10(a.pow(2).sum() / (a - b).pow(2).sum().clamp(min=1e-30)))


def build_classifier(cfg):
    """An mmpretrain classifier of ``cfg`` with random (seeded) weights, in eval mode."""
    import mmpretrain.utils
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    mmpretrain.utils.register_all_modules(init_default_scope=False)
    cfg.model.backbone.init_cfg = None
    cfg.model.pop('init_cfg', None)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model)
    model.eval()
    return model


def quant_block(name):
    """The quantization block ``configs/_base_/quant/<name>.py`` as a dict."""
    return Config.fromfile(osp.join(CONFIGS, '_base_', 'quant', f'{name}.py')).quant.to_dict()


def build_in_scope(scope, cfg):
    from mmengine.registry import DefaultScope
    if scope == 'mmpretrain':
        import mmpretrain.utils
        from mmpretrain.registry import MODELS as REG
        mmpretrain.utils.register_all_modules(init_default_scope=False)
    else:
        from mmdet.registry import MODELS as REG
    with DefaultScope.overwrite_default_scope(scope):
        return REG.build(cfg)


def tiny_vit_case():
    """The trained tiny ViT, two calibration batches and its forward."""
    cfg = Config.fromfile(osp.join(ROOT, 'benchmarks', 'configs', 'tiny_vit_cls.py'))
    model = build_in_scope('mmpretrain', cfg.model)
    ckpt = torch.load(osp.join(ROOT, 'benchmarks', 'checkpoints', 'tiny_vit_cls.pth'),
                      map_location='cpu', weights_only=True)
    model.load_state_dict(ckpt['state_dict'])
    g = torch.Generator().manual_seed(0)
    data = [torch.rand(4, 3, 28, 28, generator=g) * 4 - 1 for _ in range(2)]
    return model.eval(), data, lambda m, x: m(x, mode='tensor')


def tiny_swin_cls_case():
    """A small mmpretrain Swin classifier, two batches and its forward."""
    torch.manual_seed(0)
    model = build_in_scope('mmpretrain', dict(
        type='ImageClassifier',
        backbone=dict(type='SwinTransformer', arch=dict(embed_dims=32, depths=[2, 2], num_heads=[1, 2]),
                      img_size=56, window_size=7, drop_path_rate=0.0, out_indices=(1, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=10, in_channels=64)))
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(2, 3, 56, 56, generator=g) for _ in range(2)]
    return model.eval(), data, lambda m, x: m(x, mode='tensor')


def tiny_detector_case():
    """The trained tiny Swin Mask R-CNN, two shapes images and its forward."""
    import sys
    from mmdet.structures import DetDataSample
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    from shapes import draw_det_image
    cfg = Config.fromfile(osp.join(ROOT, 'benchmarks', 'configs', 'tiny_swin_mask_rcnn.py'))
    model = build_in_scope('mmdet', cfg.model)
    ckpt = torch.load(osp.join(ROOT, 'benchmarks', 'checkpoints', 'tiny_swin_mask_rcnn.pth'),
                      map_location='cpu', weights_only=True)
    model.load_state_dict(ckpt['state_dict'])
    data = []
    for i in range(2):
        img, _ = draw_det_image(np.random.default_rng(i), 192, 192)
        meta = dict(img_id=i, img_shape=(192, 192), ori_shape=(192, 192), scale_factor=(1.0, 1.0))
        data.append(dict(inputs=[torch.from_numpy(img).permute(2, 0, 1).contiguous()],
                         data_samples=[DetDataSample(metainfo=meta)]))

    def forward(m, batch):
        res = m.test_step(batch)[0].pred_instances
        return [res.bboxes, res.scores, res.masks.float()]
    return model.eval(), data, forward


def flat(out):
    return [t for t in (out if isinstance(out, (list, tuple)) else [out])]


def classifier_from(path):
    """An mmpretrain classifier built from a config path (random, seeded)."""
    from mmvq.utils import load_config
    return build_classifier(load_config(path))


def image_batch(path):
    """A 224x224 image normalised as ImageNet classifiers expect, batch of one."""
    import mmcv
    img = mmcv.imread(path, channel_order='rgb')
    img = mmcv.imresize(img, (224, 224))
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None]
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    return (x - mean) / std


def small_swin():
    from mmdet.models.backbones import SwinTransformer
    torch.manual_seed(0)
    model = SwinTransformer(embed_dims=32, depths=[2, 2], num_heads=[1, 2], window_size=7,
                            out_indices=(0, 1), init_cfg=None)
    model.eval()   # mmdet's SwinTransformer.train() returns None, so no chaining
    return model


def tiny_vit():
    """The trained tiny ViT of the benchmark (28x28 inputs, 10 classes)."""
    return tiny_vit_case()[0]


def calibrated(q, *batches):
    """A quantizer calibrated on ``batches`` and switched to quant mode."""
    q.set_mode('calib')
    for b in batches:
        q(b)
    q.calibrate()
    return q.set_mode('quant')


def make_venv(path):
    """A fresh venv at ``path`` without pip (the running pip installs into it with
    ``--python``); returns ``(its python, its site-packages)``."""
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(path)], check=True)
    py = osp.join(str(path), 'bin', 'python')
    site = subprocess.run([py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          check=True, capture_output=True, text=True).stdout.strip()
    return py, site


def build_wheel(tmp_dir):
    """Build mmvq's wheel from a copy of the sources (the checkout gets no
    ``build/`` or ``*.egg-info``) with the running interpreter's setuptools;
    returns the wheel's path."""
    import glob
    import shutil
    src = osp.join(str(tmp_dir), 'src')
    os.makedirs(src)
    for name in ('setup.py', 'README.md', 'model-index.yml'):
        shutil.copy2(osp.join(ROOT, name), src)
    for name in ('mmvq', 'configs', 'tools'):
        shutil.copytree(osp.join(ROOT, name), osp.join(src, name),
                        ignore=shutil.ignore_patterns('__pycache__', '*.pyc', '*.so'))
    out = osp.join(str(tmp_dir), 'wheels')
    subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation',
                    '--disable-pip-version-check', '-w', out, src],
                   check=True, capture_output=True, text=True)
    wheels = glob.glob(osp.join(out, 'mmvq-*.whl'))
    assert len(wheels) == 1, wheels
    return wheels[0]


def fashion_images(model, n=64):
    """``n`` held-out Fashion-MNIST images (tests/data) through the model's preprocessor."""
    import glob
    import mmcv
    files = sorted(glob.glob(osp.join(FASHION_MINI, 'val', '*', '*.png')))[::300 // n][:n]
    imgs = [torch.from_numpy(mmcv.imread(f, channel_order='rgb')).permute(2, 0, 1).contiguous()
            for f in files]
    return model.data_preprocessor(dict(inputs=imgs), False)['inputs']

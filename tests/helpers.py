"""Helpers shared by the test files (paths, composing configs, running the
tools, metrics); fixtures are in ``conftest.py``. No test file imports another."""
import os
import os.path as osp
import subprocess
import sys

import torch

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


def tiny_vit():
    """The trained tiny ViT of the benchmark (28x28 inputs, 10 classes)."""
    from mmvq.utils import load_config
    model = build_classifier(load_config(osp.join(ROOT, 'benchmarks', 'configs', 'tiny_vit_cls.py')))
    state = torch.load(TINY_VIT_CKPT, map_location='cpu', weights_only=True)
    model.load_state_dict(state.get('state_dict', state))
    return model

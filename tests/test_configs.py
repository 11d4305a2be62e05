"""Every drop-in config parses, builds, converts, calibrates and runs on a real image.

Detection configs run one calibration forward and one quantized forward on a
real coco_mini image (resized to 256 px short side to keep the suite fast;
searches are skipped, observers only); classification configs do the same at
224 px. A config that rots fails here.
"""
import glob
import os.path as osp

import pytest
import torch

import mmvq
from helpers import CONFIGS
from mmvq.calibration.driver import finalize, initialise_parameters, observe

DET_ALL = sorted(glob.glob(osp.join(CONFIGS, '*.py')))
CLS_ALL = sorted(glob.glob(osp.join(CONFIGS, 'cls', '*.py')))
QUANT_BLOCKS = sorted(glob.glob(osp.join(CONFIGS, '_base_', 'quant', '*.py')))
# a *_recon config is its base config + the block_recon stage (checked by
# test_recon_config against its base); the forward tests run the bases
DET = [p for p in DET_ALL if not p.endswith('_recon.py')]
CLS = [p for p in CLS_ALL if not p.endswith('_recon.py')]
RECON = [p for p in DET_ALL + CLS_ALL if p.endswith('_recon.py')]
RECON_METHODS = ('uniform_w4a4', 'adalog_w3a3', 'adalog_w4a4', 'igq_w4a4_g8', 'igq_w4a4_g12',
                 'mixed_w4a4')


def test_matrix_is_complete():
    names = {osp.basename(p)[:-3] for p in DET}
    assert 'cascade_swin_s_fqvit' in names
    models = ('mask_rcnn_swin_t', 'mask_rcnn_swin_s', 'cascade_swin_t', 'cascade_swin_s')
    methods = ('fqvit', 'fqvit_attn8', 'adalog_w3a3', 'adalog_w4a4', 'adalog_w6a6', 'igq_w4a4_g8',
               'igq_w4a4_g12', 'igq_w6a6_g8', 'igq_w6a6_g12', 'uniform_w4a4', 'uniform_w6a6',
               'uniform_w8a8', 'mixed_w4a4')
    assert names == {f'{m}_{k}' for m in models for k in methods}
    assert len(CLS) == 7 * len(methods)
    recon = {osp.basename(p)[:-3] for p in RECON}
    assert recon == {f'{m}_{k}_recon' for m in models + ('vit_b', 'deit_t', 'deit_s', 'deit_b',
                                                          'swin_t', 'swin_s', 'swin_b')
                     for k in RECON_METHODS}
    assert len(QUANT_BLOCKS) == len(methods) + len(RECON_METHODS)


@pytest.mark.parametrize('path', RECON, ids=lambda p: osp.basename(p)[:-3])
def test_recon_config(path):
    """Same model, calibration and quantizers as the base config; its
    searches, then block reconstruction with the references' defaults."""
    from mmengine.config import Config
    from mmvq.calibration import build_search
    from mmvq.schema import validate_qcfg
    cfg, base = Config.fromfile(path), Config.fromfile(path[:-len('_recon.py')] + '.py')
    validate_qcfg(cfg.quant)
    q, qb = cfg.quant.to_dict(), base.quant.to_dict()
    assert cfg.model == base.model and cfg.train_dataloader == base.train_dataloader
    assert q['name'] == qb['name'] + ' + block reconstruction'
    assert q['searches'][:-1] == qb.get('searches', [])
    assert q['searches'][-1] == dict(type='block_recon')
    assert {k: v for k, v in q.items() if k not in ('name', 'searches')} == \
        {k: v for k, v in qb.items() if k not in ('name', 'searches')}
    stage = build_search(q['searches'][-1])
    assert stage.wanted_images('classification') == 1024 and stage.wanted_images('detection') == 256
    stage.set_device('cuda')                # the accelerator preset is the reference's
    assert stage.iters == 20000 and stage.budget['differs_from_reference'] == []
    stage.set_device('cpu')
    assert stage.iters == 300 and stage.budget['differs_from_reference'] == ['iters']


def _quantize_and_run(model, batch, forward):
    mmvq.convert(model, model.cfg_quant)
    observe(model, [batch], forward)
    initialise_parameters(model)
    finalize(model)
    with torch.no_grad():
        return forward(model, batch)


def _check_quant_block(cfg, task):
    from mmvq.schema import calib_images_for, validate_qcfg
    validate_qcfg(cfg.quant)
    assert cfg.quant.calib.split == 'train' and cfg.quant['scope'] == 'auto'
    assert cfg.custom_imports.imports == ['mmvq']
    # the number of calibration images is the task's: 32 ImageNet / 1 COCO image,
    # except FQ-ViT's classification protocol (10 batches of 100)
    fq = cfg.quant.name.startswith('FQ-ViT')
    want = dict(classification=1000 if fq else 32, detection=1)[task]
    assert calib_images_for(task, None, cfg.quant.calib.get('images'))[0] == want
    if fq:
        assert calib_images_for(task, None, cfg.quant.calib.images)[1] == (
            'quant.calib.images.classification' if task == 'classification'
            else 'the detection default')
    else:
        assert 'images' not in cfg.quant.calib


def _scopes(model):
    """Top-level modules holding quantizers -> set of their quantized slots."""
    out = {}
    for r in mmvq.quant_summary(model):
        out.setdefault(r['module'].split('.')[0], set()).add(r['slot'])
    return out


@pytest.mark.parametrize('path', DET, ids=lambda p: osp.basename(p)[:-3])
def test_detection_config(path, coco_image):
    from mmdet.apis import inference_detector, init_detector
    from mmengine.config import Config
    cfg = Config.fromfile(path)
    _check_quant_block(cfg, 'detection')
    assert cfg.test_dataloader.dataset.data_root == 'data/coco/'
    assert cfg.train_dataloader.dataset.ann_file == 'annotations/instances_train2017.json' \
        or cfg.train_dataloader.dataset.get('dataset', {}).get('ann_file') == \
        'annotations/instances_train2017.json'
    cfg.model.backbone.init_cfg = None
    cfg.model.test_cfg.rpn.max_per_img = 100        # random weights: keep the RoI heads cheap
    for t in cfg.test_dataloader.dataset.pipeline:
        if t['type'] == 'Resize':
            t['scale'] = (427, 256)
    torch.manual_seed(0)
    model = init_detector(cfg, None, device='cpu')
    model.cfg_quant = cfg.quant.to_dict()
    result = _quantize_and_run(model, coco_image, lambda m, img: inference_detector(m, img))
    assert result.pred_instances.bboxes.shape[1] == 4
    assert len(mmvq.quant_summary(model)) > 50
    assert set(_scopes(model)) == {'backbone'}            # auto scope: a detector's backbone


@pytest.mark.parametrize('path', CLS, ids=lambda p: osp.basename(p)[:-3])
def test_classification_config(path, coco_image):
    from mmengine.config import Config

    from helpers import build_classifier as build_from_cfg
    from helpers import image_batch
    cfg = Config.fromfile(path)
    _check_quant_block(cfg, 'classification')
    assert cfg.train_dataloader.dataset.split == 'train'
    model = build_from_cfg(cfg)
    model.cfg_quant = cfg.quant.to_dict()
    logits = _quantize_and_run(model, image_batch(coco_image), lambda m, x: m(x, mode='tensor'))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    # auto scope: a classifier whole, its head's weight and input as the papers;
    # FQ-ViT also quantizes the logits (act_out), and a ViT head's input is the
    # final LayerNorm's quantized output (qact2), not quantized again
    fq = '_fqvit' in path
    head = {'weight', 'output'} if fq else {'weight', 'input'}
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.head.modules())
    if fq and ('swin' in path or n_linear > 1):
        # Swin: the pooled feature (qact3); ViT-B's pre-logits: the logits
        # Linear reads its tanh output
        head.add('input')
    assert _scopes(model) == {'backbone': _scopes(model)['backbone'], 'head': head}

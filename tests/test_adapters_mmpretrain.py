"""Adapters on real mmpretrain classifiers (ViT-B, DeiT-S, Swin-T) built from their configs."""
import collections

import mmcv
import pytest
import torch

import mmvq
from helpers import build_classifier as build_from_cfg
from helpers import sqnr
from mmvq.utils import load_config

W8 = dict(type='UniformQuantizer', bits=8, symmetric=True, granularity='channel', ch_axis=0)
A8 = dict(type='UniformQuantizer', bits=8)
UNIFORM8 = dict(scope='model', roles=dict(weight=W8, act=A8))

# name: (config, attention wrapper, blocks, backbone Linear layers, LayerNorms);
# every block has qkv, proj, fc1, fc2; Swin adds 3 PatchMerging reductions and
# norms (patch embed, 3 merging, final norm3); ViT has its final ln1
CLASSIFIERS = {
    'vit-b': ('mmpretrain::vision_transformer/vit-base-p16_64xb64_in1k.py',
              'QuantMultiheadAttention', 12, 12 * 4, 12 * 2 + 1),
    'deit-s': ('mmpretrain::deit/deit-small_4xb256_in1k.py',
               'QuantMultiheadAttention', 12, 12 * 4, 12 * 2 + 1),
    'swin-t': ('mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py',
               'QuantWindowMSA', 12, 12 * 4 + 3, 12 * 2 + 3 + 1 + 1),
}


def build(path):
    return build_from_cfg(load_config(path))


def image_batch(path):
    img = mmcv.imread(path, channel_order='rgb')
    img = mmcv.imresize(img, (224, 224))
    x = torch.from_numpy(img).permute(2, 0, 1).float()[None]
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    return (x - mean) / std


def logits(model, x):
    with torch.no_grad():
        return model(x, mode='tensor')


@pytest.mark.parametrize('name', list(CLASSIFIERS))
def test_classifier_coverage_exactness_and_closeness(name, coco_image):
    path, wrapper, blocks, n_linear, n_ln = CLASSIFIERS[name]
    model = build(path)
    x = image_batch(coco_image)
    ref = logits(model, x)
    assert ref.shape == (1, 1000)
    head_linears = sum(isinstance(m, torch.nn.Linear) for m in model.head.modules())
    assert head_linears >= 1
    mmvq.convert(model, UNIFORM8)
    counts = collections.Counter(type(m).__name__ for m in model.modules())
    assert counts[wrapper] == blocks and counts['QuantMatMul'] == 2 * blocks
    assert counts['QuantSoftmax'] == blocks
    assert counts['QuantLinear'] == n_linear + head_linears    # scope 'model': head too
    assert counts['QuantLayerNorm'] == n_ln
    assert counts['QuantConv2d'] == 1
    mmvq.calibrate(model, [x], lambda m, b: m(b, mode='tensor'))
    q = logits(model, x)
    assert sqnr(ref, q) > 20.0, f'{name}: W8A8 logits SQNR {sqnr(ref, q):.1f} dB'
    mmvq.enable_quantizers(model, False)
    assert torch.equal(logits(model, x), ref)

"""Adapters on real mmpretrain classifiers (ViT-B, DeiT-S, Swin-T) built from their configs."""
import collections

import pytest
import torch

import mmvq
from helpers import classifier_from as build
from helpers import image_batch, sqnr

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

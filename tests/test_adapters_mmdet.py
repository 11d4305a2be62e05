"""Adapters on real mmdet detectors: coverage counts, bit-exactness, 8-bit closeness."""
import collections
import os.path as osp

import pytest
import torch
import torch.nn as nn

import mmvq
from helpers import CONFIGS, small_swin, sqnr
from mmvq.utils import load_config

W8 = dict(type='UniformQuantizer', bits=8, symmetric=True, granularity='channel', ch_axis=0)
A8 = dict(type='UniformQuantizer', bits=8)
UNIFORM8 = dict(scope='backbone', roles=dict(weight=W8, act=A8))
FQVIT8 = dict(scope='backbone', integer_layernorm=True,
              roles=dict(weight=W8, act=A8,
                         ln_input=dict(type='PTFQuantizer', bits=8), ln_output=A8,
                         qkv_input=None, fc1_input=None, reduction_input=None,
                         attn_logits=A8, softmax=dict(type='LogIntSoftmax', bits=4),
                         attn_probs=None))


def build(path, seed=0):
    from mmdet.apis import init_detector
    cfg = load_config(path)
    cfg.model.backbone.init_cfg = None
    torch.manual_seed(seed)
    return init_detector(cfg, None, device='cpu')


def run(model, img):
    """Inference keeping the backbone+neck features for SQNR checks."""
    from mmdet.apis import inference_detector
    feats = {}
    h = model.neck.register_forward_hook(lambda m, i, o: feats.setdefault('neck', [t.clone() for t in o]))
    with torch.no_grad():
        result = inference_detector(model, img)
    h.remove()
    return result, feats['neck']


def type_counts(model):
    return collections.Counter(type(m).__name__ for m in model.modules())


@pytest.fixture(scope='module')
def swin_t(coco_image):
    model = build('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py')
    ref, ref_feats = run(model, coco_image)
    return model, ref, ref_feats


def test_mask_rcnn_swin_t_fqvit_coverage_exactness_and_closeness(swin_t, coco_image):
    model, ref, ref_feats = swin_t
    mmvq.convert(model, FQVIT8)
    counts = type_counts(model)
    # Swin-T: 12 blocks -> 12 attention wrappers with 2 matmuls each and 12 softmaxes;
    # Linear: 12 x (qkv, proj, fc1, fc2) + 3 PatchMerging reductions; 1 patch-embed conv;
    # LayerNorm: 12 x 2 + 3 merging + patch-embed norm + 4 output norms
    assert counts['QuantWindowMSA'] == 12 and counts['QuantMatMul'] == 24
    assert counts['QuantSoftmax'] == 12 and counts['QuantLinear'] == 51
    assert counts['QuantConv2d'] == 1 and counts['QuantLayerNorm'] == 32
    kinds = collections.Counter(r['kind'] for r in mmvq.quant_summary(model))
    # weights 52; inputs: proj 12 + fc2 12 + conv 1; q,k,v: 36; logits 12; LN out 32
    assert kinds == {'uniform': 52 + 25 + 36 + 12 + 32, 'ptf': 32, 'lis': 12}
    merging_norm = model.backbone.stages[0].downsample.norm.input_quantizer
    assert merging_norm.tied_channels == 4

    mmvq.calibrate(model, [coco_image], lambda m, img: run(m, img))
    q, q_feats = run(model, coco_image)
    worst = min(sqnr(a, b) for a, b in zip(ref_feats, q_feats))
    # random weights give near-uniform attention rows (p ~ 1/49), the worst case for a
    # 4-bit log2 softmax; measured 14.8 dB on this image
    assert worst > 12.0, f'FQ-ViT W8A8/attn4 neck SQNR {worst:.1f} dB'

    mmvq.enable_quantizers(model, False)
    off, off_feats = run(model, coco_image)
    for a, b in zip(ref_feats, off_feats):
        assert torch.equal(a, b)
    for key in ('bboxes', 'scores', 'labels', 'masks'):
        assert torch.equal(ref.pred_instances[key], off.pred_instances[key]), key
    mmvq.enable_quantizers(model, True)


def test_uniform_w8a8_close_and_overrides(coco_image):
    model = build('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', seed=1)
    _, ref_feats = run(model, coco_image)
    qcfg = dict(UNIFORM8, roles=dict(UNIFORM8['roles'], fc2_input=dict(type='AdaLogQuantizer', bits=8, shift=0.17)),
                overrides=[dict(name='*stages.3*', roles=dict(act=dict(bits=4))),
                           dict(name='*stages.2.blocks.0.*', roles=dict(linear_input=None))])
    bits = {(site.name, slot): (cfg and (cfg['type'], cfg['bits']))
            for site, cfgs in mmvq.plan(model, qcfg) for slot, cfg in cfgs.items()}
    fc2 = 'backbone.stages.{}.blocks.0.ffn.layers.1'
    assert bits[(fc2.format(3), 'input')] == ('AdaLogQuantizer', 4)     # merged through the chain
    assert bits[(fc2.format(3), 'weight')] == ('UniformQuantizer', 8)
    assert bits[(fc2.format(1), 'input')] == ('AdaLogQuantizer', 8)
    assert bits[(fc2.format(2), 'input')] is None                       # disabled by pattern
    assert bits[('backbone.stages.2.blocks.0.attn.w_msa', 'q')] == ('UniformQuantizer', 8)
    mmvq.convert(model, UNIFORM8)
    mmvq.set_quant_mode(model, 'calib')
    run(model, coco_image)
    mmvq.finish_calibration(model)
    _, q_feats = run(model, coco_image)
    assert min(sqnr(a, b) for a, b in zip(ref_feats, q_feats)) > 25.0


def test_cascade_swin_s_whole_detector_scope():
    model = build(osp.join(CONFIGS, '_base_/models/cascade-mask-rcnn_swin-s-p4-w7_fpn.py'))
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    mmvq.convert(model, dict(UNIFORM8, scope='model'))
    counts = type_counts(model)
    assert counts['QuantWindowMSA'] == 24 and counts['QuantMatMul'] == 48   # 2+2+18+2 blocks
    assert counts['QuantConv2d'] == n_conv == 39      # patch embed, FPN 8, RPN 3, 3 x (4 bbox + 5 mask)
    assert counts['QuantLinear'] == n_linear == 108   # 24 x 4 + 3 reductions + 3 x (fc, cls, reg)
    assert counts['ConvTranspose2d'] == 3             # mask upsampling stays float
    scopes = collections.Counter(r['module'].split('.')[0] for r in mmvq.quant_summary(model))
    assert set(scopes) == {'backbone', 'neck', 'rpn_head', 'roi_head'}


def test_unsupported_backbone_is_a_clear_error():
    from mmdet.models.backbones import ResNet
    with pytest.raises(TypeError, match='is not supported by mmvq; supported: mmdet.SwinTransformer'):
        mmvq.convert(ResNet(depth=18), UNIFORM8)


def test_state_dict_float_load_and_quantized_round_trip():
    x = torch.randn(2, 3, 112, 112)
    float_model = small_swin()
    float_sd = float_model.state_dict()
    model = mmvq.convert(small_swin(), FQVIT8)
    # float keys survive conversion; a float checkpoint loads strictly
    assert set(float_sd) <= set(model.state_dict())
    model.load_state_dict(float_sd, strict=True)
    mmvq.calibrate(model, [x[:1]])
    with torch.no_grad():
        out = model(x)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.endswith('input_quantizer.alpha') for k in saved)
    fresh = mmvq.convert(small_swin(), FQVIT8)
    fresh.load_state_dict(saved, strict=True)
    mmvq.set_quant_mode(fresh, 'quant')
    with torch.no_grad():
        out2 = fresh(x)
    for a, b in zip(out, out2):
        assert torch.equal(a, b)

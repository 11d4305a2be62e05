"""LayerNorm scale reparameterization (RepQ-ViT / AdaLog): by hand, exact in
float, closer to per-channel quantization, wired through FPCS on real
mmpretrain models."""
import copy
import glob
import os.path as osp

import pytest
import torch
import torch.nn as nn

import mmvq
from helpers import ROOT
from mmvq.calibration.reparam import ln_linear_pairs, per_channel_params, reparameterize
from mmvq.quantizers.uniform import affine_params, fake_quant_affine

W4 = dict(type='UniformQuantizer', bits=4, granularity='channel', ch_axis=0)
A4 = dict(type='UniformQuantizer', bits=4)


class LNLinear(nn.Module):
    def __init__(self, c=8, out=5):
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.reduction = nn.Linear(c, out)


def _quantize_linear(m, weight=True):
    """The Linear of an ``LNLinear`` as mmvq's QuantLinear (4-bit input, weights)."""
    from mmvq.modules.base import swap_class
    from mmvq.modules.linear import QuantLinear
    lin = swap_class(m.reduction, QuantLinear)
    lin.quant_setup(dict(input=dict(A4), weight=dict(W4) if weight else None, output=None))
    return lin


def _ln_linear(seed=0):
    g = torch.Generator().manual_seed(seed)
    m = LNLinear()
    with torch.no_grad():
        # strong inter-channel variation of the LayerNorm output (the case it is for)
        m.norm.weight.copy_(torch.tensor([0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0]))
        # channels straddle 0, as trained LayerNorm outputs do (the reference's
        # zero-point grid, codes 0..15 around the middle, assumes it)
        m.norm.bias.copy_(0.1 * torch.randn(8, generator=g) * m.norm.weight)
        m.reduction.weight.copy_(torch.randn(5, 8, generator=g))
        m.reduction.bias.copy_(torch.randn(5, generator=g))
    x = torch.randn(64, 8, generator=g) * 3 + 1
    return m, x


def test_reparameterize_by_hand():
    m, x = _ln_linear()
    ref_ln, ref = m.norm(x), m.reduction(m.norm(x))
    lin = _quantize_linear(m)
    (pair, ) = list(ln_linear_pairs(m))
    assert pair[0] == 'norm' and pair[2] == 'reduction'
    s_c, z_c = per_channel_params(ref_ln, 4)
    s, z = s_c.mean(), z_c.mean().round()
    r = s_c / s
    b = -z_c * s_c / r + z * s
    r2, b2 = reparameterize(m.norm, lin, ref_ln)
    torch.testing.assert_close(r2, r)
    torch.testing.assert_close(b2, b)
    # the LayerNorm now outputs x / r - b, the Linear undoes it: float unchanged
    torch.testing.assert_close(m.norm(x), ref_ln / r - b, rtol=1e-5, atol=1e-5)
    mmvq.set_quant_mode(m, 'float')
    torch.testing.assert_close(lin(m.norm(x)), ref, rtol=1e-4, atol=1e-4)
    # one per-tensor quantizer at the target parameters, the channel minima aligned
    iq = lin.input_quantizer
    assert torch.allclose(iq.scale, s.reshape(1)) and torch.equal(iq.zero_point, z.reshape(1))
    torch.testing.assert_close((-z_c * s_c) / r - b, (-z * s).expand(8), rtol=1e-5, atol=1e-5)


def test_reparameterized_per_tensor_quantization_is_per_channel_quantization():
    """Quantizing ``x / r - b`` with the target (s, z) is quantizing ``x`` with
    each channel's own (s_c, z_c): round(x/s_c) + z_c, shifted by an integer."""
    m, x = _ln_linear(1)
    y = m.norm(x).detach()
    ref = m.reduction(y).detach()
    s_c, z_c = per_channel_params(y, 4)
    per_channel = m.reduction(fake_quant_affine(y, s_c, z_c, 0, 15)).detach()
    s, z = affine_params(y.min(), y.max(), 4, False)
    per_tensor = m.reduction(fake_quant_affine(y, s, z, 0, 15)).detach()
    lin = _quantize_linear(m, weight=False)
    reparameterize(m.norm, lin, y)
    mmvq.set_quant_mode(m, 'float')
    iq = lin.input_quantizer
    with torch.no_grad():
        folded = lin(fake_quant_affine(m.norm(x), iq.scale, iq.zero_point, 0, 15))
    torch.testing.assert_close(folded, per_channel, rtol=1e-4, atol=1e-4)
    err = [float((o - ref).pow(2).mean()) for o in (folded, per_tensor)]
    assert err[0] < 0.7 * err[1], err


def _tiny_vit():
    from mmengine.config import Config

    from helpers import build_classifier as build_from_cfg
    cfg = Config.fromfile(osp.join(ROOT, 'benchmarks', 'configs', 'tiny_vit_cls.py'))
    model = build_from_cfg(cfg)
    ckpt = osp.join(ROOT, 'benchmarks', 'checkpoints', 'tiny_vit_cls.pth')
    model.load_state_dict(torch.load(ckpt, weights_only=True)['state_dict'])
    import mmcv
    files = sorted(glob.glob(osp.join(ROOT, 'tests', 'data', 'fashion_mnist_mini', 'val', '*',
                                      '*.png')))[::10]
    x = torch.stack([torch.from_numpy(mmcv.imread(f, channel_order='rgb')).permute(2, 0, 1)
                     for f in files]).float()
    return model, (x - 72.9) / 90.0


def _swin_cls():
    from helpers import build_classifier as build_from_cfg
    from mmengine.config import Config
    cfg = Config(dict(model=dict(
        type='ImageClassifier',
        backbone=dict(type='SwinTransformer', arch=dict(embed_dims=32, depths=[2, 2],
                                                        num_heads=[1, 2]), img_size=56,
                      window_size=7, drop_path_rate=0.0, out_indices=(1, )),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(type='LinearClsHead', num_classes=7, in_channels=64))))
    model = build_from_cfg(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():          # trained-like LayerNorms: channels of very different scale
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.exp(torch.randn(m.weight.shape, generator=g)))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model, torch.randn(6, 3, 56, 56, generator=g)


@pytest.mark.parametrize('build', [_tiny_vit, _swin_cls], ids=['vit', 'swin'])
def test_fpcs_reparam_keeps_the_float_model(build, tmp_path):
    model, x = build()
    fp = copy.deepcopy(model)
    with torch.no_grad():
        ref = fp(x, mode='tensor')
    qcfg = dict(roles=dict(weight=W4, act=A4))

    def run(reparam):
        m = copy.deepcopy(model)
        mmvq.convert(m, qcfg)
        mmvq.calibrate(m, [x[i:i + 2] for i in range(0, len(x), 2)], lambda mm, b: mm(b, mode='tensor'),
                       searches=[dict(type='fpcs', reparam_ln=reparam, include_padded=True)])
        pairs = list(ln_linear_pairs(m, include_padded=True))
        with torch.no_grad():
            q = m(x, mode='tensor')
            mmvq.enable_quantizers(m, False)
            flt = m(x, mode='tensor')
        return m, pairs, q, flt

    m, pairs, q_rep, flt = run(True)
    n_blocks = 6 if build is _tiny_vit else 4
    merging = 0 if build is _tiny_vit else 1
    assert len(pairs) == 2 * n_blocks + merging
    # every LayerNorm -> Linear pair folded, the float model unchanged
    torch.testing.assert_close(flt, ref, rtol=1e-4, atol=1e-4)
    for ln_name, ln, _, _ in pairs:                       # the LayerNorms really changed
        assert not torch.equal(ln.weight, dict(fp.named_modules())[ln_name].weight), ln_name
    if build is _swin_cls:       # PatchMerging's bias-free reduction got a folded bias
        assert isinstance(dict(m.named_modules())['backbone.stages.0.downsample.reduction'].bias,
                          nn.Parameter)
        # saved and re-loaded: the folded weights and the new bias come back
        from mmvq.checkpoint import load_quantized, save_quantized
        path = str(tmp_path / 'q.pth')
        save_quantized(m, path, qcfg)
        fresh = copy.deepcopy(model)
        load_quantized(fresh, path, qcfg)
        with torch.no_grad():
            mmvq.enable_quantizers(m, True)
            torch.testing.assert_close(fresh(x, mode='tensor'), m(x, mode='tensor'), rtol=0, atol=0)
    _, _, q_plain, flt_plain = run(False)
    torch.testing.assert_close(flt_plain, ref)
    # quantized outputs differ (whether 4-bit accuracy gains depends on the model:
    # on the tiny ViT, with min-max 4-bit weights of the scaled W diag(r), it loses
    # 0.6 dB -- AdaLog pairs it with a weight search; see the module docstring)
    assert not torch.allclose(q_rep, q_plain)

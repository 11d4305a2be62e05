"""Block reconstruction (``block_recon``): AdaRound math against its
definition, the block-output error it lowers, folding, save/load bit for bit,
determinism, units of a detector."""
import copy
import math

import pytest
import torch

import mmvq
from helpers import quant_block, tiny_detector_case, tiny_vit_case
from mmvq.calibration import BlockReconstruction, build_search
from mmvq.calibration.searches.recon import (GAMMA, ZETA, AdaRoundWeight, LinearTempDecay,
                                    TrainableActivation, recon_loss)
from mmvq.checkpoint import load_quantized, save_quantized
from mmvq.quantizers.uniform import UniformQuantizer

W4 = dict(type='UniformQuantizer', bits=4, symmetric=True, granularity='channel', ch_axis=0)


def _weight_quantizer(w, bits=4, symmetric=True):
    q = UniformQuantizer(bits=bits, symmetric=symmetric, granularity='channel', ch_axis=0)
    q.set_mode('calib')
    q(w)
    q.calibrate()
    return q.set_mode('quant')


def test_adaround_starts_at_nearest_and_h_is_the_fraction():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 24, generator=g)
    for symmetric in (True, False):
        q = _weight_quantizer(w, symmetric=symmetric)
        ada = AdaRoundWeight(q, w)
        s, z = q._view(q.scale, w), q._view(q.zero_point, w)
        frac = w / s - torch.floor(w / s)
        # h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1) equals the fraction
        h = torch.clamp(torch.sigmoid(ada.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)
        assert torch.allclose(h, frac, atol=1e-5)
        assert torch.allclose(ada.h(), frac, atol=1e-5)
        # hard rounding at the start = round to nearest (no ties in random data)
        ada.soft = False
        assert torch.equal(ada(w), q.fake_quant(w))
        # soft forward: (clamp(floor + h + z) - z) s
        ada.soft = True
        ref = (torch.clamp(torch.floor(w / s) + frac + z, q.qmin, q.qmax) - z) * s
        assert torch.allclose(ada(w), ref, atol=1e-6)


def test_folded_weight_is_a_fixed_point_of_its_quantizer():
    """Folding writes c*s into the weight; the unchanged quantizer maps it to
    the same codes and floats, bit for bit, whatever rounding was learned."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 40, generator=g) * 0.05
    for symmetric in (True, False):
        q = _weight_quantizer(w, symmetric=symmetric)
        ada = AdaRoundWeight(q, w)
        with torch.no_grad():
            ada.alpha.copy_(torch.randn(ada.alpha.shape, generator=g))   # arbitrary up/down choices
        codes = ada.codes()
        folded = codes * ada.s
        assert torch.equal(q.fake_quant(folded), folded)
        assert torch.equal(q.quantize(folded) - q._view(q.zero_point, w), codes)
        # the learned choice is floor or floor + 1 of the float weight (then clamped)
        fl = torch.floor(w / ada.s)
        ok = (codes == torch.clamp(fl + ada.z, q.qmin, q.qmax) - ada.z) | \
             (codes == torch.clamp(fl + 1 + ada.z, q.qmin, q.qmax) - ada.z)
        assert bool(ok.all())


def test_regulariser_schedule_and_losses_hand_computed():
    d = LinearTempDecay(100, 0.2, 20, 2)
    assert d(1) == 20 and d(19) == 20
    assert d(20) == 20 and d(60) == pytest.approx(2 + 18 * 0.5) and d(100) == pytest.approx(2)
    w = torch.zeros(1, 2)
    q = _weight_quantizer(torch.tensor([[1.0, -1.0]]))
    ada = AdaRoundWeight(q, w)
    with torch.no_grad():
        ada.alpha.copy_(torch.tensor([[0.0, 10.0]]))
    h0 = 0.5 * (ZETA - GAMMA) + GAMMA                         # sigmoid(0) = 0.5 -> 0.5
    h1 = min(1.0, 1 / (1 + math.exp(-10)) * (ZETA - GAMMA) + GAMMA)
    expect = (1 - abs(2 * h0 - 1) ** 2) + (1 - abs(2 * h1 - 1) ** 2)
    assert float(ada.regulariser(2.0).detach()) == pytest.approx(expect, rel=1e-6)
    pred, tgt = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]]), torch.zeros(1, 2, 2)
    # sum over dim 1, mean over the rest, / 10: ((1 + 0) + (4 + 0)) / 2 / 10
    assert float(recon_loss(pred, tgt)) == pytest.approx(0.25)
    p, t = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    kl = float((torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(p, -1))).sum())
    assert float(recon_loss(p, t, 'kl')) == pytest.approx(kl, rel=1e-6)


def test_trainable_activation_learned_scale_and_straight_through():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 8, generator=g)
    q = _weight_quantizer(x.reshape(-1, 1), symmetric=False)
    q = UniformQuantizer(bits=4)
    q.set_mode('calib')
    q(x)
    q.calibrate()
    q.set_mode('quant')
    act = TrainableActivation(q, True, 0.0, torch.Generator().manual_seed(0))
    xr = x.clone().requires_grad_(True)
    y = act(xr)
    assert torch.allclose(y, q.fake_quant(x), atol=1e-6)
    y.sum().backward()
    assert act.scale.grad is not None and xr.grad is not None
    # a non-learned quantizer: value of q(x), identity gradient
    act2 = TrainableActivation(q, False, 0.0, None)
    xr = x.clone().requires_grad_(True)
    y = act2(xr)
    assert torch.equal(y, q.fake_quant(x))
    y.sum().backward()
    assert torch.equal(xr.grad, torch.ones_like(x))
    # QDrop: drop_prob of the elements keep their float value
    act3 = TrainableActivation(q, False, 0.5, torch.Generator().manual_seed(0))
    act3.drop = True
    big = torch.randn(10000, generator=g)
    y = act3(big)
    kept = (y == big) & (q.fake_quant(big) != big)
    assert 0.4 < kept.float().mean() / (q.fake_quant(big) != big).float().mean() < 0.6


def test_bad_arguments_fail_with_one_line():
    for kw, msg in ((dict(drop_prob=1.0), 'drop_prob'), (dict(iters=-1), 'iters'),
                    (dict(images=0), 'images'), (dict(store_device='gpu'), 'store_device'),
                    (dict(head_loss='l1'), 'head_loss'), (dict(batch_size=0), 'batch_size')):
        with pytest.raises(ValueError, match=msg):
            BlockReconstruction(**kw)


# ----------------------------------------------------------------- tiny ViT
def _vit_data(n=48):
    g = torch.Generator().manual_seed(0)
    return [torch.rand(1, 3, 28, 28, generator=g) * 4 - 1 for _ in range(n)]


def _calibrated_vit(recon, data):
    model, _, forward = tiny_vit_case()
    qcfg = copy.deepcopy(quant_block('uniform_w4a4'))
    qcfg['searches'] = [recon] if recon else []
    mmvq.convert(model, qcfg)
    searches = [build_search(dict(recon))] if recon else []
    mmvq.calibrate(model, data, forward, searches)
    return model, forward, searches


def _block_error(model, name, data, forward):
    """MSE of the quantized block ``name`` against the float block on the
    float model's inputs to it (hooks; independent of the stage's report)."""
    block = model.get_submodule(name)
    ins, outs = [], []
    def hook(m, a, o):
        ins.append(a[0])
        outs.append(o)
    h = block.register_forward_hook(hook)
    mmvq.set_quant_mode(model, 'float')
    with torch.no_grad():
        for x in data:
            forward(model, x)
    h.remove()
    mmvq.set_quant_mode(model, 'quant')
    with torch.no_grad():
        err = sum(float((block(i) - o).pow(2).mean()) for i, o in zip(ins, outs))
    return err / len(ins)


@pytest.fixture(scope='module')
def vit_pair():
    data = _vit_data()
    base, forward, _ = _calibrated_vit(None, data)
    recon = dict(type='block_recon', iters=120, batch_size=16, units=['backbone.layers.*', 'head'])
    rec, _, searches = _calibrated_vit(recon, data)
    return base, rec, forward, data, searches[0]


def test_recon_lowers_the_block_output_error(vit_pair):
    base, rec, forward, data, stage = vit_pair
    report = stage.report
    assert report['iters'] == 120 and report['images'] == len(data) and report['drop_prob'] == 0.0
    assert set(report['units']) == {f'backbone.layers.{i}' for i in range(6)} | {'head'}
    # the float model's block inputs are the same in both (reconstruction
    # changes only quantized weights and activation scales)
    for i in (0, 2, 5):
        name = f'backbone.layers.{i}'
        e0, e1 = _block_error(base, name, data, forward), _block_error(rec, name, data, forward)
        assert e1 < 0.9 * e0, (name, e0, e1)
        u = report['units'][name]
        assert not u['reverted'] and u['error_after'] < u['error_before']
        assert 0 < u['flipped'] < 0.5 and u['act_scales_learned'] > 0
    # the patch embedding was not selected: its weights are untouched
    assert torch.equal(base.backbone.patch_embed.projection.weight,
                       rec.backbone.patch_embed.projection.weight)
    # weights are the learned integers times the scale: fixed points of their quantizers
    checked = 0
    for name, m in rec.named_modules():
        wq = getattr(m, 'weight_quantizer', None)
        if isinstance(wq, UniformQuantizer) and name.startswith(('backbone.layers.', 'head.')):
            assert torch.equal(wq(m.weight.detach()), m.weight.detach()), name
            checked += 1
    assert checked == 6 * 4 + 1


def test_recon_survives_save_and_load_bit_for_bit(vit_pair, tmp_path):
    _, rec, forward, data, _ = vit_pair
    path = str(tmp_path / 'q.pth')
    qcfg = mmvq.quant_state(rec).as_dict()
    save_quantized(rec, path, qcfg)
    fresh, _, _ = tiny_vit_case()
    load_quantized(fresh, path, qcfg)
    with torch.no_grad():
        for x in data[:8] + [torch.rand(5, 3, 28, 28)]:
            assert torch.equal(forward(rec, x), forward(fresh, x))
    mmvq.modes.fused_quantizers(fresh, False)
    mmvq.modes.fused_quantizers(rec, False)
    with torch.no_grad():
        x = torch.rand(3, 3, 28, 28)
        assert torch.equal(forward(rec, x), forward(fresh, x))


def test_recon_is_deterministic():
    data = _vit_data(16)
    recon = dict(type='block_recon', iters=10, batch_size=8, units=['backbone.layers.1'])
    a, _, _ = _calibrated_vit(recon, data)
    b, _, _ = _calibrated_vit(recon, data)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------- detector
def test_detector_units_and_qdrop_default():
    model, data, forward = tiny_detector_case()
    qcfg = copy.deepcopy(quant_block('uniform_w4a4'))
    qcfg['scope'] = 'model'
    mmvq.convert(model, qcfg)
    stage = BlockReconstruction(iters=3)
    stage.bind(data, forward)
    names = [n for n, _, _ in stage.units(model)]
    assert names[0] == 'backbone.patch_embed'
    assert any(n.startswith('backbone.stages.0.blocks.') for n in names)
    assert any(n.endswith('downsample') for n in names)
    assert 'neck' in names and 'rpn_head' in names
    assert 'roi_head.bbox_head' in names and 'roi_head.mask_head' in names
    assert stage.wanted_images('detection') == 256
    # backbone scope (the detection default): blocks only; runs end to end
    model, data, forward = tiny_detector_case()
    qcfg['scope'] = 'backbone'
    mmvq.convert(model, qcfg)
    # the accelerator preset: APHQ's QDrop (0.5) and 2 images a step
    stage = BlockReconstruction(iters=3, units=['backbone.stages.0.blocks.0', 'backbone.patch_embed'],
                                budget_preset='accelerator')
    before = model.backbone.stages[0].blocks[0].attn.w_msa.qkv.weight.detach().clone()
    mmvq.calibrate(model, data, forward, [stage])
    assert stage.report['drop_prob'] == 0.5 and stage.report['batch_size'] == 2
    assert stage.report['qdrop_off_on_cpu'] is None and 'drop_prob' not in stage.deviations()
    assert set(stage.report['units']) == {'backbone.stages.0.blocks.0', 'backbone.patch_embed'}
    after = model.backbone.stages[0].blocks[0].attn.w_msa.qkv.weight
    assert after.shape == before.shape and torch.isfinite(after).all()
    with torch.no_grad():
        out = forward(model, data[0])
    assert all(torch.isfinite(t).all() for t in out)


def test_cpu_preset_leaves_qdrop_off_and_says_so():
    model, data, forward = tiny_detector_case()
    mmvq.convert(model, quant_block('uniform_w4a4'))
    stage = BlockReconstruction(iters=2, units=['backbone.patch_embed'])
    mmvq.calibrate(model, data, forward, [stage])
    assert stage.report['drop_prob'] == 0.0 and stage.report['qdrop_off_on_cpu'] == 0.5
    line = stage.deviations()
    assert 'iters=2 (paper: 20000)' in line and 'drop_prob=0 (paper: 0.5' in line
    # given explicitly, QDrop runs on the CPU too
    model, data, forward = tiny_detector_case()
    mmvq.convert(model, quant_block('uniform_w4a4'))
    stage = BlockReconstruction(iters=2, units=['backbone.patch_embed'], drop_prob=0.5)
    mmvq.calibrate(model, data, forward, [stage])
    assert stage.report['drop_prob'] == 0.5 and 'drop_prob' not in stage.deviations()

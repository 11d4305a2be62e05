"""Fused CPU kernels (mmvq/quantizers/fused_cpu.c) against the eager quantizers.

Every kernel must give the eager code's floats bit for bit (AdaLog included:
both paths round the exact logarithm), on the layouts the models hand them
(contiguous, permuted, transposed, 5-D, one image or a batch, 1 or 2
threads), and must really run (the kernel call counter moves). Whole tiny
models give identical outputs fused and eager; ``quant.fused=False`` and
``MMVQ_FUSED=0`` turn the kernels off; a failed build warns once and falls
back to the eager code.
"""
import copy
import math
import os.path as osp

import pytest
import torch
import torch.nn.functional as F

import mmvq
from helpers import calibrated, quant_block, tiny_detector_case, tiny_vit_case
from mmvq.modes import fused_quantizers
from mmvq.quantizers import (AdaLogQuantizer, IGQQuantizer, LogIntSoftmax, PTFQuantizer,
                             UniformQuantizer, fused)
from mmvq.quantizers.adalog import adalog_thresholds
from mmvq.quantizers.lis import lis_fused

G = torch.Generator().manual_seed(0)


def both(q, x):
    """``(fused, eager)`` outputs of quantizer ``q`` on ``x``, asserting the kernel ran."""
    before = sum(fused.CALLS.values())
    with torch.no_grad():
        out = q(x)
        assert sum(fused.CALLS.values()) > before, 'the fused kernel did not run'
        q.fused = False
        ref = q(x)
        q.fused = True
    return out, ref


@pytest.fixture(params=[1, 2], ids=['1thread', '2threads'])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def test_kernels_build_and_report():
    assert fused.kernels() is not None, fused.build_info()
    info = fused.build_info()
    assert osp.isfile(info['path']) and info['compile_s'] >= 0


# ------------------------------------------------------------------ uniform
@pytest.mark.parametrize('kw', [dict(), dict(symmetric=True), dict(bits=4), dict(bits=3),
                                dict(granularity='channel'), dict(granularity='head'),
                                dict(granularity='channel', ch_axis=1, symmetric=True)],
                         ids=lambda kw: ','.join(f'{k}={v}' for k, v in kw.items()) or 'default')
def test_uniform_equals_eager_on_every_layout(kw, threads):
    x = torch.randn(6, 3, 40, 16, generator=G) * 3
    x[0, 0, 0, :4] = torch.tensor([1e4, -1e4, 0.0, -0.0])          # clamped both ends, zeros
    q = calibrated(UniformQuantizer(**kw), x)
    if kw.get('granularity') is None:
        layouts = [x, x[:, :, :, :9], x.permute(0, 2, 1, 3), x.transpose(-2, -1)]
    elif kw.get('ch_axis', -1) == -1 and kw['granularity'] == 'channel':
        layouts = [x, x[:, :, :9], x.permute(0, 2, 1, 3)]            # channels stay last
    else:
        layouts = [x, x[:, :, :, :9], x.transpose(-2, -1)]          # channels/heads on axis 1
    if kw.get('granularity') is None:
        layouts.append(x.reshape(2, 3, 3, 40, 16))                  # 5-D (Swin's window view)
        layouts.append(x.reshape(-1)[:1001])                        # 1-D
    for t in layouts:
        out, ref = both(q, t)
        assert out.shape == ref.shape and torch.equal(out, ref), (kw, t.shape, t.stride())
    # and the definition, by hand: (clamp(round(x / s) + z) - z) s
    s, z = q._view(q.scale, x), q._view(q.zero_point, x)
    hand = (torch.clamp(torch.round(x / s) + z, q.qmin, q.qmax) - z) * s
    assert torch.equal(q(x), hand)


def test_uniform_inplace_output_quantization():
    x = torch.randn(4, 10, 8, generator=G)
    q = calibrated(UniformQuantizer(bits=8), x)
    ref = q(x)
    y = x.clone()
    out = q(y, inplace=True)
    assert out.data_ptr() == y.data_ptr() and torch.equal(out, ref)
    y = x.clone()
    q.fused = False
    assert q(y, inplace=True).data_ptr() != y.data_ptr()            # eager ignores it


def test_ptf_equals_eager(threads):
    x = torch.randn(5, 30, 24, generator=G) * torch.exp(torch.randn(24, generator=G))
    q = calibrated(PTFQuantizer(bits=8), x)
    assert int(q.alpha.max()) > 0
    out, ref = both(q, x)
    assert torch.equal(out, ref)


# ------------------------------------------------------- integer LayerNorm
def test_integer_layernorm_equals_eager(threads):
    from mmvq.adapters.base import layernorm_site
    from mmvq.modules.base import swap_class
    c = 48
    ln = torch.nn.LayerNorm(c)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * torch.randn(c, generator=G))
        ln.weight[3] = 0.0                                          # frexp(0) patch
        ln.bias.copy_(0.2 * torch.randn(c, generator=G))
    x = torch.randn(3, 37, c, generator=G) * torch.exp(torch.randn(c, generator=G))
    site = layernorm_site('0', ln)
    swap_class(ln, site.wrapper).quant_setup(dict(input=dict(type='PTFQuantizer', bits=8),
                                                  output=dict(type='UniformQuantizer', bits=8)),
                                             integer=True)
    model = torch.nn.Sequential(ln)
    mmvq.set_quant_mode(model, 'calib')
    model(x)
    for _, q in mmvq.iter_quantizers(model):
        q.calibrate()
    mmvq.set_quant_mode(model, 'quant')
    n = fused.CALLS['int_ln']
    with torch.no_grad():
        out = model(x)
        assert fused.CALLS['int_ln'] == n + 1
        with fused_quantizers(model, False):
            ref = model(x)
        assert torch.equal(out, ref)
        assert torch.equal(model(x[:, 5:]), ref[:, 5:])            # strided input


# ----------------------------------------------------------- Log-Int-Softmax
@pytest.mark.parametrize('bits', [3, 4, 5, 6, 7, 8])
def test_lis_equals_eager(bits, threads):
    for n in (7, 49, 50):
        x = torch.randn(4, 3, n, n, generator=G) * 4
        iq = calibrated(UniformQuantizer(bits=8), x)
        lis = LogIntSoftmax(bits=bits).set_mode('quant')
        mask = torch.where(torch.rand(1, 2, 1, n, n, generator=G) < 0.3, -100.0, 0.0)
        x5 = x.reshape(2, 2, 3, n, n)
        for logits, m in ((x, None), (x5, mask), (x5, mask[:, :, :, :1, :]),
                          (x5, mask.transpose(-1, -2))):
            ref = lis.softmax(iq(logits), iq.scale, m)
            before = fused.CALLS['lis']
            out = lis_fused(lis, iq, logits, m)
            assert fused.CALLS['lis'] == before + 1
            assert torch.equal(out, ref), (bits, n, None if m is None else m.shape)


def test_lis_falls_back_where_float64_is_not_exact():
    x = torch.randn(2, 1, 5, 5, generator=G)
    iq = UniformQuantizer(bits=8)
    iq.set_params(1e-5, 128)                                       # x0 beyond 2^20: int64 path
    lis = LogIntSoftmax(bits=4).set_mode('quant')
    assert lis_fused(lis, iq.set_mode('quant'), x) is None


# --------------------------------------------------------------------- AdaLog
@pytest.mark.parametrize('bits', [3, 4, 6])
@pytest.mark.parametrize('shift', [None, 0.16997124254703522])
def test_adalog_equals_eager_and_the_exact_rounding(bits, shift, threads):
    q = AdaLogQuantizer(bits=bits, shift=shift)
    q.set_params(q=45, scale=0.8)
    q.set_mode('quant')
    x = torch.rand(7, 3, 33, 21, generator=G) ** 6
    if shift:
        x = x - shift
    x.view(-1)[:4] = torch.tensor([0.0, 1e-30, 2.0, -5.0])
    out, ref = both(q, x)
    assert torch.equal(out, ref)
    # codes: round(-log2 t * r / q) of the exact logarithm (float64), capped at 2^b
    t = ((x + q.shift) / q.scale).clamp(1e-15, 1.0).double()
    y = -torch.log2(t) * q.r / 45
    exact = torch.round(y).clamp(max=2 ** bits)
    codes = q.quantize(x)
    got = torch.where(codes[1], torch.full_like(codes[0], 2 ** bits), codes[0]).double()
    tie = ((y - y.floor()) - 0.5).abs() < 1e-9
    assert torch.equal(got[~tie], exact[~tie])
    # folded shift: the kernel stops subtracting it
    if shift:
        q.bias_folded.fill_(True)
        q.prime()
        out, ref = both(q, x)
        assert torch.equal(out, ref)


def test_adalog_thresholds_are_exact_comparisons():
    q = torch.tensor([45])
    thr = adalog_thresholds(q, 37, 4)
    assert thr[0] == math.inf and thr[-1] == -math.inf
    exact = torch.exp2(-(torch.arange(16, dtype=torch.float64) + 0.5) * 45 / 37)
    t32 = thr[1:-1]
    assert torch.all(t32.double() <= exact)                         # rounded down ...
    above = torch.nextafter(t32, torch.full_like(t32, math.inf))
    assert torch.all(above.double() > exact)                        # ... to the next float32


# ------------------------------------------------------------------------ IGQ
@pytest.mark.parametrize('shape,unit', [((16, 50, 96), 'channel'), ((1, 700, 40), 'channel'),
                                        ((9, 40), 'channel'), ((4, 24, 7, 7), 'channel'),
                                        ((4, 3, 50, 50), 'row'), ((3, 1, 7, 130), 'row')])
def test_igq_equals_eager(shape, unit, threads):
    x = F.gelu(torch.randn(*shape, generator=G) * 2)
    q = calibrated(IGQQuantizer(bits=4, num_groups=8, unit=unit), x[:2])
    out, ref = both(q, x)
    assert torch.equal(out, ref)


# ------------------------------------------------------------- whole models
@pytest.mark.parametrize('block', ['uniform_w8a8', 'fqvit_w8a8_attn4', 'adalog_w4a4',
                                   'igq_w4a4_g8', 'mixed_w4a4'])
def test_tiny_vit_fused_equals_eager(block, monkeypatch):
    model, data, forward = tiny_vit_case()
    mmvq.quantize(model, dict(quant_block(block), searches=[]), data, forward)
    x = torch.rand(64, 3, 28, 28, generator=G) * 4 - 1
    with torch.no_grad():
        with fused_quantizers(model, False):
            ref = forward(model, x)
        # every activation quantizer of the forward runs a kernel: the eager
        # entry points are not reached
        for mod, name in EAGER_ENTRY_POINTS:
            monkeypatch.setattr(mod, name, _refuse)
        fused.CALLS.clear()
        out = forward(model, x)
    assert sum(fused.CALLS.values()) > 0
    assert torch.equal(out, ref)


def _refuse(*args, **kwargs):
    raise AssertionError('an eager quantizer path ran with the fused kernels on')


EAGER_ENTRY_POINTS = [(mmvq.quantizers.uniform, 'fake_quant_affine'),
                      (mmvq.quantizers.ptf, 'fake_quant_affine'),
                      (mmvq.quantizers.igq, 'fake_quant_affine'),
                      (mmvq.quantizers.adalog, '_unclamped_codes'),
                      (mmvq.quantizers.lis, 'lis_softmax'),
                      (mmvq.modules.layernorm, 'int_layer_norm')]


@pytest.mark.parametrize('block', ['fqvit_w8a8_attn4', 'mixed_w4a4'])
def test_tiny_detector_fused_equals_eager(block):
    model, data, forward = tiny_detector_case()
    mmvq.quantize(model, dict(quant_block(block), searches=[]), data, forward)
    with torch.no_grad():
        out = forward(model, data[0])
        with fused_quantizers(model, False):
            ref = forward(model, data[0])
    for a, b in zip(out, ref):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ switches
def test_quant_fused_false_and_environment_turn_it_off(monkeypatch):
    model, data, forward = tiny_vit_case()
    mmvq.quantize(model, dict(quant_block('uniform_w8a8'), searches=[], fused=False), data, forward)
    assert all(not q.fused for _, q in mmvq.iter_quantizers(model))
    n = sum(fused.CALLS.values())
    with torch.no_grad():
        forward(model, data[0])
    assert sum(fused.CALLS.values()) == n
    with pytest.raises(ValueError, match='quant.fused='):
        mmvq.convert(tiny_vit_case()[0], dict(quant_block('uniform_w8a8'), fused='yes'))
    monkeypatch.setenv('MMVQ_FUSED', '0')
    fused.refresh_env()
    try:
        with fused_quantizers(model, True), torch.no_grad():
            forward(model, data[0])
        assert sum(fused.CALLS.values()) == n
    finally:
        monkeypatch.delenv('MMVQ_FUSED')
        fused.refresh_env()


def test_build_failure_warns_once_and_runs_eager(monkeypatch, tmp_path):
    x = torch.randn(4, 8, 16, generator=G)
    q = calibrated(UniformQuantizer(bits=8), x)
    q.fused = False
    ref = q(x)
    q.fused = True
    monkeypatch.setenv('MMVQ_CC', '/bin/false')
    monkeypatch.setenv('MMVQ_KERNEL_CACHE', str(tmp_path))
    fused.reset()
    try:
        with pytest.warns(RuntimeWarning, match='fused kernels unavailable') as rec:
            out1, out2 = q(x), q(x)
        assert len([w for w in rec if 'fused kernels' in str(w.message)]) == 1
        assert torch.equal(out1, ref) and torch.equal(out2, ref)
        assert 'false failed' in fused.build_info()['error']
        assert not list(tmp_path.iterdir())                        # no half-written library
    finally:
        monkeypatch.undo()
        fused.reset()
    assert fused.kernels() is not None


def test_gradients_keep_the_eager_code():
    x = torch.randn(3, 5, 8, generator=G, requires_grad=True)
    q = calibrated(UniformQuantizer(bits=8), x.detach())
    n = sum(fused.CALLS.values())
    y = q(x)
    assert sum(fused.CALLS.values()) == n and y.requires_grad
    with torch.no_grad():
        copy.deepcopy(q)(x)
    assert sum(fused.CALLS.values()) == n + 1


def test_igq_loaded_with_other_group_count_equals_eager():
    # IGQ allocation changes a layer's group count; a checkpoint brings its
    # buffers into a quantizer built with the config's count
    x = F.gelu(torch.randn(6, 20, 32, generator=G) * 2)
    src = calibrated(IGQQuantizer(bits=4, num_groups=5), x)
    fresh = IGQQuantizer(bits=4, num_groups=8)
    fresh.load_state_dict(src.state_dict())
    fresh.set_mode('quant')
    out, ref = both(fresh, x)
    assert fresh.centres.shape[0] == 5 and torch.equal(out, ref) and torch.equal(out, src(x))

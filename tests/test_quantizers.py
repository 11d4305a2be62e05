"""Quantizer math against hand-computed values and float references."""

import pytest
import torch
import torch.nn.functional as F

from helpers import calibrated
from mmvq.quantizers import (AdaLogQuantizer, IGQQuantizer, LogIntSoftmax, PTFQuantizer,
                             UniformQuantizer)
from mmvq.quantizers.adalog import adalog_tables
from mmvq.quantizers.lis import int_exp, lis_attn_v_shift, lis_dequantize, log_int_softmax, log_round
from mmvq.quantizers.ptf import dyadic, int_layer_norm


# ----------------------------------------------------------------- uniform
def test_uniform_asymmetric_2bit_hand_values():
    x = torch.tensor([-1.0, 0.0, 0.6, 2.0])
    q = calibrated(UniformQuantizer(bits=2), x)
    # range [-1, 2] on 4 levels: s = 3/3 = 1, z = -round(-1/1) = 1
    assert q.scale.item() == pytest.approx(1.0)
    assert q.zero_point.item() == 1.0
    assert torch.equal(q.quantize(x), torch.tensor([0.0, 1.0, 2.0, 3.0]))
    assert torch.allclose(q(x), torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    assert torch.allclose(q(torch.tensor([5.0, -3.0])), torch.tensor([2.0, -1.0]))  # clamped


def test_uniform_symmetric_per_channel_weight_hand_values():
    w = torch.tensor([[1.1, -2.0], [0.5, 0.2]])
    q = calibrated(UniformQuantizer(bits=4, symmetric=True, granularity='channel', ch_axis=0), w)
    s0, s1 = 2.0 / 7, 0.5 / 7
    assert torch.allclose(q.scale, torch.tensor([s0, s1]))
    # 1.1/s0 = 3.85 -> 4, 0.2/s1 = 2.8 -> 3
    expected = torch.tensor([[4 * s0, -2.0], [0.5, 3 * s1]])
    assert torch.allclose(q(w), expected)
    assert q.quantize(w).min() >= -8 and q.quantize(w).max() <= 7


def test_uniform_per_head_granularity():
    x = torch.randn(2, 3, 5, 4) * torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1)
    q = calibrated(UniformQuantizer(bits=8, granularity='head'), x)
    assert q.scale.shape == (3, )
    ratio = q.scale[2] / q.scale[0]
    assert 30 < ratio < 300
    assert (q(x) - x).abs().amax(dim=(0, 2, 3))[0] <= q.scale[0] / 2 + 1e-6


def test_ema_and_percentile_observers():
    q = UniformQuantizer(bits=8, observer='ema', momentum=0.5).set_mode('calib')
    q(torch.tensor([0.0, 1.0]))
    q(torch.tensor([0.0, 3.0]))
    q.calibrate()
    assert q.scale.item() == pytest.approx(2.0 / 255)          # max = 0.5*1 + 0.5*3
    x = torch.arange(10000, dtype=torch.float32)
    p = calibrated(UniformQuantizer(bits=8, observer='percentile', percentile=99.0), x)
    # k = 9900-th smallest = 9899, lower k = 101 -> 100 (range widened to 0)
    assert p.scale.item() == pytest.approx(9899.0 / 255)


def test_omse_clips_outliers_and_lowers_error():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g)
    x[0] = 40.0
    mm = calibrated(UniformQuantizer(bits=4), x)
    om = calibrated(UniformQuantizer(bits=4, observer='omse'), x)
    assert om.scale < mm.scale
    assert (om(x) - x).pow(2).sum() < (mm(x) - x).pow(2).sum()


def test_modes_and_disable():
    q = UniformQuantizer(bits=2)
    x = torch.tensor([0.1, 0.7])
    assert q(x) is x                                  # float mode
    with pytest.raises(RuntimeError, match='before calibration'):
        q.set_mode('quant')(x)
    calibrated(q, x)
    q.enabled = False
    assert q(x) is x
    with pytest.raises(ValueError, match='from 2 to 8'):
        UniformQuantizer(bits=9)


# ---------------------------------------------------------------------- PTF
def test_ptf_hand_values():
    x = torch.stack([torch.linspace(0, 0.1, 64), torch.linspace(-6, 10, 64)], dim=1)  # (64, 2)
    q = calibrated(PTFQuantizer(bits=8), x)
    s8 = 16.0 / 255
    assert q.scale.item() == pytest.approx(s8 / 8)
    assert q.zero_point.item() == 96.0                      # -round(-6 / s8) = round(95.625)
    assert q.alpha.tolist() == [0, 3]
    layer = calibrated(UniformQuantizer(bits=8), x)
    assert (q(x) - x)[:, 0].pow(2).sum() < (layer(x) - x)[:, 0].pow(2).sum() / 20
    assert torch.allclose((q(x) - x)[:, 1], (layer(x) - x)[:, 1], atol=1e-6)


def test_ptf_tied_channels_follow_unfold_layout():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(100, 3, generator=g) * torch.tensor([0.05, 1.0, 8.0])
    x = base.repeat_interleave(4, dim=1)                   # channel c*4 + offset
    q = calibrated(PTFQuantizer(bits=8, tied_channels=4), x)
    assert q.alpha.view(3, 4).unique(dim=1).shape[1] == 1
    assert q.alpha.view(3, 4)[:, 0].tolist() == sorted(q.alpha.view(3, 4)[:, 0].tolist())


def int_ln_float_definition(codes, zp, alpha, s, w, b, s_out, z_out, qmin, qmax):
    """FQ-ViT's integer LayerNorm written in float64 (the definition)."""
    x = (codes.double() - zp.double()) * 2.0 ** alpha.double()
    c = x.shape[-1]
    std = s.double() / c * torch.sqrt(c * (x * x).sum(-1, keepdim=True) - x.sum(-1, keepdim=True) ** 2)
    mean = x.sum(-1, keepdim=True) / c * s.double()
    a = s.double() / std * w.double() / s_out.double()
    m, n = dyadic(a.abs())
    bb = torch.round((b.double() - mean / std * w.double()) / s_out.double() * 2.0 ** n)
    y = torch.floor((torch.sign(a) * m * x + bb) / 2.0 ** n + 0.5)
    return torch.clamp(y + z_out.double(), qmin, qmax).to(torch.int64)


def test_integer_layernorm_bit_exact_and_close_to_float():
    g = torch.Generator().manual_seed(0)
    c = 96
    x = torch.randn(8, 49, c, generator=g) * torch.exp(torch.randn(c, generator=g))
    w = 1 + 0.3 * torch.randn(c, generator=g)
    w[[5, 17]] = 0.0                       # frexp(0) has exponent 0: the n = 8 branch
    w[[6, 40]] *= -1
    b = 0.2 * torch.randn(c, generator=g)
    ptf = calibrated(PTFQuantizer(bits=8), x)
    ref = F.layer_norm(ptf(x), (c, ), w, b, eps=0.0)
    out_q = calibrated(UniformQuantizer(bits=8), ref)
    # zero-weight channels output round(bias / s_out) at 2^-8 precision (N = 8):
    # bias / s_out just below a half gives 3 + 1, at 2^-31 precision it would give 3
    b[5] = (3.5 - 2 ** -10) * float(out_q.scale)
    codes = ptf.quantize(x)
    y_q, y = int_layer_norm(codes, ptf.zero_point, ptf.alpha, ptf.scale, w, b, out_q.scale,
                            out_q.zero_point, out_q.qmin, out_q.qmax)
    assert y_q.dtype == torch.int64
    assert (y_q[..., 5] == int(out_q.zero_point) + 4).all()
    assert torch.equal(y_q, int_ln_float_definition(codes, ptf.zero_point, ptf.alpha, ptf.scale, w, b,
                                                     out_q.scale, out_q.zero_point, 0, 255))
    assert torch.equal(int_layer_norm(codes, ptf.zero_point, ptf.alpha, ptf.scale, w, b, out_q.scale,
                                      out_q.zero_point, out_q.qmin, out_q.qmax,
                                      return_codes=False)[1], y)
    # against float LayerNorm of the dequantized input, output-quantized:
    # the 8-bit dyadic multiplier costs at most 2 output LSBs
    lsb = (y - out_q(ref)).abs() / out_q.scale
    assert lsb.max() <= 2.0 + 1e-4
    assert lsb.mean() < 0.25


# ---------------------------------------------------------------------- LIS
def test_int_exp_approximates_exp():
    s = 0.01
    x_int = -torch.arange(0, 800, dtype=torch.int64)
    e = int_exp(x_int, s)
    approx = e.double() * 0.35815147 * s * s / 2 ** 30
    exact = torch.exp(x_int.double() * s)
    assert (approx - exact).abs().max() < 5e-3


def test_log_round_hand_values():
    v = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 1023, 1024], dtype=torch.int64)
    # f=floor(log2 v); +1 when v - 2^f >= 2^(f-1)
    assert log_round(v).tolist() == [0, 1, 2, 2, 2, 3, 3, 3, 3, 4, 10, 10]
    # every integer up to 2^16 and around large thresholds, against integer bit arithmetic
    vals = list(range(1, 1 << 16)) + [(3 << k) - d for k in range(16, 38) for d in (1, 0)]
    ref = []
    for x in vals:
        f = x.bit_length() - 1
        ref.append(f + (f > 0 and x - (1 << f) >= 1 << (f - 1)))
    assert log_round(torch.tensor(vals, dtype=torch.int64)).tolist() == ref


def test_lis_hand_values():
    s = 0.1
    equal4 = torch.zeros(1, 4)
    codes, zero = log_int_softmax(equal4, s, bits=4)
    assert codes.tolist() == [[2, 2, 2, 2]] and not zero.any()          # 1/4 = 2^-2
    codes, zero = log_int_softmax(torch.zeros(1, 3), s, bits=4)
    assert codes.tolist() == [[2, 2, 2]]                                 # round(3) -> log_round 2
    # one dominant logit, one tiny: codes 0 and zero
    codes, zero = log_int_softmax(torch.tensor([[10.0, -10.0]]), s, bits=4)
    assert codes[0, 0] == 0 and bool(zero[0, 1])


def test_lis_close_to_float_softmax_and_mask():
    g = torch.Generator().manual_seed(0)
    s = 0.05
    logits = torch.round(torch.randn(2, 3, 16, 16, generator=g) * 40) * s
    p = torch.softmax(logits, -1)
    lis = LogIntSoftmax(bits=4)
    q = lis.softmax(logits, s)
    nz = q > 0
    # the reciprocal 1/p is rounded to an integer, then log-rounded at 1.5 * 2^f:
    # at most ~0.7 of a log2 step away from the float probability
    assert ((q[nz] / p[nz]).log2().abs() <= 0.7).all()
    assert (p[~nz] < 2 ** -15).all()
    mask = torch.zeros(16, 16)
    mask[:, 8:] = -100.0
    qm = lis.softmax(logits, s, mask)
    assert (qm[..., 8:] == 0).all()


def test_lis_float64_path_equals_int64_definition():
    """The float64 fast path gives the int64 definition's codes bit for bit
    (random, peaked, tied and masked rows, 2/4/8 bits), and falls back to it
    where float64 would not be exact."""
    from mmvq.quantizers.lis import _log_codes_float64, _log_codes_int64, float64_exact, lis_softmax
    g = torch.Generator().manual_seed(0)
    fast = 0
    for trial in range(120):
        s = float(10 ** (-2.5 + 2.5 * torch.rand(1, generator=g)))
        n_tok = int(torch.randint(1, 200, (1, ), generator=g))
        spread = float(10 ** (torch.rand(1, generator=g) * 3))
        logits = torch.round(torch.randn(2, 3, n_tok, generator=g) * spread) * s
        if trial % 3 == 1:             # few distinct values: exact ties, half-integer ratios
            levels = torch.randint(-3, 1, (2, 3, n_tok), generator=g).float()
            logits = torch.round(levels * float(torch.rand(1, generator=g)) * 5 / s) * s
        mask = torch.where(torch.rand(3, n_tok, generator=g) < 0.3, -100.0, 0.0) if trial % 2 else None
        for bits in (2, 4, 8):
            ref_codes, ref_zero = _log_codes_int64(logits, s, bits, 30, mask)
            codes, zero = log_int_softmax(logits, s, bits=bits, mask=mask)
            assert torch.equal(codes, ref_codes) and torch.equal(zero, ref_zero)
            assert torch.equal(lis_softmax(logits, s, bits, 30, mask),
                               lis_dequantize(ref_codes, ref_zero, torch.float32))
            if float64_exact(s, 30, n_tok):
                fast += 1
                assert torch.equal(_log_codes_float64(logits, s, bits, 30, mask).clamp(0, 2 ** bits - 1),
                                   ref_codes)
    assert fast > 150                  # the fast path is what ran, not the fallback
    # outside float64's exact range: the int64 path answers
    assert not float64_exact(1e-7, 30, 4)
    assert not float64_exact(2.0, 30, 4)
    assert not float64_exact(0.01, 30, 512)        # row sum bound >= 2^53 / 5
    assert float64_exact(0.05, 30, 197)
    codes, zero = log_int_softmax(torch.zeros(1, 512), 0.01, bits=4)
    assert torch.equal(codes, _log_codes_int64(torch.zeros(1, 512), 0.01, 4, 30, None)[0])


def test_lis_attn_v_by_shifts_equals_float_product():
    g = torch.Generator().manual_seed(0)
    logits = torch.round(torch.randn(2, 2, 7, 7, generator=g) * 30) * 0.05
    codes, zero = log_int_softmax(logits, 0.05, bits=4)
    v_int = torch.randint(-128, 128, (2, 2, 7, 5), generator=g)
    acc, k = lis_attn_v_shift(codes, zero, v_int, bits=4)
    # exact in float64: powers of two times small integers
    shift_out = acc.double() * 2.0 ** -k
    float_out = lis_dequantize(codes, zero, torch.float64) @ v_int.double()
    assert torch.equal(shift_out, float_out)
    assert acc.abs().max() < 2 ** 31                       # fits a 32-bit accumulator here


# ------------------------------------------------------------------- AdaLog
def test_adalog_log2_base_hand_values():
    q = AdaLogQuantizer(bits=3, fixed_scale=1.0)           # q = r = 37: base 2
    q.set_params(q=37)
    x = torch.tensor([1.0, 0.5, 0.25, 0.3, 1e-9])
    codes, zero = q.quantize(x)
    assert codes.tolist()[:4] == [0.0, 1.0, 2.0, 2.0]       # round(-log2 0.3) = round(1.74)
    assert zero.tolist() == [False, False, False, False, True]
    assert torch.allclose(q.fake_quant(x), torch.tensor([1.0, 0.5, 0.25, 0.25, 0.0]))


def test_adalog_tables_match_direct_power():
    bits, r = 4, 37
    for qv in (10, 25, 50, 74, 138):
        t1, t2 = adalog_tables(torch.tensor([qv]), r, bits)
        i = torch.arange(2 ** bits, dtype=torch.float64)
        direct = 2.0 ** (-i * qv / r)
        lut = 2.0 ** -t1[0] * t2[0]
        grid = 2 ** (bits + 1) - 2
        assert torch.all((lut - direct).abs() <= 2.0 ** -t1[0] / grid / 2 + 1e-12)
        assert torch.equal(t1[0], torch.floor(i * qv / r))


def test_adalog_candidates_equal_fake_quant():
    x = torch.softmax(torch.randn(64, 49), -1)
    quant = AdaLogQuantizer(bits=4, fixed_scale=1.0)
    qs = torch.tensor([20.0, 37.0, 90.0])
    outs = quant.fake_quant_candidates(x, qs, torch.ones(3))
    for j, qv in enumerate(qs.tolist()):
        quant.set_params(q=int(qv))
        assert torch.allclose(outs[j], quant.fake_quant(x), atol=1e-7)


def test_adalog_calibration_beats_log2_on_softmax():
    g = torch.Generator().manual_seed(0)
    x = torch.softmax(torch.randn(32, 49, generator=g) * 2, -1)
    q = calibrated(AdaLogQuantizer(bits=3, fixed_scale=1.0), x)
    err = (q(x) - x).pow(2).mean()
    q.set_params(q=37)
    assert err <= (q(x) - x).pow(2).mean()


def test_adalog_bias_reparameterization_is_exact():
    g = torch.Generator().manual_seed(0)
    fc2 = torch.nn.Linear(16, 8)
    x = F.gelu(torch.randn(4, 10, 16, generator=g) * 2)
    q = calibrated(AdaLogQuantizer(bits=4, shift=0.16997124254703522), x)
    before = fc2(q(x))
    q.fold_shift_into(fc2)
    after = fc2(q(x))
    assert bool(q.bias_folded)
    assert torch.allclose(before, after, atol=1e-5)
    assert (q(x) >= 0).all()                       # codes stay non-negative after folding
    # switched off after the fold, the quantizer still hands fc2 ``x + shift``:
    # fc2's folded bias then gives the float layer back (no weight quantizer here)
    ref = F.linear(x, fc2.weight, fc2.bias + fc2.weight.sum(1) * q.shift)
    q.enabled = False
    assert torch.allclose(fc2(q(x)), ref, atol=1e-5)
    assert not torch.allclose(fc2(x), ref, atol=0.1)        # what returning x would give
    q.enabled = True
    q.mode = 'float'
    assert torch.allclose(fc2(q(x)), ref, atol=1e-5)


# ---------------------------------------------------------------------- IGQ
def test_igq_groups_by_range_and_assigns_per_instance():
    g = torch.Generator().manual_seed(0)
    # 8 channels: 4 small (|x| ~ 0.1), 4 large (|x| ~ 10), calibration instances
    scales = torch.tensor([0.1] * 4 + [10.0] * 4)
    calib = torch.randn(6, 20, 8, generator=g) * scales
    q = calibrated(IGQQuantizer(bits=4, num_groups=2), calib)
    small_g = q.assign(calib[:, :, :4].amin(1), calib[:, :, :4].amax(1))
    large_g = q.assign(calib[:, :, 4:].amin(1), calib[:, :, 4:].amax(1))
    assert small_g.unique().numel() == 1 and large_g.unique().numel() == 1
    assert small_g[0, 0] != large_g[0, 0]
    # instance-aware: instance 1 swaps the roles of the channel halves
    x = torch.randn(2, 20, 8, generator=g) * scales
    x[1] = x[1].flip(-1)
    _, mins, maxs, _ = __import__('mmvq.quantizers.igq', fromlist=['unit_ranges']).unit_ranges(x, 'channel')
    groups = q.assign(mins, maxs)
    assert torch.equal(groups[1], groups[0].flip(-1))
    # the small channels keep fine resolution
    err = (q(x) - x).abs()
    assert err[0, :, :4].max() < 0.05


@pytest.mark.parametrize('shape', [(12, 16), (6, 5, 16), (4, 16, 3, 3)])
def test_igq_prediction_never_depends_on_the_rest_of_the_batch(shape):
    """Each sample (a row of a 2-D head input, a batch element otherwise) is
    its own instance: quantized alone or inside a batch, the same values.
    (A 2-D input used to be one instance: on a class-sorted test set the
    classifier head then shared ranges within a batch of one class.)"""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g) * torch.exp(torch.randn(16, generator=g)).reshape(
        (16, 1, 1) if len(shape) == 4 else (16, ))
    q = calibrated(IGQQuantizer(bits=4, num_groups=4), x)
    whole = q(x)
    alone = torch.cat([q(x[i:i + 1]) for i in range(shape[0])])
    assert torch.equal(whole, alone)
    assert not torch.equal(whole, x)
    if len(shape) == 2:            # a row's groups follow its own values
        from mmvq.quantizers.igq import unit_ranges
        view, mins, maxs, _ = unit_ranges(x, 'channel')
        assert view.shape == (12, 16, 1) and torch.equal(mins, x) and torch.equal(maxs, x)


def test_igq_error_between_uniform_and_per_channel_and_rows():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 50, 32, generator=g) * torch.exp(2 * torch.randn(32, generator=g))
    uni = calibrated(UniformQuantizer(bits=4), x)
    igq = calibrated(IGQQuantizer(bits=4, num_groups=8), x)
    upper = calibrated(IGQQuantizer(bits=4, num_groups=32), x)
    e = [(m(x) - x).pow(2).mean() for m in (uni, igq, upper)]
    assert e[0] > e[1] > e[2]
    attn = torch.softmax(torch.randn(2, 3, 16, 16, generator=g) * 3, -1)
    rows = calibrated(IGQQuantizer(bits=4, num_groups=4, unit='row'), attn)
    assert rows(attn).shape == attn.shape
    assert (rows(attn) - attn).pow(2).mean() < (calibrated(UniformQuantizer(bits=4), attn)(attn) - attn).pow(2).mean()
    with pytest.raises(ValueError, match='larger than the 32 channels'):
        calibrated(IGQQuantizer(bits=4, num_groups=33), x)


# ------------------------------------------------------- fast paths == definitions
def test_fake_quant_affine_equals_textbook_form_bit_for_bit():
    from mmvq.quantizers.uniform import fake_quant_affine
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 33, generator=g) * 3
    x[0, :4] = torch.tensor([1e30, -1e30, 0.5, 2.5])       # clamped ends and exact ties
    for scale, zp, lo, hi in ((torch.tensor(0.1), torch.tensor(7.0), 0, 15),
                              (torch.tensor(0.5), torch.tensor(0.0), -8, 7),
                              (torch.rand(33, generator=g) + 0.05,
                               torch.randint(0, 255, (33, ), generator=g).float(), 0, 255)):
        ref = (torch.clamp(torch.round(x / scale) + zp, lo, hi) - zp) * scale
        assert torch.equal(fake_quant_affine(x, scale, zp, lo, hi), ref)


def test_pow2_equals_ldexp_exactly():
    from mmvq.quantizers.ptf import pow2
    n = torch.arange(-1022, 1024)
    assert torch.equal(pow2(n), torch.ldexp(torch.ones(n.shape, dtype=torch.float64), n))
    x = torch.randn(300, 7, dtype=torch.float64)
    e = torch.randint(-40, 40, (300, 7))
    assert torch.equal(x * pow2(e), torch.ldexp(x, e))


@pytest.mark.parametrize('shift', [None, 0.16997124254703522])
def test_adalog_fused_fake_quant_equals_quantize_dequantize(shift):
    q = AdaLogQuantizer(bits=4, shift=shift)
    q.set_params(q=45, scale=0.8)
    q.set_mode('quant')
    x = torch.rand(4, 3, 20, 20, generator=torch.Generator().manual_seed(1)) ** 4
    if shift:
        x = x - shift
    x[0, 0, 0, :3] = torch.tensor([0.0, 1e-12, 2.0])         # zero code, tiny, clamped
    codes, zero = q.quantize(x)
    ref = q.dequantize(codes, zero) - (q.shift if shift else 0.0)
    assert torch.equal(q.fake_quant(x), ref)
    assert bool(zero.any())


def test_cached_quantized_weight_tracks_weight_and_params():
    import torch.nn as nn
    from mmvq.modules.base import swap_class
    from mmvq.modules.linear import QuantLinear
    lin = swap_class(nn.Linear(8, 4), QuantLinear)
    lin.quant_setup(dict(weight=dict(type='UniformQuantizer', bits=4, symmetric=True,
                                     granularity='channel', ch_axis=0)))
    calibrated(lin.weight_quantizer, lin.weight.detach())
    wq = lin.weight_quantizer
    x = torch.randn(3, 8)
    with torch.no_grad():
        first = lin(x)
        assert torch.equal(first, lin(x))
        assert torch.equal(lin.quantized_weight(), wq(lin.weight))
        lin.weight.mul_(2)                                   # in-place weight change
        assert torch.equal(lin.quantized_weight(), wq(lin.weight))
        wq.scale.mul_(2)                                     # in-place parameter change
        assert torch.equal(lin.quantized_weight(), wq(lin.weight))
        wq.enabled = False
        assert torch.equal(lin.quantized_weight(), lin.weight)
    assert not any('cache' in k for k in lin.state_dict())
    # the cache holds 8-bit codes, not a float copy, and dequantizes them exactly
    wq.enabled = True
    with torch.no_grad():
        w = lin.quantized_weight()
        codes = lin._mmvq_wq_cache[2]
        assert codes.dtype == torch.int8 and codes.shape == lin.weight.shape
        assert torch.equal(w, wq.fake_quant(lin.weight))
        assert int(codes.min()) >= -8 and int(codes.max()) <= 7

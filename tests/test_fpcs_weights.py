"""FPCS over per-channel weight parameters (AdaLog's ``weight_fpcs``)."""
import torch
import torch.nn as nn

from mmvq.calibration import FPCS
from mmvq.modules.base import swap_class
from mmvq.modules.linear import QuantLinear
from mmvq.quantizers.uniform import affine_params, fake_quant_affine

W4 = dict(type='UniformQuantizer', bits=4, granularity='channel', ch_axis=0)
A4 = dict(type='UniformQuantizer', bits=4)


def _linear(seed=0, cin=24, cout=6):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(cin, cout)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(cout, cin, generator=g))
        lin.weight.add_(0.3 * torch.rand(cout, 1, generator=g))   # rows not centred on 0
        lin.bias.copy_(torch.randn(cout, generator=g))
    lin = swap_class(lin, QuantLinear)
    lin.quant_setup(dict(input=dict(A4), weight=dict(W4), output=None))
    lin.weight_quantizer.observe(lin.weight)
    lin.weight_quantizer.calibrate()
    x = torch.randn(200, cin, generator=g)
    lin.input_quantizer.set_range(x.min().reshape(1), x.max().reshape(1))
    return lin, x


def test_weight_grid_is_the_reference_grid():
    """min(16, 2^(b-1)) zero points around the middle code x 128/that scales
    spanning the 0.9..1.0 percentile ranges of each output channel."""
    lin, _ = _linear()
    from mmvq.calibration.grid import row_grid
    w = lin.weight.detach()
    scales, zps, delta = row_grid(w, 4, min(16, 2 ** 3))
    assert scales.shape == (128, 6) and zps.shape == (128, 6)
    # 4 bits: 2^3 = 8 zero points (codes 4..11) x 16 scales
    assert zps[:, 0].unique().tolist() == list(map(float, range(4, 12)))
    up = torch.quantile(w, torch.tensor([0.9, 1.0]), dim=1)
    lo = torch.quantile(w, torch.tensor([0.1, 0.0]), dim=1)
    torch.testing.assert_close(scales[0], (up[0] - lo[0]) / 15)
    torch.testing.assert_close(scales[15], (up[1] - lo[1]) / 15)
    torch.testing.assert_close(delta, (scales[1] - scales[0]))
    s3, z3, _ = row_grid(w, 3, min(16, 2 ** 2))        # 3 bits: 4 zero points x 32 scales
    assert z3[:, 0].unique().tolist() == [2.0, 3.0, 4.0, 5.0] and s3.shape == (128, 6)


def test_weight_search_on_own_error_beats_min_max_per_channel():
    lin, _ = _linear(1)
    w = lin.weight.detach()
    minmax = (lin.weight_quantizer.fake_quant(w) - w).pow(2).mean(dim=1)
    f = FPCS(steps=6)
    f._search_weights(lin, None, None)
    searched = (lin.weight_quantizer.fake_quant(w) - w).pow(2).mean(dim=1)
    assert (searched <= minmax + 1e-9).all() and searched.sum() < 0.97 * minmax.sum()
    # and it is at least as good as the best candidate of the initial grid
    from mmvq.calibration.grid import row_grid
    scales, zps, _ = row_grid(w, 4, 8)
    grid = (fake_quant_affine(w[None], scales[..., None], zps[..., None], 0, 15)
            - w[None]).pow(2).mean(dim=2).amin(dim=0)
    assert (searched <= grid + 1e-9).all()


def test_one_sided_rows_get_their_min_max_zero_point():
    """A row whose range is one-sided (an outlier column moved in by the
    LayerNorm reparameterization) cannot be fitted by the reference's middle
    zero points: with the min-max-centred ones added, the search beats
    min-max; the reference grid alone clips the outlier and loses to it."""
    lin, x = _linear(3, cin=48, cout=8)
    with torch.no_grad():
        lin.weight.mul_(0.1)
        lin.weight[:, 5] = torch.linspace(2.0, 4.0, 8)          # one large positive column
        lin.weight[:4, 5] *= -1                                  # ... negative in half the rows
    wq = lin.weight_quantizer
    wq.reset_observer()
    wq.observe(lin.weight)
    wq.calibrate()
    xq = lin.input_quantizer.fake_quant(x)
    ref = nn.functional.linear(x, lin.weight, lin.bias)

    def out_err():
        w = wq.fake_quant(lin.weight)
        return (nn.functional.linear(xq, w, lin.bias) - ref).pow(2).mean(dim=0)

    minmax = out_err()
    centre = torch.round(-lin.weight.amin(1).clamp(max=0) / wq.scale)
    assert centre[:4].min() >= 12 and centre[4:].max() <= 3     # far from the middle code 8
    errs = {}
    for flag in (False, True):
        FPCS(steps=6, weight_minmax_zero_points=flag)._search_weights(lin, xq, ref)
        errs[flag] = out_err()
        zp = wq.zero_point
        assert (zp[4:] <= 3).all() if flag else ((zp >= 4) & (zp <= 11)).all()
    assert (errs[True] <= minmax * 1.0001).all() and errs[True].sum() < 0.95 * minmax.sum()  # 0.93
    assert errs[False].sum() > 1.5 * minmax.sum()                  # measured 1.69


def test_alternating_search_lowers_the_output_error():
    lin, x = _linear(2)
    ref = nn.functional.linear(x, lin.weight, lin.bias)

    def out_err():
        xq = lin.input_quantizer.fake_quant(x)
        return float((nn.functional.linear(xq, lin.weight_quantizer.fake_quant(lin.weight),
                                           lin.bias) - ref).pow(2).mean())

    before = out_err()
    f = FPCS(search_weights=True)
    f.set_device('cpu')
    report = f._search_linear_alternating(lin, x, 'uniform_linear')
    assert report['kind'] == 'uniform' and out_err() < 0.8 * before
    # the weight parameters are a per-channel asymmetric pair with integer zero points
    wq = lin.weight_quantizer
    assert wq.scale.shape == (6, ) and torch.equal(wq.zero_point, wq.zero_point.round())
    s, z = affine_params(lin.weight.amin(1), lin.weight.amax(1), 4, False)
    assert not torch.allclose(wq.scale, s)              # not min-max any more


def test_conv_weight_search_on_unfolded_rows():
    """AdaLog's patch-embedding search: the cache keeps the unfolded input rows
    (a convolution is their product with the ``(C_out, C_in k k)`` weight), and
    one weight FPCS on the output error beats per-channel min-max."""
    from mmvq.calibration.cache import SearchCache
    from mmvq.modules.linear import QuantConv2d
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
    with torch.no_grad():
        conv.weight.add_(0.05 * torch.rand(8, 1, 1, 1, generator=g))
    conv = swap_class(conv, QuantConv2d)
    conv.quant_setup(dict(input=None, weight=dict(W4), output=None))
    conv.weight_quantizer.observe(conv.weight)
    conv.weight_quantizer.calibrate()
    x = torch.randn(2, 3, 16, 16, generator=g)
    cache = SearchCache('conv', max_tokens=None, conv=conv)
    rows, ntok = cache.record((x, ))
    assert rows.shape == (2, 16, 48) and ntok == 32
    ref = conv._conv_forward(x, conv.weight, conv.bias).flatten(2).transpose(1, 2)
    torch.testing.assert_close(nn.functional.linear(rows, conv.weight.reshape(8, -1), conv.bias),
                               ref, rtol=1e-5, atol=1e-5)

    def err():
        w = conv.weight_quantizer.fake_quant(conv.weight)
        return float((conv._conv_forward(x, w, conv.bias) - conv._conv_forward(
            x, conv.weight, conv.bias)).pow(2).mean())

    before = err()
    f = FPCS(search_weights=True)
    f.set_device('cpu')
    report = f._search_conv_weights(conv, [rows])
    assert report['kind'] == 'conv-weight' and report['rows'] == 32
    assert err() < 0.9 * before


def test_attention_operands_searched_per_head():
    """AdaLog's ``AsymmetricallyBatchingQuantMatMul``: q and k of ``q @ k^T`` get
    per-head asymmetric (scale, zero point) from the reference grid by FPCS on
    the product's error, alternating; it beats per-head min-max."""
    from mmvq.modules.matmul import QuantMatMul
    g = torch.Generator().manual_seed(4)
    head = dict(type='UniformQuantizer', bits=4, granularity='head')
    mm = QuantMatMul(dict(a=dict(head), b=dict(head)))
    a = torch.randn(6, 3, 10, 8, generator=g) * torch.tensor([0.5, 1.0, 3.0]).view(1, 3, 1, 1)
    b = torch.randn(6, 3, 8, 10, generator=g)
    a[0, 2, 0, 0] = 25.0                                      # an outlier in head 2
    for q, t in ((mm.a_quantizer, a), (mm.b_quantizer, b)):
        q.observe(t)
        q.calibrate()
    ref = a @ b

    def err():
        return float((mm.a_quantizer.fake_quant(a) @ mm.b_quantizer.fake_quant(b) - ref)
                     .pow(2).mean())

    before = err()
    f = FPCS(search_attention=True)
    f.set_device('cpu')
    report = f._search_matmul(mm, a, b)
    assert report['kind'] == 'uniform-matmul'
    assert err() < 0.7 * before
    for q in (mm.a_quantizer, mm.b_quantizer):
        assert q.scale.shape == (3, ) and torch.equal(q.zero_point, q.zero_point.round())
        assert ((q.zero_point >= 4) & (q.zero_point <= 11)).all()     # 8 zero points at 4 bit


def test_uniform_input_search_on_the_reference_grid():
    """A per-tensor Linear input: AdaLog's (scale, zero point) grid (16 zero
    points 0..15 at 4 bit), own error then output error; the result is an
    integer zero point in range and beats min-max on the output."""
    lin, x = _linear(5)
    x = x.clone()
    x[0, 0] = 12.0                                            # an outlier min-max keeps
    lin.input_quantizer.set_range(x.min().reshape(1), x.max().reshape(1))
    ref = nn.functional.linear(x, lin.weight, lin.bias)
    w_hat = lin.weight_quantizer.fake_quant(lin.weight)

    def out_err():
        xq = lin.input_quantizer.fake_quant(x)
        return float((nn.functional.linear(xq, w_hat, lin.bias) - ref).pow(2).mean())

    before = out_err()
    f = FPCS()
    f.set_device('cpu')
    f._search_uniform_linear(lin, x, own=True)
    assert out_err() < before                 # clipping the outlier already helps
    report = f._search_uniform_linear(lin, x)
    assert report['kind'] == 'uniform' and out_err() < 0.8 * before
    zp = lin.input_quantizer.zero_point
    assert torch.equal(zp, zp.round()) and 0 <= float(zp) <= 15


def test_positive_percentiles_are_nearest_rank_over_positive_entries():
    """The reference's ``positive_percentile``: rank ``ceil(n q)`` among the
    ``n`` positive entries, no interpolation, zeros and negatives ignored."""
    from mmvq.calibration.grid import positive_percentiles
    x = torch.tensor([[-1.0, 0.0, 0.5, 0.1, 0.3, 0.2, -0.2],
                      [0.4, 0.05, 0.6, 0.7, 0.8, 0.9, 1.0]])   # 11 positive entries
    got = positive_percentiles(x, (0.5, 0.9, 1.0))
    assert got.tolist() == [0.5, 0.8999999761581421, 1.0]      # ranks 6, 10, 11
    assert positive_percentiles(-x.abs(), (0.9, 1.0)).tolist() == [0.0, 0.0]


def _post_gelu_linear(seed=7, cin=32, cout=8, rows=300):
    from mmvq.quantizers.adalog import GELU_SHIFT
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(cin, cout)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(cout, cin, generator=g) / cin ** 0.5)
    lin = swap_class(lin, QuantLinear)
    lin.quant_setup(dict(input=dict(type='AdaLogQuantizer', bits=4, shift=GELU_SHIFT),
                         weight=dict(W4), output=None))
    lin.weight_quantizer.observe(lin.weight)
    lin.weight_quantizer.calibrate()
    x = nn.functional.gelu(torch.randn(rows, cin, generator=g) * 1.5)
    return lin, x


def test_post_gelu_search_starts_where_the_reference_does():
    """One step of the post-GELU AdaLog search is the reference's first stage:
    bases 10..137 ranked at the scale ``lo + (hi - lo) 126/127`` (``lo``,
    ``hi`` the positive 0.9/1.0 percentiles plus the shift), the best 8 each
    paired with ``linspace(lo, hi, 16)``, the best pair kept — checked by brute
    force with the quantizer's own ``fake_quant``."""
    from mmvq.calibration.grid import positive_percentiles
    lin, x = _post_gelu_linear()
    q = lin.input_quantizer
    w_hat = lin.weight_quantizer.fake_quant(lin.weight)
    ref = nn.functional.linear(x, lin.weight, lin.bias)

    def loss(qv, s):
        q.set_params(q=qv, scale=s)
        return float((nn.functional.linear(q.fake_quant(x), w_hat, lin.bias) - ref).pow(2).mean())

    lo, hi = (positive_percentiles(x, (0.9, 1.0)) + q.shift).tolist()
    start = lo + (hi - lo) * 126 / 127
    ranked = sorted(range(10, 138), key=lambda qv: loss(qv, start))[:8]
    grid = torch.linspace(lo, hi, 16).tolist()
    want = min(((qv, s) for qv in ranked for s in grid), key=lambda c: loss(*c))
    f = FPCS(steps=1)
    f.set_device('cpu')
    report = f._search_adalog_linear(lin, x)
    assert report['q'] == want[0]
    assert abs(report['scale'] - want[1]) < 1e-6 * want[1]


def test_post_gelu_search_refines_by_replacing_survivors():
    """The later FPCS steps search around the survivors with a shrinking step:
    the chosen scale stays within half a grid step (plus the shrinking
    offsets) of the grid, the base among 10..137, and the output error is
    below that of the quantizer's own calibration."""
    from mmvq.calibration.grid import positive_percentiles
    lin, x = _post_gelu_linear(8)
    q = lin.input_quantizer
    q.observe(x)
    q.calibrate()
    w_hat = lin.weight_quantizer.fake_quant(lin.weight)
    ref = nn.functional.linear(x, lin.weight, lin.bias)

    def err():
        return float((nn.functional.linear(q.fake_quant(x), w_hat, lin.bias) - ref).pow(2).mean())

    before = err()
    f = FPCS()
    f.set_device('cpu')
    report = f._search_adalog_linear(lin, x)
    lo, hi = (positive_percentiles(x, (0.9, 1.0)) + q.shift).tolist()
    step = (hi - lo) / 15
    reach = 0.5 * step * sum(3.5 ** -r for r in range(5))
    assert 10 <= report['q'] <= 137
    assert lo - reach - 1e-7 <= report['scale'] <= hi + reach + 1e-7
    assert err() < before

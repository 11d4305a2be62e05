"""Per-device representations of the integer paths agree bit for bit (on CPU).

The float64 and int64 representations of Log-Int-Softmax and the sliced
(chunked) evaluation of LIS and integer LayerNorm must give exactly the
codes of the int64 definition; the device policy picks float64 on CPU and
full-rate-FP64 GPUs and int64 elsewhere.
"""
import pytest
import torch
import torch.nn.functional as F

import mmvq
from mmvq.quantizers import exact
from mmvq.quantizers.lis import _log_codes_int64, lis_dequantize, lis_softmax


@pytest.fixture
def forced():
    yield exact.set_integer_dtype
    exact.set_integer_dtype(None)


def test_lis_representations_and_slices_equal_the_definition():
    g = torch.Generator().manual_seed(0)
    checked = 0
    for trial in range(40):
        s = float(10 ** (-2.3 + 2.0 * torch.rand(1, generator=g)))
        n = int(torch.randint(2, 60, (1, ), generator=g))
        spread = float(10 ** (torch.rand(1, generator=g) * 2.5))
        # Swin layout: (B/nW, nW, heads, N, N) with a (1, nW, 1, N, N) mask
        logits = torch.round(torch.randn(1, 5, 2, n, n, generator=g) * spread) * s
        mask = torch.where(torch.rand(1, 5, 1, n, n, generator=g) < 0.3, -100.0, 0.0) if trial % 2 else None
        for bits in (3, 4, 8):
            ref = lis_dequantize(*_log_codes_int64(logits, s, bits, 30, mask), torch.float32)
            for dtype in (torch.float64, torch.int64):
                for chunk in (None, 7, n * n + 3):
                    out = lis_softmax(logits, s, bits, 30, mask, dtype=dtype, chunk_elems=chunk)
                    assert torch.equal(out, ref), (s, n, bits, dtype, chunk)
                    checked += 1
    assert checked == 40 * 3 * 2 * 3


def test_integer_layernorm_slices_equal_one_pass(monkeypatch):
    g = torch.Generator().manual_seed(1)
    c = 48
    ln = torch.nn.LayerNorm(c)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
        ln.weight[3] = 0.0
        ln.bias.copy_(0.2 * torch.randn(c, generator=g))
    x = torch.randn(3, 37, c, generator=g) * torch.exp(torch.randn(c, generator=g))
    A8 = dict(type='UniformQuantizer', bits=8)
    model = torch.nn.Sequential(ln)
    from mmvq.adapters.base import layernorm_site
    from mmvq.modules.base import swap_class
    site = layernorm_site('0', ln)
    swap_class(ln, site.wrapper).quant_setup(dict(input=dict(type='PTFQuantizer', bits=8), output=A8),
                                             integer=True)
    mmvq.set_quant_mode(model, 'calib')
    model(x)
    mmvq.finish_calibration(model)
    one = model(x)
    monkeypatch.setitem(exact.CHUNK_ELEMS, 'cpu', 5 * c + 1)      # 5 rows per slice
    sliced = model(x)
    assert torch.equal(one, sliced)
    # and it is the integer path (not float LayerNorm): within 2 output LSBs of it
    oq = ln.output_quantizer
    ref = oq.fake_quant(F.layer_norm(ln.input_quantizer.fake_quant(x), (c, ), ln.weight, ln.bias, 0.0))
    lsb = (one - ref).abs() / oq.scale
    assert 0 < lsb.max() <= 2.0 + 1e-4


def test_device_policy(monkeypatch, forced):
    assert exact.integer_dtype('cpu') == torch.float64
    forced(torch.int64)
    assert exact.integer_dtype('cpu') == torch.int64
    forced(None)
    with pytest.raises(ValueError, match='float64, torch.int64 or None'):
        forced(torch.float32)
    # CUDA: full-rate FP64 parts get float64, the others int64 (capabilities faked)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    for cap, want in (((9, 0), torch.float64), ((8, 0), torch.float64), ((8, 6), torch.int64),
                      ((8, 9), torch.int64), ((7, 5), torch.int64), ((7, 0), torch.float64)):
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda i=None, cap=cap: cap)
        exact._device_dtype.cache_clear()
        assert exact.integer_dtype('cuda:0') == want, cap
    exact._device_dtype.cache_clear()
    assert exact.integer_dtype('mps') == torch.int64
    assert exact.chunk_elems('cpu') == 1 << 18 and exact.chunk_elems('cuda:0') == 1 << 24


def test_fqvit_model_identical_in_both_representations(forced):
    """A whole FQ-ViT W8A8/attn4 model gives the same logits with int64 and float64."""
    from helpers import quant_block as block
    from helpers import tiny_vit_case as tiny_vit
    model, data, forward = tiny_vit()
    mmvq.convert(model, block('fqvit_w8a8_attn4'))
    mmvq.calibrate(model, data, forward)
    with torch.no_grad():
        forced(torch.float64)
        a = forward(model, data[0])
        forced(torch.int64)
        b = forward(model, data[0])
    assert torch.equal(a, b)

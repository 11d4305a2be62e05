"""Search budgets by device, store policy of observer records, host-side merge payloads."""
import torch

from mmvq.calibration import FPCS, IGQAllocation
from mmvq.calibration.cache import SearchCache
from mmvq.calibration.driver import store_settings
from mmvq.utils.dist import to_host as _to_host
from mmvq.quantizers.observers import SampleStore, calibration_step, store_policy


def test_presets_by_device_and_explicit_values_win():
    f = FPCS()
    assert f.budget == dict(device='cpu', preset='cpu', max_tokens=512, max_windows=32,
                            uniform_width=8, macs_per_candidate=1 << 24,
                            matmul_macs_per_candidate=1 << 26,
                            differs_from_reference=['macs_per_candidate',
                                                    'matmul_macs_per_candidate', 'max_tokens',
                                                    'max_windows', 'uniform_width'])
    from mmvq.calibration.budget import describe_deviations
    assert describe_deviations('fpcs', f.budget, FPCS.PRESETS) == (
        "[mmvq] fpcs ran with budgets below the paper's on cpu: macs_per_candidate=16777216 "
        '(paper: all), matmul_macs_per_candidate=67108864 (paper: all), max_tokens=512 (paper: all), max_windows=32 (paper: all), '
        'uniform_width=8 (paper: 16)')
    f.set_device(torch.device('cuda', 0))               # only the device's type is read
    assert f.budget == dict(device='cuda:0', preset='accelerator', max_tokens=None,
                            max_windows=None, uniform_width=16, macs_per_candidate=None,
                            matmul_macs_per_candidate=None, differs_from_reference=[])
    assert describe_deviations('fpcs', f.budget, FPCS.PRESETS) is None
    assert f.max_tokens is None and f.uniform_width == 16
    g = FPCS(max_tokens=4096)
    g.set_device('cuda')
    assert g.max_tokens == 4096 and g.max_windows is None and g.budget['preset'] == 'accelerator'
    assert g.budget['differs_from_reference'] == ['max_tokens']
    h = FPCS(max_tokens=1, max_windows=2, uniform_width=3, macs_per_candidate=4,
             matmul_macs_per_candidate=5)
    h.set_device('cuda')
    assert h.budget['preset'] == 'explicit'
    a = IGQAllocation()
    assert (a.max_tokens, a.max_windows) == (1024, 32)
    a.set_device('cuda')
    assert (a.max_tokens, a.max_windows) == (None, None)


def test_budget_preset_chooses_the_reference_budgets_on_any_device():
    """``budget_preset='accelerator'`` gives a CPU run the papers' budgets (a
    small model affords them), ``'cpu'`` bounds an accelerator run; explicit
    values still win, and a wrong name is one clear error."""
    import pytest
    f = FPCS(budget_preset='accelerator')
    assert f.budget == dict(device='cpu', preset='accelerator', max_tokens=None,
                            max_windows=None, uniform_width=16, macs_per_candidate=None,
                            matmul_macs_per_candidate=None, differs_from_reference=[])
    assert f.max_tokens is None and f.macs_per_candidate is None
    g = FPCS(budget_preset='cpu', uniform_width=16)
    g.set_device('cuda')
    assert g.budget['preset'] == 'cpu' and g.max_tokens == 512 and g.uniform_width == 16
    a = IGQAllocation(budget_preset='accelerator')
    assert (a.max_tokens, a.max_windows) == (None, None)
    with pytest.raises(ValueError, match="budget_preset must be one of auto, cpu, accelerator"):
        FPCS(budget_preset='paper')


def test_attention_search_strides_query_rows_only_above_its_budget():
    """The CPU preset's attention-matmul bound: below it (the tiny models, Swin
    windows) every query row is scored; above it (a ViT-S/14 at 224 px) every
    k-th row, k the smallest stride that meets the bound."""
    f = FPCS()
    small_a, small_b = torch.randn(32, 3, 50, 32), torch.randn(32, 3, 32, 50)   # tiny ViT
    assert f._query_rows(small_a, small_b) is small_a
    a, b = torch.randn(32, 6, 257, 64), torch.randn(32, 6, 64, 257)            # ViT-S/14
    got = f._query_rows(a, b)
    macs = a.numel() * 257
    stride = -(-macs // (1 << 26))
    assert stride == 13 and got.shape == (32, 6, 20, 64)
    assert torch.equal(got, a[:, :, ::13]) and got.numel() * 257 <= 1 << 26
    f.set_device('cuda')
    assert f._query_rows(a, b) is a


def test_unbounded_cache_keeps_every_token_and_window():
    lin = SearchCache('linear', max_tokens=None, max_instances=None)
    mm = SearchCache('matmul', max_windows=None)
    with calibration_step(0, expected=4):
        lin.update((torch.randn(3, 777, 8), ))
        mm.update((torch.randn(50, 2, 7, 7), torch.randn(50, 2, 7, 4)))
    assert lin.data()[0].shape == (3, 777, 8)
    assert mm.data()[0].shape == (50, 2, 7, 7)
    bounded = SearchCache('linear', max_tokens=512)
    with calibration_step(0, expected=4):
        bounded.update((torch.randn(3, 777, 8), ))
    assert bounded.data()[0].shape[1] <= 512 // 4 // 3 + 1


def test_search_cache_sees_the_same_rows_for_one_batch_of_32_or_32_batches_of_1():
    """AdaLog calibrates on one batch of 32 images, ptq.py on 32 batches of one:
    without a token budget (the papers' setting) the searches see the same data."""
    x = torch.randn(32, 50, 8)

    def rows(cache):
        t = torch.cat([r.reshape(-1, 8) for r in cache.data()])
        return t[torch.argsort(t[:, 0])]

    one, many = SearchCache('linear', max_tokens=None), SearchCache('linear', max_tokens=None)
    with calibration_step(0, expected=1):
        one.update((x, ))
    for i in range(32):
        with calibration_step(i, expected=32):
            many.update((x[i:i + 1], ))
    assert torch.equal(rows(one), rows(many)) and rows(one).shape == (32 * 50, 8)
    # under the CPU budget both are thinned (a documented, recorded deviation)
    cpu = SearchCache('linear', max_tokens=512)
    with calibration_step(0, expected=1):
        cpu.update((x, ))
    assert cpu.data()[0].shape[0] == 16


def test_store_policy_bounds_bytes_and_places_records():
    x = torch.randn(256, 4096)                          # 256 channels
    store = SampleStore(ch_axis=0, max_columns=4096)
    with store_policy(device='cpu', max_bytes=256 * 4 * 100):
        store.update(x)
    assert store.data().shape == (256, 100)             # 100 columns fit in the bytes
    assert torch.equal(store.data(), x[:, ::41])         # evenly strided: ceil(4096 / 100)
    meta = SampleStore(ch_axis=0)
    with store_policy(device='meta'):                   # any device: records move there
        meta.update(x)
    assert meta.data().device.type == 'meta'
    assert store.data('meta').device.type == 'meta'     # a reader takes them to its device
    assert store_settings(dict(calib=dict(store_device='same', store_mb=8))) == dict(
        device='same', max_bytes=8 << 20)
    assert store_settings({}) == dict(device='cpu', max_bytes=64 << 20)


def test_records_go_to_the_host_before_gathering():
    recs = {'a:observer': {(0, 0): (torch.ones(2), torch.zeros(2))},
            'b:cache': {(1, 0): (torch.ones(1, 2, 3), 7)}}
    out = _to_host(recs)
    assert out.keys() == recs.keys() and out['b:cache'][(1, 0)][1] == 7
    assert isinstance(out['a:observer'][(0, 0)], tuple)
    assert all(t.device.type == 'cpu' for t in out['a:observer'][(0, 0)])

"""CUDA: each quantizer equals its CPU self, and whole models calibrate and agree.

Skipped where no CUDA device exists (this project's CI and development
machines have none; the CPU device-strict tier, tests/test_device_strict.py,
is what keeps mmvq device-clean there). On a GPU machine::

    python -m pytest tests/test_cuda.py -v
"""
import copy

import pytest
import torch

import mmvq
from mmvq.quantizers import (AdaLogQuantizer, IGQQuantizer, LogIntSoftmax, PTFQuantizer,
                             UniformQuantizer)
from mmvq.quantizers.lis import _log_codes_int64, lis_dequantize, lis_softmax
from mmvq.utils.strict import count_host_syncs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason='needs a CUDA device (none on this machine)')

CASES = {
    'uniform_tensor': (lambda: UniformQuantizer(bits=4), (8, 50, 64)),
    'uniform_channel': (lambda: UniformQuantizer(bits=4, symmetric=True, granularity='channel', ch_axis=0),
                        (64, 32)),
    'uniform_head': (lambda: UniformQuantizer(bits=4, granularity='head'), (4, 3, 49, 32)),
    'uniform_omse': (lambda: UniformQuantizer(bits=6, observer='omse'), (8, 50, 64)),
    'ptf': (lambda: PTFQuantizer(bits=8), (8, 50, 64)),
    'adalog_softmax': (lambda: AdaLogQuantizer(bits=4, fixed_scale=1.0), (4, 3, 49, 49)),
    'adalog_gelu': (lambda: AdaLogQuantizer(bits=4, shift=0.16997124254703522), (8, 50, 64)),
    'igq_channel': (lambda: IGQQuantizer(bits=4, num_groups=8), (8, 50, 64)),
    'igq_row': (lambda: IGQQuantizer(bits=4, num_groups=8, unit='row'), (4, 3, 49, 49)),
}


def _data(name, shape, g):
    x = torch.randn(*shape, generator=g)
    if name.startswith('adalog_softmax') or name == 'igq_row':
        return x.mul(3).softmax(-1)
    if name == 'adalog_gelu':
        return torch.nn.functional.gelu(x * 2)
    if name == 'ptf':
        return x * torch.exp(torch.randn(shape[-1], generator=g))
    return x


@pytest.mark.parametrize('name', list(CASES))
def test_quantizer_cpu_and_cuda_outputs_equal(name):
    make, shape = CASES[name]
    g = torch.Generator().manual_seed(0)
    x = _data(name, shape, g)
    cpu = make()
    cpu.set_mode('calib')
    cpu(x)
    cpu.calibrate()
    cpu.set_mode('quant')
    gpu = copy.deepcopy(cpu).cuda()
    ref, out = cpu(x), gpu(x.cuda()).cpu()
    if name.startswith('adalog'):
        # log2 may differ by an ulp between CPU and CUDA libm: a code flips at an exact tie
        assert (ref != out).float().mean() < 1e-4
    else:
        assert torch.equal(ref, out), name


@pytest.mark.parametrize('dtype', [torch.float64, torch.int64])
def test_lis_cuda_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    s = 0.05
    logits = torch.round(torch.randn(1, 6, 3, 49, 49, generator=g) * 40) * s
    mask = torch.where(torch.rand(1, 6, 1, 49, 49, generator=g) < 0.3, -100.0, 0.0)
    ref = lis_dequantize(*_log_codes_int64(logits, s, 4, 30, mask), torch.float32)
    out = lis_softmax(logits.cuda(), s, 4, 30, mask.cuda(), dtype=dtype, chunk_elems=20000)
    assert torch.equal(out.cpu(), ref)
    lis = LogIntSoftmax(bits=4).cuda()
    assert torch.equal(lis.softmax(logits.cuda(), torch.tensor([s]).cuda()).cpu(),
                       lis_dequantize(*_log_codes_int64(logits, s, 4, 30, None), torch.float32))


@pytest.mark.parametrize('method', ['fqvit_w8a8_attn4', 'adalog_w4a4', 'igq_w4a4_g8', 'mixed_w4a4',
                                    'uniform_w8a8'])
def test_tiny_models_calibrate_and_agree_on_cuda(method):
    from helpers import flat
    from helpers import quant_block as block
    from helpers import tiny_detector_case as tiny_detector
    from helpers import tiny_vit_case as tiny_vit
    for build in (tiny_vit, tiny_detector):
        outs = []
        for device in ('cpu', 'cuda'):
            model, data, forward = build()
            model.to(device)
            if build is tiny_vit:
                data = [x.to(device) for x in data]
            mmvq.convert(model, block(method))
            mmvq.calibrate(model, data, forward)
            assert all(b.device.type == device for _, q in mmvq.iter_quantizers(model) for b in q.buffers())
            with torch.no_grad(), count_host_syncs() as syncs:
                out = flat(forward(model, data[0]))
            assert syncs == [], syncs[:5]
            outs.append([t.float().cpu() for t in out])
        cpu, gpu = outs
        if build is tiny_vit:
            agree = (cpu[0].argmax(-1) == gpu[0].argmax(-1)).float().mean()
            assert agree >= 0.75, f'{method}: CPU/CUDA top-1 agreement {agree:.2f}'
        else:
            assert abs(len(cpu[1]) - len(gpu[1])) <= max(2, len(cpu[1]) // 5)

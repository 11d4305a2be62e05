"""The calibration driver: stage order, detaching on failure, search registry."""
import pytest
import torch
import torch.nn as nn

from mmvq.calibration import BaseSearch, build_search, finish_calibration, run_calibration
from mmvq.modes import iter_quantizers, set_quant_mode
from mmvq.modules import QuantLinear, swap_class
from mmvq.registry import SEARCHES


def tiny_model():
    torch.manual_seed(0)
    lin = swap_class(nn.Linear(8, 4), QuantLinear)
    lin.quant_setup(dict(input=dict(type='UniformQuantizer', bits=8),
                         weight=dict(type='UniformQuantizer', bits=8, symmetric=True)))
    return nn.Sequential(lin)


class Recorder(BaseSearch):
    name = 'recorder'

    def __init__(self, calls, fail=False):
        self.calls, self.fail = calls, fail
        self.report = {}
        self.set_device('cpu')

    def targets(self, model):
        return iter(())

    def attach(self, model):
        self.calls.append('attach')

    def run(self, model, log):
        q = model[0].input_quantizer
        self.calls.append(('run', q.mode, bool(q.is_calibrated())))
        if self.fail:
            raise RuntimeError('search failed')
        self.report = dict(ok=True)

    def detach(self, model):
        self.calls.append('detach')


def test_stages_run_in_order_and_end_in_quant_mode():
    model, calls = tiny_model(), []
    samples = [torch.randn(3, 8) for _ in range(4)]

    def forward(m, x):
        calls.append('forward')
        return m(x)

    times = run_calibration(model, samples, forward, [Recorder(calls)])
    # attach before the forwards; the search sees initial parameters, still
    # in calib mode; detach right after it (and once more at the end)
    assert calls == ['attach'] + ['forward'] * 4 + [('run', 'calib', True), 'detach', 'detach']
    assert list(times) == ['observe', 'init_params', 'recorder']
    assert all(q.mode == 'quant' for _, q in iter_quantizers(model))
    assert not model[0].input_quantizer.observer.records                # records dropped


def test_a_failing_search_still_detaches():
    model, calls = tiny_model(), []
    with pytest.raises(RuntimeError, match='search failed'):
        run_calibration(model, [torch.randn(2, 8)], lambda m, x: m(x), [Recorder(calls, True)])
    assert calls.count('detach') >= 1 and calls[-1] == 'detach'


def test_hand_driven_calibration_equals_the_driver():
    a, b = tiny_model(), tiny_model()
    samples = [torch.randn(3, 8) for _ in range(3)]
    run_calibration(a, samples, lambda m, x: m(x))
    set_quant_mode(b, 'calib')
    with torch.no_grad():
        for x in samples:
            b(x)
    finish_calibration(b)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


def test_searches_are_built_from_the_registry():
    assert set(SEARCHES.module_dict) == {'block_recon', 'fpcs', 'igq_allocation'}
    fpcs = build_search(dict(type='fpcs', steps=4))
    assert fpcs.name == 'fpcs' and fpcs.steps == 4 and build_search(fpcs) is fpcs
    with pytest.raises(KeyError, match=r"unknown search 'fpc'; use one of \['block_recon', 'fpcs', 'igq_allocation'\]"):
        build_search(dict(type='fpc'))

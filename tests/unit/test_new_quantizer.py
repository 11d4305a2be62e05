"""A new quantizer is one file: this module defines a power-of-two-scale
quantizer with only public extension points — ``BaseQuantizer`` and its
capabilities, ``mmvq.QUANTIZERS``, an ONNX export form
(``mmvq.deploy.register_export_form``), an FPCS strategy
(``mmvq.calibration.FPCS_STRATEGIES``) and a reconstruction treatment
(``mmvq.calibration.RECON_TREATMENTS``) — and takes it through conversion,
calibration, FPCS, block reconstruction, save/load, the quant summary, the
analyze report and ONNX export (CONTRIBUTING.md walks through this file)."""
import math

import pytest
import torch

import mmvq
from helpers import sqnr, tiny_vit_case
from mmvq.calibration import (FPCS_STRATEGIES, RECON_TREATMENTS, FPCSStrategy, ReconTreatment,
                              build_search)
from mmvq.calibration.searches.recon import AdaRoundWeight
from mmvq.checkpoint import load_quantized, save_quantized
from mmvq.quantizers import BaseQuantizer
from mmvq.quantizers.base import along_axis
from mmvq.quantizers.observers import MinMaxObserver


# ------------------------------------------------------------ the quantizer
@mmvq.QUANTIZERS.register_module(force=True)
class Pow2Quantizer(BaseQuantizer):
    """Symmetric uniform quantizer whose scale is a power of two,
    ``s = 2^e``, ``e = ceil(log2(max|x| / qmax))`` per tensor or channel; codes
    ``clamp(round(x / s), -2^(b-1), 2^(b-1) - 1)`` (shift-only rescaling).

    Args:
        bits (int): code bits.
        granularity (str): ``'tensor'`` or ``'channel'`` (along ``ch_axis``).
        ch_axis (int): the channel axis (weights: 0).
        enabled (bool): ``False`` makes it the identity.
    """

    kind = 'pow2'
    quantizes_weights = True      # may sit in a weight slot
    affine = True                 # codes(x), scale, zero_point, qmin, qmax, ch_axis, _view

    def __init__(self, bits=8, granularity='tensor', ch_axis=0, enabled=True):
        super().__init__(bits, enabled)
        self.ch_axis = ch_axis if granularity == 'channel' else None
        self.qmin, self.qmax = -2 ** (bits - 1), 2 ** (bits - 1) - 1
        self.register_buffer('scale', torch.ones(1))
        self.register_buffer('zero_point', torch.zeros(1))
        self.reset_observer()

    def reset_observer(self):
        self.observer = MinMaxObserver(self.ch_axis)

    def observe(self, x):
        self.observer.update(x)

    def calibrate(self):
        amax = torch.maximum(-self.observer.min, self.observer.max).to(self.scale.device)
        self.set_exponent(torch.ceil(torch.log2(amax.clamp(min=1e-8) / self.qmax)))

    def set_exponent(self, e):
        e = torch.as_tensor(e, dtype=torch.float32, device=self.scale.device).reshape(-1)
        self._set_buffer('scale', torch.exp2(e))
        self._set_buffer('zero_point', torch.zeros_like(e))
        self.mark_calibrated()

    def _view(self, p, x):
        return along_axis(p, x, self.ch_axis)

    def codes(self, x):
        return torch.clamp(torch.round(x / self._view(self.scale, x)), self.qmin,
                           self.qmax).to(torch.int8)

    def dequantize(self, codes, dtype=torch.float32):
        return codes.to(dtype) * self._view(self.scale, codes)

    def fake_quant(self, x):
        s = self._view(self.scale, x)
        return torch.clamp(torch.round(x / s), self.qmin, self.qmax) * s

    def levels(self):
        s = float(self.scale.reshape(-1)[0])
        return [k * s for k in range(self.qmin, self.qmax + 1)]

    def summary(self):
        return dict(kind=self.kind, bits=self.bits,
                    granularity='tensor' if self.ch_axis is None else 'channel')


# ------------------------------------------------------- its registrations
class Pow2FPCS(FPCSStrategy):
    """FPCS of a per-tensor Linear input: the exponent in ``e0 - 2 .. e0 + 2``
    with the least layer-output error (the float output as reference)."""

    def linear_input_kind(self, fpcs, q):
        return 'pow2_linear' if q.ch_axis is None else None

    def search(self, fpcs, m, kind, x):
        q = m.input_quantizer
        w = m.weight_quantizer.fake_quant(m.weight) if m.weight_quantizer.enabled else m.weight
        ref = torch.nn.functional.linear(x, m.weight, m.bias)
        e0 = float(torch.log2(q.scale).reshape(-1)[0])

        def loss(e):
            q.set_exponent(e)
            return float((torch.nn.functional.linear(q.fake_quant(x), w, m.bias) - ref)
                         .pow(2).mean())
        losses = {e0 + d: loss(e0 + d) for d in (-2, -1, 0, 1, 2)}
        best = min(losses, key=losses.get)
        q.set_exponent(best)
        return dict(kind='pow2', exponent=best, loss=losses[best], loss_minmax=losses[e0])


FPCS_STRATEGIES.register(Pow2Quantizer, Pow2FPCS(), force=True)
# the rounding of a power-of-two weight grid is learned like a uniform one's
RECON_TREATMENTS.register(Pow2Quantizer, ReconTreatment(weight=AdaRoundWeight), force=True)


def _register_export_form():
    from mmvq.deploy import ExportForm, qdq_fn, register_export_form, weight_dq_fn

    def qdq(q):
        return qdq_fn(q.scale, q.zero_point, q.qmin, q.qmax, q.ch_axis)
    register_export_form(Pow2Quantizer, ExportForm('qdq', qdq, qdq=True, weight=weight_dq_fn),
                         force=True)


# -------------------------------------------------------------------- tests
POW2 = dict(name='pow2 W8A8',
            roles=dict(weight=dict(type='Pow2Quantizer', bits=8, granularity='channel'),
                       act=dict(type='Pow2Quantizer', bits=8)))


def _pow2(q):
    e = torch.log2(q.scale)
    return bool(torch.equal(e, torch.round(e)))


@pytest.fixture(scope='module')
def quantized():
    model, data, fwd = tiny_vit_case()
    with torch.no_grad():
        ref = [fwd(model, x) for x in data]
    mmvq.convert(model, dict(POW2, searches=[dict(type='fpcs')]))
    fpcs = build_search(dict(type='fpcs'))
    mmvq.calibrate(model, data, fwd, searches=[fpcs])
    return model, data, fwd, ref, fpcs


def test_converts_and_calibrates(quantized):
    model, data, fwd, ref, _ = quantized
    qs = dict(mmvq.iter_quantizers(model))
    pow2 = [q for q in qs.values() if isinstance(q, Pow2Quantizer) and q.enabled]
    assert len(pow2) >= 20 and all(q.is_calibrated() and _pow2(q) for q in pow2)
    weights = [q for n, q in qs.items() if n.endswith('weight_quantizer') and q.enabled]
    assert weights and all(isinstance(q, Pow2Quantizer) and q.scale.numel() > 1 for q in weights)
    with torch.no_grad():
        out = [fwd(model, x) for x in data]
    assert min(sqnr(r, o) for r, o in zip(ref, out)) > 15.0
    assert mmvq.quant_state(model).name == 'pow2 W8A8'


def test_fpcs_searches_it_through_its_strategy(quantized):
    model, _, _, _, fpcs = quantized
    entries = {k: v for k, v in fpcs.report.items() if v.get('kind') == 'pow2'}
    linears = [n for n, m in model.named_modules() if isinstance(m, mmvq.modules.QuantLinear)
               and m.input_quantizer.enabled and m.input_quantizer.ch_axis is None]
    assert sorted(entries) == sorted(linears) and len(entries) >= 8
    assert all(e['loss'] <= e['loss_minmax'] and float(e['exponent']).is_integer()
               for e in entries.values())
    assert any(e['loss'] < e['loss_minmax'] for e in entries.values())


def test_summary_and_analyze_report(quantized):
    from mmvq import analysis
    model, data, fwd, _, _ = quantized
    summary = mmvq.format_summary(model)
    assert 'pow2' in summary and summary.splitlines()[-1].startswith(
        f'{sum(1 for _ in mmvq.iter_quantizers(model))} quantizers: ')
    rows, total = analysis.layer_sensitivity(model, data[:1], fwd)
    report = analysis.sensitivity_markdown(rows, total, 'pow2')
    assert rows and all(r['kinds'] == 'pow2' for r in rows) and '| pow2 | 8 |' in report
    q = next(q for _, q in mmvq.iter_quantizers(model) if isinstance(q, Pow2Quantizer))
    levels = q.levels()
    assert len(levels) == 256 and levels[0] == -128 * float(q.scale[0])


def test_save_load_bit_for_bit(quantized, tmp_path):
    model, data, fwd, _, _ = quantized
    path = str(tmp_path / 'pow2.q.pth')
    save_quantized(model, path, mmvq.quant_state(model).as_dict())
    fresh, _, _ = tiny_vit_case()
    load_quantized(fresh, path)
    with torch.no_grad():
        for x in data:
            assert torch.equal(fwd(model, x), fwd(fresh, x))


def test_block_reconstruction_learns_its_weight_rounding():
    model, data, fwd = tiny_vit_case()
    mmvq.convert(model, POW2)
    recon = build_search(dict(type='block_recon', iters=20, images=8, batch_size=4))
    before = {n: m.weight.detach().clone() for n, m in model.named_modules()
              if isinstance(getattr(m, 'weight_quantizer', None), Pow2Quantizer)}
    mmvq.calibrate(model, data, fwd, searches=[recon])
    units = recon.report['units']
    assert len(units) >= 3
    changed = 0
    for n, m in model.named_modules():
        if n in before:
            wq = m.weight_quantizer
            # the folded weight is on the power-of-two grid: its codes times s, exactly
            assert torch.equal(wq.fake_quant(m.weight), m.weight.detach())
            changed += int(not torch.equal(m.weight.detach(), wq.fake_quant(before[n])))
    assert changed >= 1


def test_onnx_export_through_its_form(quantized, tmp_path):
    pytest.importorskip('onnxruntime')
    _register_export_form()
    import onnxruntime as ort

    from mmvq.deploy import export_onnx, run_session
    model, data, fwd, _, _ = quantized
    path = str(tmp_path / 'pow2.onnx')
    report = export_onnx(model, data[0], path, forward_fn=fwd)
    forms = {r['name']: r['form'] for r in report['quantizers']}
    assert set(forms.values()) == {'qdq', 'weight-dq'} and report['checks']['ok']
    assert report['checks']['weight_quantizers'] == sum(
        1 for n in forms if n.endswith('weight_quantizer'))
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, plain, providers=['CPUExecutionProvider'])
    (out, ) = run_session(sess, data[0])
    with torch.no_grad():
        expect = fwd(model, data[0])
    err = float((out - expect).abs().max()) / max(1e-12, float(expect.abs().max()))
    assert err < 1e-4, err
    assert math.isfinite(err)


def test_a_quantizer_without_an_export_form_is_named(quantized, tmp_path):
    pytest.importorskip('onnx')
    from mmvq.deploy import EXPORT_FORMS, export_onnx
    model, data, fwd, _, _ = quantized
    EXPORT_FORMS.unregister(Pow2Quantizer)
    try:
        with pytest.raises(LookupError) as err:
            export_onnx(model, data[0], str(tmp_path / 'x.onnx'), forward_fn=fwd)
    finally:
        _register_export_form()
    msg = str(err.value)
    assert '\n' not in msg and 'Pow2Quantizer has no ONNX export form: register one with ' \
        'mmvq.deploy.register_export_form(' in msg
    assert not (tmp_path / 'x.onnx').exists()


def test_a_weight_slot_needs_quantizes_weights():
    @mmvq.QUANTIZERS.register_module(force=True)
    class ActOnly(Pow2Quantizer):
        quantizes_weights = False

    model, _, _ = tiny_vit_case()
    bad = dict(POW2, roles=dict(POW2['roles'], weight=dict(type='ActOnly')))
    with pytest.raises(ValueError, match='ActOnly cannot quantize weights .*quantizes_weights'):
        mmvq.convert(model, bad)

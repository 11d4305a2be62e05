"""mmvq's onnxruntime custom operators (mmvq/deploy/ort_ops.c): each one bit
for bit against mmvq's PyTorch definition on the same inputs (single-node
graphs, onnxruntime's graph optimisations on, as deployed); whole models
exported with ``custom_ops=True`` agreeing with the portable export and with
PyTorch; the C API header's fetch refusing a wrong file."""
import os.path as osp

import numpy as np
import pytest
import torch

pytest.importorskip('onnxruntime')
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import mmvq  # noqa: E402
import mmvq.modes  # noqa: E402
from helpers import calibrated, fashion_images, quant_block, tiny_swin_cls_case, tiny_vit_case  # noqa: E402
from mmvq.deploy import export_onnx, ort_ops, ort_session, run_session  # noqa: E402
from mmvq.quantizers import AdaLogQuantizer, IGQQuantizer, PTFQuantizer  # noqa: E402
from mmvq.quantizers.lis import LN2, POLY, float64_exact, lis_softmax  # noqa: E402
from mmvq.quantizers.ptf import int_layer_norm  # noqa: E402

OUT = {TensorProto.FLOAT: np.float32, TensorProto.UINT8: np.uint8, TensorProto.INT8: np.int8}


def one_node(op, inputs, consts, out_type, **attrs):
    """A graph of one ``mmvq::op`` node: ``inputs`` ({name: array}) are graph
    inputs, ``consts`` ({name: array}) initializers (in the node's input order:
    inputs[0], consts..., inputs[1:])."""
    names = list(inputs)
    order = names[:1] + list(consts) + names[1:]
    node = helper.make_node(op, order, ['y'], domain='mmvq', **attrs)
    vi = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
          for n, a in inputs.items()]
    graph = helper.make_graph([node], 'g', vi, [helper.make_tensor_value_info('y', out_type, None)],
                              [numpy_helper.from_array(np.asarray(a), n) for n, a in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17),
                                                    helper.make_opsetid('mmvq', 1)])
    sess = ort_session(model.SerializeToString())
    return sess.run(None, {n: np.ascontiguousarray(a) for n, a in inputs.items()})[0]


def test_int_layernorm_op_is_the_definition():
    g = torch.Generator().manual_seed(0)
    c = 96
    s, z = torch.tensor([0.013]), torch.tensor([117.])
    alpha = torch.randint(0, 4, (c, ), generator=g)
    cs = s * 2.0 ** alpha.float()
    x = torch.randn(40, 9, c, generator=g) * 2 * cs * 30   # some codes clip at 0 / 255
    w = torch.randn(c, generator=g)
    w[3] = 0.0                                             # the frexp(0) patch
    b = torch.randn(c, generator=g)
    codes = torch.clamp(torch.round(x / cs) + z, 0, 255)   # PTFQuantizer.quantize
    for signed in (False, True):
        so, zo, lo, hi = ((torch.tensor([0.03]), torch.tensor([0.]), -128, 127) if signed else
                          (torch.tensor([0.047]), torch.tensor([121.]), 0, 255))
        ref, _ = int_layer_norm(codes, z, alpha, s, w, b, so, zo, lo, hi)
        got = one_node('IntLayerNormS8' if signed else 'IntLayerNorm', dict(x=x.numpy()),
                       dict(s=s.numpy(), z=z.numpy(), alpha=alpha.numpy(), w=w.numpy(),
                            b=b.numpy(), so=so.numpy(), zo=zo.numpy()),
                       TensorProto.INT8 if signed else TensorProto.UINT8,
                       in_qmax=255.0, out_qmin=float(lo), out_qmax=float(hi), zero_weight=1,
                       m_bits=8)
        assert got.dtype == (np.int8 if signed else np.uint8)
        assert torch.equal(torch.from_numpy(got.astype(np.int64)), ref)
        assert len(set(ref.unique().tolist())) > 100        # not a degenerate case


@pytest.mark.parametrize('scale', [0.05, 0.002, 0.0004])
def test_lis_op_is_the_definition(scale):
    """Both kernels (float64 where exact, else int64) against lis_softmax, with
    masks broadcast as Swin's windows broadcast them."""
    g = torch.Generator().manual_seed(1)
    n_row = 49
    raw = torch.randn(2, 3, n_row, n_row, generator=g) * 3
    lo, hi = -128.0, 127.0
    s = torch.tensor([scale])
    fq = torch.clamp(torch.round(raw / s), lo, hi) * s                   # the logits quantizer
    a, b, c = POLY
    consts = dict(ls=s.numpy(), lz=np.zeros(1, np.float32),
                  c=np.array([scale, np.floor(-LN2 / scale), np.floor(b / a / scale),
                              np.floor(c / a / scale ** 2)], np.float64),
                  table=np.array([2.0 ** -k for k in range(16)] + [0.0], np.float32))
    exact = float64_exact(scale, 30, n_row)
    masks = [None, (torch.rand(1, 3, n_row, n_row, generator=g) > 0.8).float() * -100,
             (torch.rand(n_row, n_row, generator=g) > 0.7).float() * -100,
             (torch.rand(2, 1, 1, n_row, generator=g) > 0.5).float() * -100]
    for f64 in sorted({int(exact), 0}):      # the int64 kernel is exact everywhere
        for mask in masks:
            ref = lis_softmax(fq, scale, 4, mask=mask)
            inputs = dict(x=raw.numpy()) if mask is None else dict(x=raw.numpy(), m=mask.numpy())
            got = one_node('LogIntSoftmax', inputs, consts, TensorProto.FLOAT, qmin=lo, qmax=hi,
                           n=30, bits=4, f64=f64)
            assert torch.equal(torch.from_numpy(got), ref), (f64, None if mask is None
                                                             else mask.shape)
    assert exact == (scale == 0.05)          # both kernels are met across the cases


def test_adalog_igq_ptf_ops_are_the_quantizers(tmp_path):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 20, 20, generator=g) * 3, -1)
    gelu = torch.nn.functional.gelu(torch.randn(2, 20, 32, generator=g) * 2)
    conv_in = torch.randn(2, 8, 6, 6, generator=g)
    cases = [(calibrated(AdaLogQuantizer(bits=4, fixed_scale=1.0), probs), probs, 'AdaLog'),
             (calibrated(AdaLogQuantizer(bits=3, shift=0.16997), gelu), gelu, 'AdaLog'),
             (calibrated(IGQQuantizer(bits=4, num_groups=4), gelu), gelu, 'IGQ'),
             (calibrated(IGQQuantizer(bits=4, num_groups=3, unit='row'), probs), probs, 'IGQ'),
             (calibrated(IGQQuantizer(bits=4, num_groups=3), conv_in), conv_in, 'IGQ')]
    cases.append((calibrated(PTFQuantizer(bits=8), gelu), gelu, 'FakeQuantRow'))
    for i, (q, x, op) in enumerate(cases):
        path = str(tmp_path / f'{i}.onnx')
        report = export_onnx(q, x, path, custom_ops=True)
        assert [n.op_type for n in onnx.load(path).graph.node if n.domain == 'mmvq'] == [op]
        assert report['checks']['ok'] and report['checks']['custom_nodes'] == 1
        q.fused = False                                  # the eager definition
        with torch.no_grad():
            ref = q(x)
        (out, ) = run_session(ort_session(path), x)
        assert torch.equal(out, ref), (i, op, float((out - ref).abs().max()))


def _calibrated(block, case):
    model, data, forward = case()
    mmvq.quantize(model, dict(quant_block(block), searches=[]), data, forward)
    return model.eval(), data, forward


@pytest.mark.parametrize('block', ['fqvit_w8a8_attn4', 'adalog_w4a4', 'igq_w4a4_g8'])
def test_tiny_vit_custom_ops_export(block, tmp_path):
    model, data, forward = _calibrated(block, tiny_vit_case)
    x = fashion_images(model)
    fwd = lambda m, t: m(t, mode='tensor')                 # noqa: E731
    portable = export_onnx(model, x, str(tmp_path / 'p.onnx'), forward_fn=fwd)
    report = export_onnx(model, x, str(tmp_path / 'c.onnx'), forward_fn=fwd, custom_ops=True)
    c = report['checks']
    assert c['ok'] and not c['missing'], c
    ops = [n.op_type for n in onnx.load(str(tmp_path / 'c.onnx')).graph.node if n.domain == 'mmvq']
    expect = dict(fqvit_w8a8_attn4=dict(IntLayerNorm=13, LogIntSoftmax=6, FakeQuantRow=12),
                  adalog_w4a4=dict(AdaLog=12), igq_w4a4_g8=dict(IGQ=None))[block]
    for op, n in expect.items():
        assert (ops.count(op) == n) if n else ops.count(op) > 0, (op, ops)
    assert c['emulated'] == 0 and c['custom_nodes'] == len(ops)
    assert portable['checks']['emulated'] > 0
    # every node named after its quantizer
    named = {n.name.split('/')[0] for n in onnx.load(str(tmp_path / 'c.onnx')).graph.node
             if n.domain == 'mmvq'}
    quantizers = {name for name, _ in mmvq.modes.iter_quantizers(model)}
    assert named <= quantizers, named - quantizers
    with torch.no_grad():
        ref = forward(model, x)
    (out_c, ) = run_session(ort_session(str(tmp_path / 'c.onnx')), x)
    (out_p, ) = run_session(ort_session(str(tmp_path / 'p.onnx')), x)
    for out in (out_c, out_p):
        assert float((out.argmax(1) == ref.argmax(1)).float().mean()) == 1.0
        assert float((out - ref).abs().mean() / ref.abs().mean()) < 0.01
    assert torch.equal(out_c.argmax(1), out_p.argmax(1))


def test_custom_value_code_records_no_qdq(monkeypatch, tmp_path):
    """A custom node's value is the module's PyTorch code, untraced: where that
    code calls a QDQ-exported quantizer (QuantSoftmax off its fused path, as for
    DeiT-S rows where float64 LIS is inexact), the call is not in the graph and
    must not be counted (the export names QuantizeLinear nodes by those calls)."""
    import mmvq.modules.softmax as softmax
    model, data, forward = _calibrated('fqvit_w8a8_attn4', tiny_vit_case)
    monkeypatch.setattr(softmax._fused, 'use_fused', lambda *a, **k: False)
    x = data[0]
    fwd = lambda m, t: m(t, mode='tensor')                 # noqa: E731
    report = export_onnx(model, x, str(tmp_path / 'c.onnx'), forward_fn=fwd, custom_ops=True)
    assert report['checks']['ok']
    ops = [n.op_type for n in onnx.load(str(tmp_path / 'c.onnx')).graph.node if n.domain == 'mmvq']
    assert ops.count('LogIntSoftmax') == 6


def test_tiny_swin_custom_ops_with_window_masks(tmp_path):
    model, data, forward = _calibrated('fqvit_w8a8_attn4', tiny_swin_cls_case)
    x = data[0]
    fwd = lambda m, t: m(t, mode='tensor')                 # noqa: E731
    report = export_onnx(model, x, str(tmp_path / 'c.onnx'), forward_fn=fwd, custom_ops=True)
    assert report['checks']['ok']
    nodes = onnx.load(str(tmp_path / 'c.onnx')).graph.node
    lis = [n for n in nodes if n.domain == 'mmvq' and n.op_type == 'LogIntSoftmax']
    assert lis and any(len(n.input) == 6 for n in lis)   # shifted windows: the mask input
    (out, ) = run_session(ort_session(str(tmp_path / 'c.onnx')), x)
    with torch.no_grad():
        ref = forward(model, x)
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_header_fetch_checks_the_package(tmp_path):
    deb = tmp_path / 'fake.deb'
    deb.write_bytes(b'!<arch>\nnot onnxruntime')
    with pytest.raises(RuntimeError, match=r'sha256 .* expected .*MMVQ_ORT_INCLUDE'):
        ort_ops.fetch_header(deb.as_uri(), sha256='0' * 64, dest=str(tmp_path / 'inc'))
    with pytest.raises(RuntimeError, match=r'failed: .*set MMVQ_ORT_INCLUDE'):
        ort_ops.fetch_header((tmp_path / 'missing.deb').as_uri(), dest=str(tmp_path / 'inc'))
    assert not osp.exists(tmp_path / 'inc')              # nothing half-unpacked
    # the header the library was built against is Debian's, by its digest
    info = ort_ops.build_info() or (ort_ops.library() and ort_ops.build_info())
    assert info['api_version'] == ort_ops.HEADER_API

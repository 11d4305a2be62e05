"""ONNX export and onnxruntime: every quantizer's exported form against mmvq's
own arithmetic, in PyTorch and in onnxruntime; whole models exported with a
QDQ pair for every uniform quantizer of the quant summary; the deployed model
evaluated by tools/ptq.py --backend onnxruntime within 0.1 of the fake-quantized
one; tools/export.py from a quantized checkpoint."""
import io
import json
import os.path as osp
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

pytest.importorskip('onnxruntime')
import onnx  # noqa: E402

import mmvq  # noqa: E402
from helpers import (FASHION_MINI, ROOT, TINY_VIT_CKPT, calibrated, fashion_images, quant_block,  # noqa: E402
                     tiny_config, tiny_detector_case, tiny_swin_cls_case, tiny_vit_case)
from mmvq.deploy import export_onnx, ort_session, run_session  # noqa: E402
from mmvq.deploy.runtime import int8_as_uint8, u8s8_saturates  # noqa: E402
from mmvq.deploy.graphs import (adalog_graph, floor_log2, igq_graph,  # noqa: E402
                                int_layer_norm_graph, lis_softmax_graph)
from mmvq.quantizers import (AdaLogQuantizer, IGQQuantizer, PTFQuantizer,  # noqa: E402
                             UniformQuantizer)
from mmvq.quantizers.lis import lis_softmax  # noqa: E402
from mmvq.quantizers.ptf import int_layer_norm  # noqa: E402


def onnx_run(module, *inputs):
    """Export ``module`` with the plain exporter and run it in onnxruntime."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(module, inputs, buf, dynamo=False, opset_version=17)
    return run_session(ort_session(buf.getvalue()), *inputs)


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


# ------------------------------------------------------------ quantizer level
def test_floor_log2_is_the_float_exponent():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(200000, dtype=torch.float64, generator=g) * \
        10.0 ** torch.randint(-300, 300, (200000, ), generator=g).double()
    a = torch.cat([a[a > 0], 2.0 ** torch.arange(-1000, 1000, dtype=torch.float64),
                   torch.nextafter(2.0 ** torch.arange(-60, 60, dtype=torch.float64),
                                   torch.tensor(0.0, dtype=torch.float64))])
    _, e = torch.frexp(a)
    assert torch.equal(floor_log2(a), (e - 1).double())
    (out, ) = onnx_run(Fn(floor_log2), a)
    assert torch.equal(out, (e - 1).double())


def test_integer_layernorm_graph_bit_exact():
    g = torch.Generator().manual_seed(0)
    c = 96
    codes = torch.randint(0, 256, (40, 9, c), generator=g).float()
    w = torch.randn(c, generator=g)
    w[3] = 0.0                                 # frexp(0) has exponent 0: the patched case
    args = (torch.tensor([117.]), torch.randint(0, 4, (c, ), generator=g), torch.tensor([0.013]),
            w, torch.randn(c, generator=g), torch.tensor([0.047]), torch.tensor([121.]), 0, 255)
    _, ref = int_layer_norm(codes, *args, return_codes=False)
    assert torch.equal(int_layer_norm_graph(codes, *args), ref)
    (out, ) = onnx_run(Fn(lambda x: int_layer_norm_graph(x, *args)), codes)
    assert torch.equal(out, ref)


@pytest.mark.parametrize('dtype', [torch.float64, torch.int64])
@pytest.mark.parametrize('scale', [0.05, 0.002])
def test_lis_graph_bit_exact(scale, dtype):
    g = torch.Generator().manual_seed(1)
    logits = torch.round(torch.randn(2, 3, 49, 49, generator=g) * 3 / scale) * scale
    mask = (torch.rand(1, 3, 49, 49, generator=g) > 0.8).float() * -100
    for bits in (4, 8):
        ref = lis_softmax(logits, scale, bits, mask=mask)
        assert torch.equal(lis_softmax_graph(logits, scale, bits, mask=mask, dtype=dtype), ref)
        (out, ) = onnx_run(Fn(lambda x, m: lis_softmax_graph(x, scale, bits, mask=m, dtype=dtype)),
                           logits, mask)
        assert torch.equal(out, ref), (bits, (out - ref).abs().max())


UNIFORM_CASES = [dict(bits=8), dict(bits=4), dict(bits=8, granularity='channel'),
                 dict(bits=4, granularity='channel'), dict(bits=8, granularity='head'),
                 dict(bits=8, symmetric=True), dict(bits=6, symmetric=True)]


@pytest.mark.parametrize('cfg', UNIFORM_CASES, ids=lambda c: '-'.join(map(str, c.values())))
def test_uniform_quantizer_exports_as_qdq(cfg, tmp_path):
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 17, 8) if cfg.get('granularity') == 'head' else (2, 17, 8)
    x = torch.randn(*shape, generator=g) * 3 + 0.5
    q = calibrated(UniformQuantizer(**cfg), x)
    model = nn.Sequential(q)
    path = str(tmp_path / 'q.onnx')
    report = export_onnx(model, x * 1.3, path)         # values outside the range: clamped
    ops = [n.op_type for n in onnx.load(path).graph.node]
    pairs = 4 if cfg.get('granularity') == 'head' else 1    # per head: a pair per head
    assert ops.count('QuantizeLinear') == pairs and ops.count('DequantizeLinear') == pairs
    assert ('Split' in ops) == (pairs > 1)
    assert report['checks']['ok'] and report['checks']['qdq_quantizers_in_graph'] == 1
    assert report['quantizers'][0]['q_nodes'] == pairs
    narrow = cfg['bits'] < 8
    assert ('Max' in ops and 'Min' in ops) == narrow      # b-bit codes in the 8-bit container
    (out, ) = run_session(ort_session(path), x * 1.3)
    ref = q(x * 1.3)
    step = q.scale.max()
    # the same codes but where onnxruntime's x * (1 / s) and PyTorch's x / s
    # fall on two sides of a rounding tie
    diff = (out - ref).abs()
    assert float(diff.max()) <= float(step) * 1.0001
    assert float((diff > 1e-6).float().mean()) < 1e-3
    assert float(out.unique().numel()) <= 2 ** cfg['bits'] * (8 if 'granularity' in cfg else 1)


def test_ptf_exports_as_per_channel_qdq(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 30, 16, generator=g) * torch.linspace(0.1, 6, 16)
    q = calibrated(PTFQuantizer(bits=8), x)
    path = str(tmp_path / 'ptf.onnx')
    report = export_onnx(nn.Sequential(q), x, path)
    assert report['quantizers'][0]['form'] == 'qdq-ptf'
    (out, ) = run_session(ort_session(path), x)
    assert float((out - q(x)).abs().max()) <= float(q.channel_scale().max()) * 1.0001
    assert float(((out - q(x)).abs() > 1e-6).float().mean()) < 1e-3


def test_adalog_and_igq_graphs(tmp_path):
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 20, 20, generator=g) * 3, -1)
    ada = calibrated(AdaLogQuantizer(bits=4, fixed_scale=1.0), probs)
    gelu = torch.nn.functional.gelu(torch.randn(2, 20, 32, generator=g) * 2)
    shifted = calibrated(AdaLogQuantizer(bits=4, shift=0.16997), gelu)
    igq = calibrated(IGQQuantizer(bits=4, num_groups=4), gelu)
    rows = calibrated(IGQQuantizer(bits=4, num_groups=3, unit='row'), probs)
    for q, x, fn in ((ada, probs, adalog_graph), (shifted, gelu, adalog_graph),
                     (igq, gelu, igq_graph), (rows, probs, igq_graph)):
        ref = q(x)
        assert torch.equal(fn(q, x), ref)
        (out, ) = onnx_run(Fn(lambda t, q=q, fn=fn: fn(q, t)), x)
        # IGQ: the same ops; AdaLog: onnxruntime's log may differ by an ulp at a tie
        mismatch = float(((out - ref).abs() > 1e-6).float().mean())
        assert mismatch == 0.0 if fn is igq_graph else mismatch < 1e-3


# ------------------------------------------------------------------ whole models
def _calibrate(block, case):
    """``case()``'s model quantized with ``block``; the searches (FPCS, IGQ
    allocation) are left out: they choose parameters, the export only reads them."""
    model, data, forward = case()
    mmvq.quantize(model, dict(quant_block(block), searches=[]), data, forward)
    return model.eval(), data, forward


def _count_uniform(model):
    """Enabled uniform / PTF quantizers of the quant summary (the QDQ pairs
    and integer weights the graph must hold)."""
    return sum(1 for r in mmvq.quant_summary(model) if r['enabled'] and r['kind'] in ('uniform', 'ptf'))


# onnxruntime's integer kernels accumulate exactly where PyTorch's fake
# quantization multiplies dequantized floats, and its float LayerNorm / GELU /
# softmax differ in the last bits: a later quantizer's code moves now and then
# (a uniform code at a rounding tie; an AdaLog code or an IGQ group, both
# discontinuous choices, a little more often)
AGREEMENT = dict(uniform_w8a8=1.0, fqvit_w8a8_attn4=1.0, uniform_w4a4=1.0, adalog_w4a4=1.0,
                 igq_w4a4_g8=1.0)


def _qdq_linear_graph(k=64, n=8):
    """``y = DQ(Q(x; s, z=0 uint8)) @ DQ(W; 1, 0 int8)`` over a signed
    activation pair ``DQ(Q(x2; 1, 0 int8))`` added in: the U8S8 and S8 cases."""
    from onnx import TensorProto, helper, numpy_helper
    w = np.full((k, n), 127, np.int8)
    w[:, 1] = -128
    inits = [numpy_helper.from_array(a, name) for a, name in (
        (w, 'W'), (np.array(1.0, np.float32), 's'), (np.array(0, np.uint8), 'zu'),
        (np.array(0, np.int8), 'zs'), (np.ones(n, np.float32), 'sw'), (np.zeros(n, np.int8), 'zw'))]
    nodes = [helper.make_node('QuantizeLinear', ['x', 's', 'zu'], ['xq']),
             helper.make_node('DequantizeLinear', ['xq', 's', 'zu'], ['xd']),
             helper.make_node('DequantizeLinear', ['W', 'sw', 'zw'], ['wd'], axis=1),
             helper.make_node('MatMul', ['xd', 'wd'], ['m']),
             helper.make_node('QuantizeLinear', ['m2', 's', 'zs'], ['mq']),
             helper.make_node('DequantizeLinear', ['mq', 's', 'zs'], ['md']),
             helper.make_node('Add', ['m', 'md'], ['y'])]
    graph = helper.make_graph(nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [4, k]),
                                           helper.make_tensor_value_info('m2', TensorProto.FLOAT, [4, n])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, [4, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)]), w


def test_int8_codes_as_uint8_are_the_same_model_and_exact():
    """onnxruntime's x86 U8S8 kernel adds product pairs in int16 with saturation
    on CPUs without VNNI; the ``uint8`` rewrite is the same model, computed exactly."""
    proto, w = _qdq_linear_graph()
    x = torch.full((4, 64), 255.0)
    x[1] = torch.arange(64.0) * 4
    x2 = torch.linspace(-200, 200, 32).reshape(4, 8)
    ref = x @ torch.from_numpy(w).float() + x2.clamp(-128, 127).round()
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(proto)
    assert int8_as_uint8(rewritten) == 3                 # the weight DQ; the signed Q, its DQ
    types = {t.name: t.data_type for t in rewritten.graph.initializer}
    used = {i for n in rewritten.graph.node for i in n.input}
    assert all(types[i] != onnx.TensorProto.INT8 for i in used if i in types)
    onnx.checker.check_model(rewritten, full_check=True)
    import onnxruntime as ort
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for model in (proto, rewritten):                     # float reference kernels: the same values
        s = ort.InferenceSession(model.SerializeToString(), plain, providers=['CPUExecutionProvider'])
        assert torch.equal(run_session(s, x, x2)[0], ref)
    # with onnxruntime's integer fusions (MatMulIntegerToFloat): exact after the rewrite
    (out, ) = run_session(ort_session(proto.SerializeToString(), uint8_codes=True), x, x2)
    assert torch.equal(out, ref)
    (raw, ) = run_session(ort_session(proto.SerializeToString(), uint8_codes=False), x, x2)
    if u8s8_saturates():       # 64 products 255 * 127 = 2072640; pairs clipped at 32767
        assert float(raw[0, 0]) < 0.6 * float(ref[0, 0])
    assert ort_session(proto.SerializeToString()).run(None, dict(
        x=x.numpy(), m2=x2.numpy()))[0].tolist() == ref.tolist()   # the default: exact here


@pytest.mark.parametrize('block', sorted(AGREEMENT))
def test_tiny_vit_exports_and_runs(block, tmp_path):
    model, data, forward = _calibrate(block, tiny_vit_case)
    x = fashion_images(model)
    path = str(tmp_path / 'vit.onnx')
    report = export_onnx(model, x, path, forward_fn=lambda m, t: m(t, mode='tensor'))
    c = report['checks']
    assert c['ok'], report['checks']
    # every uniform quantizer of the quant summary is a QDQ pair or integer weight codes
    assert c['qdq_quantizers'] + c['weight_quantizers'] == _count_uniform(model)
    assert c['weight_quantizers'] == 6 * 4 + 2               # Linears + patch embed + head
    assert all(r['q_nodes'] >= 1 and r['dq_nodes'] >= 1 for r in report['quantizers']
               if r['form'].startswith('qdq'))
    proto = onnx.load(path)
    assert json.loads(proto.metadata_props[0].value)['checks'] == c
    weights = [i for i in proto.graph.initializer if i.data_type in (2, 3) and len(i.dims) == 2]
    assert len(weights) >= 6 * 4
    if block.startswith('fqvit'):
        assert report['forms']['emulated: Log-Int-Softmax'] == 6
        assert len([k for k in report['subgraphs'] if k.endswith('[int_layernorm]')]) == 13
    with torch.no_grad():
        ref = forward(model, x)
    (out, ) = run_session(ort_session(path), x)
    assert out.shape == ref.shape
    agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
    assert agree >= AGREEMENT[block], agree
    # measured: mean |diff| / mean |logit| 0.03-0.3 % (an 8-bit logit step is 2 % of the range)
    rel = float((out - ref).abs().mean() / ref.abs().mean())
    assert rel < 0.01, rel


def test_tiny_swin_classifier_fqvit_exports(tmp_path):
    model, data, forward = _calibrate('fqvit_w8a8_attn4', tiny_swin_cls_case)
    x = data[0]
    path = str(tmp_path / 'swin.onnx')
    report = export_onnx(model, x, path, forward_fn=lambda m, t: m(t, mode='tensor'))
    assert report['checks']['ok']
    assert report['checks']['qdq_quantizers'] + report['checks']['weight_quantizers'] == \
        _count_uniform(model)
    (out, ) = run_session(ort_session(path), x)
    with torch.no_grad():
        ref = forward(model, x)
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_export_refuses_uncalibrated(tmp_path):
    model, data, forward = tiny_vit_case()
    mmvq.convert(model, quant_block('uniform_w8a8'))
    mmvq.set_quant_mode(model, 'calib')
    with pytest.raises(RuntimeError, match='not calibrated'):
        export_onnx(model, data[0], str(tmp_path / 'x.onnx'),
                    forward_fn=lambda m, t: m(t, mode='tensor'))
    assert not osp.exists(tmp_path / 'x.onnx')


# ------------------------------------------------------------- tools, end to end
def _ptq(cfg, wd, *extra):
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'ptq.py'), str(cfg), *extra, '--work-dir', str(wd)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads((wd / 'results.json').read_text())


def _fashion_opts():
    root = FASHION_MINI + '/'
    return ['--cfg-options', f'train_dataloader.dataset.data_root={root}',
            f'test_dataloader.dataset.data_root={root}']


# AdaLog's custom export is checked in tests/test_ort_ops.py (its base search
# makes a tools/ptq.py run here ~4 min on 2 cores)
@pytest.mark.parametrize('block,custom', [('uniform_w8a8', 'off'), ('fqvit_w8a8_attn4', 'off'),
                                          ('fqvit_w8a8_attn4', 'on'), ('igq_w4a4_g8', 'on')])
def test_ptq_backend_onnxruntime_tiny_vit(block, custom, tmp_path):
    cfg = tiny_config(tmp_path, 'tiny_vit_cls', block)
    q = tmp_path / 'q.pth'
    res = _ptq(cfg, tmp_path / 'wd', TINY_VIT_CKPT, '--backend', 'onnxruntime', '--skip-fp',
               '--calib-images', '16', '--save-quantized', str(q), '--custom-ops', custom,
               *_fashion_opts())
    m = res['metrics']
    assert abs(m['onnxruntime']['accuracy/top1'] - m['quantized']['accuracy/top1']) <= 0.1
    graphs = res['deploy']['graphs']
    assert res['deploy']['custom_ops'] == (custom == 'on')
    assert graphs and all(g['checks']['ok'] for g in graphs.values())
    assert all((g['checks']['custom_nodes'] > 0) == (custom == 'on') for g in graphs.values())
    if 'w8a8' in block:
        assert m['quantized']['accuracy/top1'] > 70.0
        assert all(g['runtime']['integer'].get('MatMulIntegerToFloat', 0) >= 6 * 4
                   for g in graphs.values())
    assert res['eval_time']['per_image']['onnxruntime'] > 0
    # the same model through tools/export.py, from the quantized checkpoint
    out = tmp_path / 'vit.onnx'
    proc = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'export.py'), str(cfg),
                           TINY_VIT_CKPT, '--load-quantized', str(q), '--out', str(out),
                           '--batch-size', '4', '--custom-ops', custom, *_fashion_opts()],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((tmp_path / 'vit.onnx.report.json').read_text())
    assert rep['checks']['ok'] and rep['runtime_check']['top1_agree'] == 1.0
    assert rep['runtime_check']['input_shape'] == [4, 3, 28, 28]
    assert 'onnx.checker: passed' in (tmp_path / 'vit.onnx.report.txt').read_text()
    onnx.checker.check_model(str(out))


# mean |diff| / mean |feature| of onnxruntime's optimised (integer-kernel) session
# against the fake-quantized model, as measured: uniform W8A8 0.34 % (x86 without VNNI)
# / 0.40 % (AVX-512 VNNI); FQ-ViT 0.06 % / 1.28 % (saturating U8S8 products, fixed by
# ort_session's uint8 rewrite, gave 4.7 % and 8.6 %). The bounds leave 2x the worst.
ORT_FEATURE_BOUND = dict(uniform_w8a8=0.01, fqvit_w8a8_attn4=0.026)


@pytest.mark.parametrize('block,custom', [('uniform_w8a8', False), ('fqvit_w8a8_attn4', False),
                                          ('fqvit_w8a8_attn4', True)])
def test_tiny_detector_features_in_onnxruntime(block, custom, tmp_path):
    """The exported backbone + neck in onnxruntime against the fake-quantized
    PyTorch model. FQ-ViT's graph run as written (no graph optimisation: every QDQ
    pair and integer subgraph as exported) reproduces the model (measured 0.000 %);
    onnxruntime's optimised session (MatMulIntegerToFloat, 8-bit MatMulNBits, fused
    float ops) differs, by a CPU-dependent amount (the bounds above). Uniform W8A8 as
    written already differs by 0.45 % (its float softmax / GELU kernels feed 8-bit
    quantizers), so only FQ-ViT's is held to exactness."""
    import onnxruntime as ort
    model, data, forward = _calibrate(block, tiny_detector_case)
    x = model.data_preprocessor(data[0], False)['inputs']
    path = str(tmp_path / 'det.onnx')
    fwd = lambda m, t: tuple(m.extract_feat(t))      # noqa: E731
    assert export_onnx(model, x, path, forward_fn=fwd, custom_ops=custom)['checks']['ok']
    with torch.no_grad():
        ref = fwd(model, x)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if custom:
        from mmvq.deploy import ort_ops
        ort_ops.register(opts)
    as_written = run_session(ort.InferenceSession(path, opts, providers=['CPUExecutionProvider']), x)
    outs = run_session(ort_session(path), x)
    assert len(outs) == len(as_written) == len(ref) == 5
    for r, w, o in zip(ref, as_written, outs):
        assert o.shape == w.shape == r.shape
        if block == 'fqvit_w8a8_attn4':
            assert float((w - r).abs().mean() / r.abs().mean()) < 1e-4
        assert float((o - r).abs().mean() / r.abs().mean()) < ORT_FEATURE_BOUND[block]


@pytest.mark.parametrize('block', ['uniform_w8a8', 'fqvit_w8a8_attn4'])
def test_ptq_backend_onnxruntime_tiny_detector(block, tmp_path):
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    import shapes
    data = tmp_path / 'shapes'
    shapes.ensure(str(data), n_train=2, n_val=4)
    root = f'{data}/'
    res = _ptq(tiny_config(tmp_path, 'tiny_swin_mask_rcnn', block), tmp_path / 'wd',
               osp.join(ROOT, 'benchmarks', 'checkpoints', 'tiny_swin_mask_rcnn.pth'),
               '--backend', 'onnxruntime', '--skip-fp', '--calib-images', '1',
               '--cfg-options', f'train_dataloader.dataset.data_root={root}',
               f'test_dataloader.dataset.data_root={root}',
               f'test_evaluator.ann_file={root}annotations/instances_val.json')
    m = res['metrics']
    # the backbone's features agree to 0.3 % (W8A8; FQ-ViT 0.06 %: onnxruntime's
    # float kernels move a code now and then, and 8-bit codes carry it on; see
    # test_tiny_detector_features_in_onnxruntime); on 4 images one box or mask
    # that moves changes AP by up to 0.02 (measured: W8A8 segm 0.768 vs 0.788,
    # FQ-ViT bbox 0.742 vs 0.736): the 0.1-point target is the benchmark's, on
    # the full held-out set
    for k in ('coco/bbox_mAP', 'coco/segm_mAP'):
        assert abs(m['onnxruntime'][k] - m['quantized'][k]) <= 0.025, (k, m)
    assert m['quantized']['coco/bbox_mAP'] > 0.3
    (graph, ) = res['deploy']['graphs'].values()
    assert graph['part'] == 'backbone+neck' and graph['checks']['ok']
    assert np.isclose(res['eval_images'], 4)


def test_export_tool_errors(tmp_path):
    cfg = tiny_config(tmp_path, 'tiny_vit_cls', 'uniform_w8a8')
    tool = osp.join(ROOT, 'tools', 'export.py')
    cases = [(['--load-quantized', str(tmp_path / 'q.pth'), '--out', str(tmp_path / 'm.txt')],
              '--out must name a .onnx file'),
             (['--load-quantized', str(tmp_path / 'none.pth'), '--out', str(tmp_path / 'm.onnx'),
               *_fashion_opts()], 'does not exist')]
    for extra, pattern in cases:
        proc = subprocess.run([sys.executable, tool, str(cfg), TINY_VIT_CKPT, *extra],
                              capture_output=True, text=True, cwd=ROOT)
        err = [line for line in proc.stderr.splitlines() if line.startswith('export.py: error:')]
        assert proc.returncode == 2 and len(err) == 1 and pattern in err[0], proc.stderr[-2000:]
        assert 'Traceback' not in proc.stderr
    assert not list(tmp_path.glob('*.onnx*'))

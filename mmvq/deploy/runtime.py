"""Run an exported graph in onnxruntime, and evaluate it as mmengine evaluates.

:func:`ort_session` opens a graph with the settings under which onnxruntime
runs mmvq's QDQ graphs with integer kernels and computes mmvq's model. Two of
its graph transformers are disabled: ``MatMulAddFusion`` turns ``MatMul +
Add`` into ``Gemm`` before the QDQ fusions run and so leaves a bias-carrying
Linear without an output quantizer as ``DequantizeLinear + float Gemm`` (with
it off, ``DQ(x) @ DQ(W)`` becomes ``MatMulIntegerToFloat``); and
``WeightBiasQuantization`` rounds every float bias next to a dequantized
weight to int32 on the scale ``s_x s_w`` — a model mmvq did not calibrate
(on the tiny ViT with FQ-ViT W8A8 it moved the logits by 1.2 % on average
and one prediction in 300; with it off, 0.09 % and none).

**Exact integer products on CPUs without VNNI.** onnxruntime's x86 kernel
for ``uint8`` activations times ``int8`` weights (U8S8: ``MatMulInteger``,
``MatMulIntegerToFloat``, ``QLinearConv``) uses ``VPMADDUBSW`` on CPUs
without AVX-512 VNNI / AVX-VNNI, which adds pairs of products in int16 with
saturation: two products ``255 * 127`` already overflow, and the sum is
clipped (measured on an AVX2 EPYC: 64 products ``255 * 127`` gave
1048544 instead of 2072640; the tiny ViT's W8A8 logits moved by up to
0.72 and one top-1 in 64 changed). ``uint8 x uint8`` and ``int8 x int8``
are exact there. On such CPUs :func:`ort_session` therefore gives
onnxruntime every ``int8`` code of the graph (weights, and signed
activations such as the ``V`` of ``attn @ V``) as ``uint8`` ``q + 128``
with zero point ``z + 128`` (:func:`int8_as_uint8`): the same dequantized
values, computed exactly. The file on disk keeps the symmetric ``int8``
codes other runtimes (TensorRT) expect.

:class:`DeployedModel` stands in for an mmdet detector or an mmpretrain
classifier in a test loop (``test_step``): the part of the model that was
exported (a classifier whole, a detector's backbone + neck) runs in
onnxruntime, the rest (a classifier's post-processing, a detector's RPN and
RoI heads) in the model's own PyTorch code, so the same evaluator scores
both. Graphs have static shapes: one graph is exported (by the callable the
caller gives) and opened per input shape met, and cached.
"""
import contextlib
import functools
import os
import os.path as osp
import platform
import tempfile

import torch
import torch.nn as nn

from ..adapters import model_task
from ..utils.optional import require
from .report import runtime_kernels

# onnxruntime graph transformers that break mmvq's QDQ patterns or change the
# quantized model (see module doc)
DISABLED_FOR_QDQ = ('MatMulAddFusion', 'WeightBiasQuantization')
# CPU flags under which onnxruntime's U8S8 kernels accumulate in int32 (no saturation)
VNNI_FLAGS = ('avx512_vnni', 'avx_vnni', 'amx_int8')


@functools.lru_cache(maxsize=None)
def u8s8_saturates():
    """Whether onnxruntime's x86 U8S8 kernels may saturate here (x86 without
    VNNI, or flags that cannot be read); False on other architectures."""
    if platform.machine().lower() not in ('x86_64', 'amd64', 'i386', 'i686', 'x86'):
        return False
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split(':', 1)[1].split() for line in f
                          if line.startswith('flags')), None)
    except OSError:
        flags = None
    return flags is None or not any(v in flags for v in VNNI_FLAGS)


def int8_as_uint8(proto):
    """Rewrite, in place, mmvq's ``int8`` quantization into the same model on
    ``uint8`` codes: an ``int8`` weight ``q`` read by ``DequantizeLinear``
    becomes ``q + 128``, and every ``int8`` zero point ``z`` of such a
    ``DequantizeLinear`` or of a ``QuantizeLinear -> DequantizeLinear`` pair
    becomes ``z + 128`` (``uint8``; ``saturate(round(x / s) + z + 128)`` on
    ``[0, 255]`` is the ``int8`` code plus 128). Every dequantized value is
    unchanged. New initializers are added (``<name>_uint8``), so a tensor that
    something else reads stays as it is. Returns the number of rewritten nodes.
    """
    import numpy as np
    require('onnx')
    from onnx import TensorProto, numpy_helper
    inits = {t.name: t for t in proto.graph.initializer}
    readers = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    made = {}

    def shifted(name):
        if name not in made:
            a = numpy_helper.to_array(inits[name]).astype(np.int16) + 128
            made[name] = f'{name}_uint8'
            proto.graph.initializer.append(numpy_helper.from_array(a.astype(np.uint8),
                                                                   made[name]))
        return made[name]

    def int8_zp(node, op):
        return (node.op_type == op and node.domain in ('', 'ai.onnx') and len(node.input) > 2
                and node.input[2] in inits and inits[node.input[2]].data_type == TensorProto.INT8)

    todo = []
    for node in proto.graph.node:
        if int8_zp(node, 'QuantizeLinear'):
            after = readers.get(node.output[0], [])
            if after and all(int8_zp(n, 'DequantizeLinear') for n in after) and \
                    node.output[0] not in {o.name for o in proto.graph.output}:
                todo += [node] + after
        elif int8_zp(node, 'DequantizeLinear') and node.input[0] in inits and \
                inits[node.input[0]].data_type == TensorProto.INT8:
            node.input[0] = shifted(node.input[0])
            todo.append(node)
    done = {id(n): n for n in todo}
    for node in done.values():
        node.input[2] = shifted(node.input[2])
    return len(done)


def ort_session(path, threads=None, quantized=True, optimized_path=None, uint8_codes=None,
                profile_prefix=None):
    """An onnxruntime CPU session for ``path``.

    Args:
        path (str | bytes): the ONNX file (or its bytes).
        threads (int | None): intra-op threads (``None``: onnxruntime's default,
            one per physical core); inter-op is 1.
        quantized (bool): a QDQ graph: disable :data:`DISABLED_FOR_QDQ`.
        optimized_path (str | None): also write the optimised graph here.
        uint8_codes (bool | None): give onnxruntime the graph's ``int8``
            codes as ``uint8`` (:func:`int8_as_uint8`); ``None``: where its
            U8S8 kernels saturate (:func:`u8s8_saturates`) and ``quantized``.
        profile_prefix (str | None): onnxruntime's profiler on, its JSON
            written under this prefix (``session.end_profiling()``;
            :func:`profile_split` reads it).

    A graph with mmvq's custom operators (``export_onnx(custom_ops=True)``)
    gets their library registered (:mod:`mmvq.deploy.ort_ops`).
    """
    require('onnx', 'onnxruntime')
    import onnxruntime as ort
    import onnx
    from . import ort_ops
    if uint8_codes is None:
        uint8_codes = quantized and u8s8_saturates()
    proto = onnx.load_from_string(path) if isinstance(path, bytes) else onnx.load(path)
    if uint8_codes and int8_as_uint8(proto):
        path = proto.SerializeToString()
    opts = ort.SessionOptions()
    if ort_ops.uses_custom_ops(proto):
        ort_ops.register(opts)            # the graph has mmvq's custom operators
    opts.inter_op_num_threads = 1
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if quantized:
        # a weight-only 4-bit DQ + MatMul becomes MatMulNBits; at its default
        # accuracy level 4 it quantizes its float input to int8 on the fly —
        # another model than mmvq's (an AdaLog or IGQ output kept exactly)
        opts.add_session_config_entry('session.qdq_matmulnbits_accuracy_level', '1')
    kwargs = dict(disabled_optimizers=list(DISABLED_FOR_QDQ)) if quantized else {}
    return ort.InferenceSession(path, opts, providers=['CPUExecutionProvider'], **kwargs)


def op_kind(op_type):
    """The profile's kind of an onnxruntime node type."""
    from .report import INTEGER_KERNELS
    custom = ('IntLayerNorm', 'IntLayerNormS8', 'FakeQuantRow', 'LogIntSoftmax', 'AdaLog', 'IGQ')
    if op_type in custom:
        return f'mmvq.{op_type}'
    if op_type in INTEGER_KERNELS:
        return 'integer matmul/conv'
    if op_type in ('MatMul', 'Gemm', 'FusedMatMul', 'Conv', 'FusedConv', 'FusedGemm'):
        return 'float matmul/conv'
    if op_type in ('QuantizeLinear', 'DequantizeLinear', 'DynamicQuantizeLinear'):
        return 'QuantizeLinear/DequantizeLinear'
    if op_type in ('LayerNormalization', 'SkipLayerNormalization', 'Softmax'):
        return f'float {op_type}'
    return 'other'


def profile_split(profile_json):
    """``{op kind: share of node time}`` from an onnxruntime profile file."""
    import json
    with open(profile_json) as f:
        events = json.load(f)
    total, kinds = 0.0, {}
    for e in events:
        if e.get('cat') == 'Node' and e.get('name', '').endswith('_kernel_time'):
            k = op_kind(e.get('args', {}).get('op_name', ''))
            kinds[k] = kinds.get(k, 0.0) + e['dur']
            total += e['dur']
    return {k: round(v / total, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])} \
        if total else {}


def kernels_of(path, threads=None, quantized=True):
    """:func:`mmvq.deploy.report.runtime_kernels` of onnxruntime's optimised graph."""
    require('onnx', 'onnxruntime')
    import onnx
    with tempfile.TemporaryDirectory() as tmp:
        opt = osp.join(tmp, 'optimized.onnx')
        ort_session(path, threads, quantized, optimized_path=opt)
        info = runtime_kernels(onnx.load(opt))
    info['provider'] = 'CPUExecutionProvider'
    return info


def run_session(session, *inputs):
    """Run ``session`` on torch tensors; outputs as torch tensors on the device of the first input."""
    feeds = {i.name: t.detach().cpu().contiguous().numpy()
             for i, t in zip(session.get_inputs(), inputs)}
    device = inputs[0].device
    return tuple(torch.as_tensor(o, device=device) for o in session.run(None, feeds))


def graph_forward(model):
    """``(forward_fn, part)``: what of ``model`` is exported — a classifier's
    logits (``'model'``), a detector's backbone + neck features
    (``'backbone+neck'``), else the model's own forward (``'model'``)."""
    task = model_task(model)
    if task == 'classification':
        return (lambda m, x: m(x, mode='tensor')), 'model'
    if task == 'detection':
        return (lambda m, x: tuple(m.extract_feat(x))), 'backbone+neck'
    return (lambda m, *xs: m(*xs)), 'model'


class DeployedModel(nn.Module):
    """An mmengine model whose exported part runs in onnxruntime.

    Args:
        model (nn.Module): the quantized mmdet / mmpretrain model.
        export_fn (callable): ``export_fn(example_input) -> path`` exports the
            graph for the shape of ``example_input`` (called once per shape).
        threads (int | None): onnxruntime intra-op threads.
    """

    def __init__(self, model, export_fn, threads=None):
        super().__init__()
        self.model = model
        self.task = model_task(model)
        if self.task not in ('classification', 'detection'):
            raise ValueError('DeployedModel evaluates mmpretrain classifiers and mmdet detectors; '
                             f'{type(model).__name__} is neither')
        self.export_fn = export_fn
        self.threads = threads
        self.sessions = {}
        self.paths = {}

    def session(self, x):
        key = tuple(x.shape)
        if key not in self.sessions:
            path = self.export_fn(x)
            self.paths[key] = path
            self.sessions[key] = ort_session(path, self.threads)
        return self.sessions[key]

    @contextlib.contextmanager
    def _features_from(self, session):
        """The detector's ``extract_feat`` runs ``session`` while the context lasts."""
        model = self.model
        model.extract_feat = lambda x: run_session(session, x)   # removed below
        try:
            yield
        finally:
            model.__dict__.pop('extract_feat', None)

    @torch.no_grad()
    def test_step(self, data):
        model = self.model
        data = model.data_preprocessor(data, False)
        inputs, samples = data['inputs'], data['data_samples']
        session = self.session(inputs)           # exported first, from the untouched model
        if self.task == 'classification':
            (logits, ) = run_session(session, inputs)
            return model.head._get_predictions(logits, samples)
        with self._features_from(session):
            return model.predict(inputs, samples)

    def forward(self, *args, **kwargs):
        raise RuntimeError('DeployedModel evaluates through test_step only')


def onnx_dir_export_fn(model, out_dir, opset=None, logger=None, reports=None, custom_ops=False):
    """An ``export_fn`` for :class:`DeployedModel` writing ``<out_dir>/<shape>.onnx``.

    ``reports`` (a dict, optional) receives each export's report by file name;
    ``custom_ops``: mmvq's onnxruntime custom operators (:func:`export_onnx`).
    """
    from .export import DEFAULT_OPSET, export_onnx
    forward_fn, part = graph_forward(model)

    def export_fn(x):
        name = 'x'.join(str(s) for s in x.shape) + '.onnx'
        path = osp.join(out_dir, name)
        os.makedirs(out_dir, exist_ok=True)
        report = export_onnx(model, x, path, forward_fn=forward_fn, opset=opset or DEFAULT_OPSET,
                             custom_ops=custom_ops)
        report['part'] = part
        if reports is not None:
            reports[name] = report
        if logger is not None:
            c = report['checks']
            logger.info(f'[mmvq] exported {part} for input {tuple(x.shape)} to {path}: '
                        f'{c["qdq_quantizers_in_graph"]} QDQ activations, '
                        f'{c["weight_quantizers_in_graph"]} integer weights, {c["emulated"]} emulated, '
                        f'{c.get("custom_nodes", 0)} custom operators')
        return path
    return export_fn


__all__ = ['ort_session', 'kernels_of', 'profile_split', 'op_kind', 'run_session', 'graph_forward', 'DeployedModel',
           'int8_as_uint8', 'u8s8_saturates',
           'onnx_dir_export_fn', 'DISABLED_FOR_QDQ']

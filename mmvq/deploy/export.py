"""Export a calibrated mmvq model to ONNX: QDQ where an integer kernel exists.

:func:`export_onnx` traces the model with PyTorch's ONNX exporter (the
TorchScript-based one, ``dynamo=False``: static shapes, one graph per input
shape) inside :func:`export_mode`, which gives every quantizer and wrapper of
the converted model, for the duration of the export only, a forward made of
exportable operations:

=========================================  =====================================================
quantizer                                  in the ONNX graph
=========================================  =====================================================
uniform activation (tensor/channel/head)   ``QuantizeLinear -> DequantizeLinear`` (integer kernel)
uniform weight of a Linear / Conv2d        ``int8``/``uint8`` codes + ``DequantizeLinear``
PTF (LayerNorm input)                      per-channel QDQ, scale ``s 2^alpha_c`` (exact)
integer LayerNorm                          float64 subgraph (emulated, bit-exact), then the
                                           output quantizer's QDQ
Log-Int-Softmax                            float64 / int64 subgraph (emulated, bit-exact)
AdaLog (post-softmax, post-GELU)           log2 + table gather (emulated)
IGQ groups                                 per-instance ranges, ArgMin, gather (emulated)
=========================================  =====================================================

A Linear's weight codes are stored transposed (``(in, out)``, axis 1) so the
graph is ``DQ(x) @ DQ(W)`` with no transpose between the DQ and the MatMul —
the pattern onnxruntime fuses into ``MatMulIntegerToFloat``. Node names carry
the module path (``/model/backbone/layers.0/attn/qkv/input_quantizer/...``),
which is how :mod:`mmvq.deploy.report` finds every quantizer in the graph.
"""
import contextlib
import inspect
import io
import os
import os.path as osp
import warnings

import torch
import torch.nn as nn

from ..modes import iter_quantizers
from ..modules.layernorm import QuantLayerNorm
from ..modules.linear import QuantConv2d, QuantLinear
from ..modules.softmax import QuantSoftmax
from ..quantizers.adalog import AdaLogQuantizer
from ..quantizers.base import BaseQuantizer, host_value
from ..quantizers.igq import IGQQuantizer
from ..quantizers.lis import LogIntSoftmax
from ..quantizers.ptf import PTFQuantizer
from ..quantizers.uniform import UniformQuantizer
from ..utils.classmap import ClassMap
from ..utils.optional import require
from .graphs import adalog_graph, igq_graph, int_layer_norm_graph, lis_softmax_graph
from . import custom
from .custom import CUSTOM
from .qdq import qdq_fn, uniform_qdq_fn, weight_dq_fn

# torch >= 2.5 has both exporters behind one function (``dynamo=``, whose default
# changed to True in 2.9); before 2.5 ``torch.onnx.export`` is the TorchScript one
_TORCHSCRIPT_EXPORTER = (dict(dynamo=False)
                         if 'dynamo' in inspect.signature(torch.onnx.export).parameters else {})

DEFAULT_OPSET = 17

# export forms (the report's vocabulary)
QDQ, PTF_QDQ, WEIGHT_DQ = 'qdq', 'qdq-ptf', 'weight-dq'
EMULATED = dict(int_layernorm='emulated: integer LayerNorm (float64 subgraph, bit-exact)',
                lis='emulated: Log-Int-Softmax (float64/int64 subgraph, bit-exact)',
                adalog='emulated: AdaLog (log2 + table gather)',
                igq='emulated: IGQ groups (per-instance ranges, ArgMin, gather)')


def _active(q):
    return isinstance(q, BaseQuantizer) and q.enabled and q.mode != 'float'


def _check_ready(name, q):
    if q.mode == 'calib' or not q.is_calibrated():
        raise RuntimeError(f'{name} is not calibrated: calibrate (mmvq.calibrate, tools/ptq.py) or '
                           'load a quantized checkpoint (--load-quantized) before exporting')


def _ptf_forward(q):
    """PTF: one zero point, the per-channel scales ``s 2^alpha_c`` on the last axis."""
    scale = q.channel_scale().detach().float()
    return qdq_fn(scale, q.zero_point.reshape(()).expand(scale.shape), q.qmin, q.qmax, -1)


def _recorded(name, fn, calls):
    """``fn`` that appends ``name`` to ``calls`` each time it runs (the trace's
    order of QDQ pairs / weight DQs, which names the graph's nodes)."""
    pairs = getattr(fn, 'pairs', 1)

    def forward(*args, **kwargs):
        if not custom.computing_value():
            calls.extend([name] * pairs)
        return fn(*args, **kwargs)
    return forward


def _linear_forward(m, name, calls):
    if not _active(m.weight_quantizer):
        return None
    weight = _recorded(f'{name}.weight_quantizer', _weight_fn(m, name, transpose=True), calls)

    def forward(x):
        y = torch.matmul(m.input_quantizer(x), weight())
        if m.bias is not None:
            y = y + m.bias
        return m.output_quantizer(y)
    return forward


def _conv_forward(m, name, calls):
    if not _active(m.weight_quantizer):
        return None
    weight = _recorded(f'{name}.weight_quantizer', _weight_fn(m, name), calls)

    def forward(x):
        return m.output_quantizer(m._conv_forward(m.input_quantizer(x), weight(), m.bias))
    return forward


def _int_layernorm_forward(m):
    iq, oq = m.input_quantizer, m.output_quantizer
    channel_scale = iq.channel_scale().detach()
    zero = torch.zeros_like(iq.zero_point)

    def forward(x):
        if not m.stream_input:
            x = iq(x)                      # the PTF QDQ pair (the stream carries it otherwise)
        # x is on the PTF grid: round(x / (s 2^alpha)) is exactly its code minus
        # the zero point, which the integer LayerNorm subtracts first (so: 0)
        centred = torch.round(x / channel_scale)
        y = int_layer_norm_graph(centred, zero, iq.alpha, iq.scale, m.weight, m.bias,
                                 oq.scale, oq.zero_point, oq.qmin, oq.qmax)
        # the output is on oq's grid: its QDQ pair is exact and feeds the next
        # Linear an integer input
        return oq(y)
    return forward


def _lis_forward(m):
    lis, iq = m.lis_quantizer, m.input_quantizer
    scale = host_value(lis, 'logit_scale', iq.scale, float)

    def forward(x, mask=None):
        return lis_softmax_graph(iq(x), scale, lis.bits, lis.n, mask)
    return forward


def _adalog_forward(q):
    def forward(x):
        return adalog_graph(q, x)
    return forward


def _igq_forward(q):
    def forward(x):
        return igq_graph(q, x)
    return forward


class ExportForm:
    """How one quantizer class is written in ONNX (register with
    :func:`register_export_form`).

    Args:
        form (str): the export report's name for it (``'qdq'``, ``'emulated: ...'``).
        forward (callable | None): ``forward(quantizer) -> fn``, ``fn(x)`` the
            quantizer's output in exportable operations (made once per export;
            e.g. :func:`mmvq.deploy.qdq.qdq_fn`); ``None``: the wrapper that
            owns the quantizer writes it (Log-Int-Softmax).
        qdq (bool): ``fn`` writes ``QuantizeLinear -> DequantizeLinear`` pairs
            (``fn.pairs`` of them, default 1), which the export names after
            the quantizer; other ops must not include ``QuantizeLinear``.
        weight (callable | None): ``weight(quantizer, w, transpose=False) -> fn``,
            ``fn()`` the weight as integer codes + ``DequantizeLinear``
            (:func:`mmvq.deploy.qdq.weight_dq_fn` for an ``affine`` quantizer);
            ``None``: the class cannot be exported as a Linear / Conv2d weight.

        custom (callable | None): ``custom(quantizer, record) -> fn or None``,
            the quantizer as an mmvq custom operator (:mod:`mmvq.deploy.custom`,
            used with ``custom_ops=True``; ``None`` from it: this instance
            keeps ``forward``). ``fn`` calls ``record(op_type)`` once per node.
    """

    def __init__(self, form, forward=None, qdq=False, weight=None, custom=None):
        self.form = form
        self.forward = forward
        self.qdq = bool(qdq)
        self.weight = weight
        self.custom = custom


#: per quantizer class (subclasses inherit): its ONNX form
EXPORT_FORMS = ClassMap('ONNX export form',
                        'register one with mmvq.deploy.register_export_form(<class>, '
                        'ExportForm(...)), or disable the quantizer (mmvq.enable_quantizers)')


def register_export_form(cls, form, force=False):
    """Register ``form`` (an :class:`ExportForm`) for quantizer class ``cls``."""
    if not isinstance(form, ExportForm):
        raise TypeError(f'register_export_form({cls.__name__}, ...): pass an ExportForm, '
                        f'not {type(form).__name__}')
    return EXPORT_FORMS.register(cls, form, force=force)


register_export_form(UniformQuantizer, ExportForm(QDQ, uniform_qdq_fn, qdq=True,
                                                  weight=weight_dq_fn))
register_export_form(PTFQuantizer, ExportForm(PTF_QDQ, _ptf_forward, qdq=True,
                                              custom=custom.ptf_custom))
register_export_form(AdaLogQuantizer, ExportForm(EMULATED['adalog'], _adalog_forward,
                                                 custom=custom.adalog_custom))
register_export_form(IGQQuantizer, ExportForm(EMULATED['igq'], _igq_forward,
                                              custom=custom.igq_custom))
register_export_form(LogIntSoftmax, ExportForm(EMULATED['lis']))   # QuantSoftmax writes it


def _weight_fn(m, name, **kwargs):
    wq = m.weight_quantizer
    form = EXPORT_FORMS.require(wq, f'{name}.weight_quantizer')
    if form.weight is None:
        raise LookupError(f'{name}.weight_quantizer: {type(wq).__name__} has no ONNX weight form: '
                          'give its ExportForm a weight= (mmvq.deploy.register_export_form)')
    return form.weight(wq, m.weight, **kwargs)


def _quantizer_plan(model, calls, custom_ops=False):
    """``{quantizer: (form, forward or None)}`` for every active quantizer;
    the QDQ forwards record their calls in ``calls['qdq']``, the custom
    operators theirs in ``calls['custom']``."""
    plan = {}
    weights = {id(m.weight_quantizer) for m in model.modules()
               if isinstance(m, (QuantLinear, QuantConv2d)) and _active(m.weight_quantizer)}
    for name, q in iter_quantizers(model):
        if not _active(q):
            continue
        _check_ready(name, q)
        form = EXPORT_FORMS.require(q, name)
        fused = (form.custom(q, custom.recorder(name, calls['custom']))
                 if custom_ops and form.custom is not None and id(q) not in weights else None)
        if id(q) in weights:
            plan[name] = (WEIGHT_DQ, None)          # the wrapper writes codes + DQ
        elif fused is not None:
            plan[name] = fused
        elif form.forward is None:
            plan[name] = (form.form, None)
        elif form.qdq:
            plan[name] = (form.form, _recorded(name, form.forward(q), calls['qdq']))
        else:
            plan[name] = (form.form, form.forward(q))
    return plan


@contextlib.contextmanager
def export_mode(model, calls=None, custom_ops=False):
    """Give the converted model exportable forwards while the context lasts.

    Every active quantizer and the wrappers that need it (Linear/Conv2d
    weights, integer LayerNorm, Log-Int-Softmax) get an instance-level
    ``forward``; on exit the instance attributes are removed and the model
    is exactly as before. Yields ``{quantizer name: export form}``.

    Args:
        model (nn.Module): the converted, calibrated model.
        calls (dict | None): receives, in call order, the quantizer names of
            the QDQ pairs (``calls['qdq']``), of the weight DQs
            (``calls['weight']``) and the names of the custom operator nodes
            (``calls['custom']``) each forward runs.
        custom_ops (bool): write integer LayerNorm, Log-Int-Softmax, PTF on the
            residual stream, AdaLog and IGQ as mmvq's onnxruntime custom
            operators (:mod:`mmvq.deploy.custom`) where their parameters fit
            the kernels; the others keep the portable form.
    """
    calls = calls if calls is not None else {}
    for key in ('qdq', 'weight', 'custom'):
        calls.setdefault(key, [])
    plan = _quantizer_plan(model, calls, custom_ops)
    by_id = {id(q): plan[name] for name, q in iter_quantizers(model) if name in plan}
    patched = []
    forms = {name: form for name, (form, _) in plan.items()}
    try:
        for name, module in model.named_modules():
            fwd = None
            if isinstance(module, BaseQuantizer) and id(module) in by_id:
                fwd = by_id[id(module)][1]
            elif isinstance(module, QuantLinear):
                fwd = _linear_forward(module, name, calls['weight'])
            elif isinstance(module, QuantConv2d):
                fwd = _conv_forward(module, name, calls['weight'])
            elif isinstance(module, QuantLayerNorm) and module._int_path_active():
                made = custom_ops and custom.layernorm_custom(
                    module, custom.recorder(f'{name}.output_quantizer', calls['custom']))
                if made:
                    fwd = made
                    forms[f'{name}.output_quantizer'] = CUSTOM['int_layernorm_out']
                    if not module.stream_input:
                        forms[f'{name}.input_quantizer'] = CUSTOM['int_layernorm_in']
                    forms[f'{name}[int_layernorm]'] = CUSTOM['int_layernorm']
                else:
                    fwd = _int_layernorm_forward(module)
                    forms[f'{name}.output_quantizer'] = QDQ + ' (integer LayerNorm output)'
                    forms[f'{name}.input_quantizer'] = PTF_QDQ + ' (integer LayerNorm input)'
                    forms[f'{name}[int_layernorm]'] = EMULATED['int_layernorm']
            elif isinstance(module, QuantSoftmax) and module.lis_active():
                made = custom_ops and custom.lis_custom(
                    module, custom.recorder(f'{name}.lis_quantizer', calls['custom']))
                if made:
                    fwd = made
                    forms[f'{name}.lis_quantizer'] = CUSTOM['lis']
                    forms[f'{name}.input_quantizer'] = CUSTOM['lis_in']
                else:
                    fwd = _lis_forward(module)
            if fwd is not None:
                module.forward = fwd
                patched.append(module)
        yield forms
    finally:
        for module in patched:
            module.__dict__.pop('forward', None)


class _Traced(nn.Module):
    """The module the exporter traces: ``forward_fn(model, *inputs)``."""

    def __init__(self, model, forward_fn):
        super().__init__()
        self.model = model
        self.forward_fn = forward_fn

    def forward(self, *inputs):
        out = self.forward_fn(self.model, *inputs)
        if isinstance(out, (list, tuple)):
            return tuple(out)
        return out


def export_onnx(model, inputs, path, forward_fn=None, input_names=('input', ),
                output_names=None, opset=DEFAULT_OPSET, check=True, custom_ops=False):
    """Export a converted, calibrated model to ONNX (QDQ + emulated subgraphs,
    or mmvq's custom operators).

    Args:
        model (nn.Module): the quantized model (quantizers in ``quant`` mode).
        inputs (Tensor | tuple[Tensor]): example inputs; the graph has their
            static shapes.
        path (str): the ``.onnx`` file to write (atomically).
        forward_fn (callable | None): ``forward_fn(model, *inputs)`` returning
            a tensor or a tuple of tensors; default ``model(*inputs)``.
        input_names, output_names (Sequence[str] | None): graph I/O names
            (outputs default to ``output`` / ``output_<i>``).
        opset (int): ONNX opset (13 or newer: per-axis QDQ).
        check (bool): run ``onnx.checker`` on the written model.
        custom_ops (bool): integer LayerNorm, Log-Int-Softmax, PTF, AdaLog and
            IGQ as mmvq's onnxruntime custom operators (fused integer kernels,
            :mod:`mmvq.deploy.ort_ops`; the graph then needs that library:
            :func:`mmvq.deploy.ort_session` registers it); ``False``: the
            portable graph every ONNX runtime runs.

    Returns:
        dict: the export report (:func:`mmvq.deploy.report.export_report`).
    """
    require('onnx')
    import onnx
    from .report import export_report

    if opset < 13:
        raise ValueError(f'opset={opset}: per-axis QuantizeLinear needs opset 13 or newer')
    inputs = inputs if isinstance(inputs, tuple) else (inputs, )
    traced = _Traced(model, forward_fn or (lambda m, *xs: m(*xs)))
    was_training = model.training
    model.eval()
    buf = io.BytesIO()
    calls = {}
    try:
        with torch.no_grad(), export_mode(model, calls, custom_ops) as forms, \
                warnings.catch_warnings():
            warnings.simplefilter('ignore')          # the exporter's tracer and deprecation notes
            torch.onnx.export(traced, inputs, buf, **_TORCHSCRIPT_EXPORTER, opset_version=opset,
                              custom_opsets={custom.DOMAIN: 1} if custom_ops else None,
                              input_names=list(input_names),
                              output_names=list(output_names) if output_names else None,
                              do_constant_folding=True)
    finally:
        model.train(was_training)
    proto = constants_to_initializers(onnx.load_from_string(buf.getvalue()))
    if not output_names:
        _name_outputs(proto)
    name_quantizer_nodes(proto, calls)
    custom.name_custom_nodes(proto, calls['custom'])
    if check:
        onnx.checker.check_model(proto, full_check=not calls['custom'])
    report = export_report(model, proto, forms, path=path, opset=opset)
    proto.metadata_props.add(key='mmvq_export', value=report_json(report))
    d = osp.dirname(osp.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f'{path}.partial'
    with open(tmp, 'wb') as f:
        f.write(proto.SerializeToString())
    os.replace(tmp, path)
    report['file_bytes'] = osp.getsize(path)
    return report


def _name_outputs(proto):
    """Graph outputs ``output`` (one) or ``output_<i>`` (several), renamed where
    they are produced (the exporter numbers them)."""
    outs = proto.graph.output
    new = {o.name: ('output' if len(outs) == 1 else f'output_{i}') for i, o in enumerate(outs)}
    for node in proto.graph.node:
        for i, name in enumerate(node.output):
            if name in new:
                node.output[i] = new[name]
        for i, name in enumerate(node.input):
            if name in new:
                node.input[i] = new[name]
    for o in outs:
        o.name = new[o.name]


def constants_to_initializers(proto):
    """Move the graph's ``Constant`` tensors (weight codes, scales, zero points)
    into its initializers, where runtimes and tools look for weights."""
    keep = []
    for node in proto.graph.node:
        value = next((a.t for a in node.attribute if a.name == 'value'), None)
        if node.op_type == 'Constant' and value is not None and len(node.attribute) == 1:
            value.name = node.output[0]
            proto.graph.initializer.append(value)
        else:
            keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    return proto


def name_quantizer_nodes(proto, calls):
    """Name every ``QuantizeLinear`` / ``DequantizeLinear`` after its quantizer.

    The exporter's scope names cannot always tell two quantizers apart (a
    residual block calls its LayerNorms' input quantizers itself: both show
    as ``.../layers.0/input_quantizer``). The export forwards recorded their
    calls in trace order, which is the graph's node order: the k-th
    ``QuantizeLinear`` is the k-th QDQ call (its ``DequantizeLinear`` reads
    it), the k-th ``DequantizeLinear`` of integer codes the k-th weight.
    Nodes become ``<quantizer>/QuantizeLinear`` etc.
    """
    q_nodes = [n for n in proto.graph.node if n.op_type == 'QuantizeLinear']
    codes = {i.name for i in proto.graph.initializer if i.data_type in (2, 3) and len(i.dims)}
    w_nodes = [n for n in proto.graph.node if n.op_type == 'DequantizeLinear' and n.input[0] in codes]
    if len(q_nodes) != len(calls['qdq']) or len(w_nodes) != len(calls['weight']):
        raise RuntimeError(f'export: {len(q_nodes)} QuantizeLinear / {len(w_nodes)} weight '
                           f'DequantizeLinear nodes for {len(calls["qdq"])} / '
                           f'{len(calls["weight"])} recorded quantizer calls')
    seen = {}

    def unique(base):
        seen[base] = seen.get(base, 0) + 1
        return base if seen[base] == 1 else f'{base}_{seen[base] - 1}'

    by_output = {}
    for node, name in zip(q_nodes, calls['qdq']):
        node.name = unique(f'{name}/QuantizeLinear')
        by_output[node.output[0]] = name
    for node, name in zip(w_nodes, calls['weight']):
        node.name = unique(f'{name}/DequantizeLinear')
    for node in proto.graph.node:
        if node.op_type == 'DequantizeLinear' and node.input[0] in by_output:
            node.name = unique(f'{by_output[node.input[0]]}/DequantizeLinear')
    return proto


def report_json(report):
    import json
    return json.dumps({k: v for k, v in report.items() if k != 'quantizers'}, sort_keys=True,
                      default=str)


__all__ = ['export_onnx', 'export_mode', 'ExportForm', 'EXPORT_FORMS', 'register_export_form',
           'QDQ', 'PTF_QDQ', 'WEIGHT_DQ', 'EMULATED']

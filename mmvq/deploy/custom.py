"""Export forms as mmvq's onnxruntime custom operators (``custom_ops=True``).

Each function here returns, for one quantizer or wrapper, a forward whose
traced node is one operator of the ``mmvq`` domain (built and registered by
:mod:`mmvq.deploy.ort_ops`) — the fused CPU kernel mmvq's own evaluation
runs (``fused_cpu.c``) — or ``None`` where the quantizer's parameters do not
fit that kernel (the export then writes the portable form and the report
says so):

==========================  ===========================================  =======================
what                        operator                                     kernel needs
==========================  ===========================================  =======================
integer LayerNorm           ``IntLayerNorm`` / ``IntLayerNormS8``:       per-tensor PTF base scale
                            PTF codes of the float input + integer LN    and zero point (unsigned
                            -> 8-bit output codes, then the output       codes), per-tensor output
                            quantizer's ``DequantizeLinear``             quantizer
PTF (residual stream)       ``FakeQuantRow``: ``s 2^alpha_c`` per        per-tensor base scale and
                            channel, one pass                            zero point
Log-Int-Softmax             ``LogIntSoftmax``: logits quantization +     per-tensor logits scale,
                            LIS -> ``2^-k`` (float32, exact; float64     (float64 where exact,
                            form or the int64 definition)                else int64)
AdaLog                      ``AdaLog``: threshold count + table          per-tensor scale and shift
IGQ                         ``IGQ``: unit ranges, nearest group, affine  one scale / zero point per
                                                                         group
==========================  ===========================================  =======================

The traced ``forward`` of each operator is the module's own PyTorch code
(what the exporter's tracer runs for shapes and the values downstream); the
``symbolic`` writes the node with the parameters as initializers. The
operators compute what that PyTorch code computes, bit for bit
(``tests/test_ort_ops.py``). What follows a custom operator stays standard
ONNX: ``IntLayerNorm``'s output codes feed ``DequantizeLinear`` and the next
Linear's integer ``MatMulIntegerToFloat``; the ``2^-k`` of Log-Int-Softmax,
exact in float32, feed ``attn @ V`` as a float MatMul.
"""
import math

import torch

from ..quantizers.lis import LN2, POLY, float64_exact

DOMAIN = 'mmvq'
CUSTOM = dict(
    int_layernorm='custom: mmvq.IntLayerNorm (PTF codes + integer LayerNorm -> 8-bit codes)',
    int_layernorm_out='custom: output codes of mmvq.IntLayerNorm + DequantizeLinear',
    int_layernorm_in='custom: PTF codes inside mmvq.IntLayerNorm',
    ptf='custom: mmvq.FakeQuantRow (PTF, s 2^alpha per channel)',
    lis='custom: mmvq.LogIntSoftmax (logits quantization + LIS)',
    lis_in='custom: logits quantization inside mmvq.LogIntSoftmax',
    adalog='custom: mmvq.AdaLog (threshold count + table)',
    igq='custom: mmvq.IGQ (instance ranges, nearest group, affine)')


def recorder(name, calls):
    """``record(op_type)``: appends ``<name>/<op_type>`` to ``calls`` (the
    trace order of custom nodes, which :func:`name_custom_nodes` names)."""
    def record(op_type):
        calls.append(f'{name}/{op_type}')
    return record


def name_custom_nodes(proto, names):
    """Name the graph's ``mmvq``-domain nodes after their quantizers, in order."""
    nodes = [n for n in proto.graph.node if n.domain == DOMAIN]
    if len(nodes) != len(names):
        raise RuntimeError(f'export: {len(nodes)} mmvq custom nodes for {len(names)} recorded '
                           'custom operator calls')
    seen = {}
    for node, name in zip(nodes, names):
        seen[name] = seen.get(name, 0) + 1
        node.name = name if seen[name] == 1 else f'{name}_{seen[name] - 1}'
    return proto


class _Spec:
    """One custom node: ``value(*xs)`` the PyTorch result, ``node(g, *xs)`` the ONNX node."""

    def __init__(self, op, value, consts, attrs, dq=None):
        self.op, self.value, self.consts, self.attrs, self.dq = op, value, consts, attrs, dq


# the exporter passes an autograd Function's non-tensor arguments only as
# numbers: a spec travels as its key here (kept while its export runs)
_SPECS = {}
# > 0 while a custom node's value runs: the PyTorch code inside it (e.g. an
# input quantizer's QDQ forward) is not in the graph and records no call
_IN_VALUE = [0]


def computing_value():
    """Whether a custom operator's PyTorch value is being computed (untraced)."""
    return _IN_VALUE[0] > 0


class _CustomOp(torch.autograd.Function):

    @staticmethod
    def forward(ctx, key, *xs):
        # the value only: the tracer records this Function as one node
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        _IN_VALUE[0] += 1
        try:
            return _SPECS[key].value(*xs)
        finally:
            _IN_VALUE[0] -= 1
            torch._C._set_tracing_state(state)

    @staticmethod
    def symbolic(g, key, *xs):
        from torch.onnx import symbolic_helper
        spec = _SPECS[key]
        ins = [x for x in xs if not symbolic_helper._is_none(x)]
        consts = [g.op('Constant', value_t=c) for c in spec.consts]
        # an optional last input (the mask) goes after the parameters
        y = g.op(f'{DOMAIN}::{spec.op}', ins[0], *consts, *ins[1:], **spec.attrs)
        x_type = xs[0].type()
        if spec.dq is None:
            y.setType(x_type)
            return y
        scale, zero = spec.dq
        y.setType(x_type.with_dtype(zero.dtype))
        return g.op('DequantizeLinear', y, g.op('Constant', value_t=scale),
                    g.op('Constant', value_t=zero))


def _apply(spec, record, *xs):
    record(spec.op)
    key = id(spec)
    _SPECS[key] = spec                    # the spec lives as long as its forward (a closure)
    return _CustomOp.apply(key, *xs)


def _f32(t):
    return t.detach().float().reshape(-1).contiguous().cpu()


def _per_tensor(*ts):
    return all(isinstance(t, torch.Tensor) and t.numel() == 1 for t in ts)


def layernorm_custom(m, record):
    """``IntLayerNorm`` for a :class:`mmvq.modules.QuantLayerNorm` on its integer path."""
    iq, oq = m.input_quantizer, m.output_quantizer
    if not (_per_tensor(iq.scale, iq.zero_point, oq.scale, oq.zero_point)
            and iq.qmin == 0 and iq.qmax <= 255 and oq.qmax - oq.qmin <= 255
            and (0 <= oq.qmin and oq.qmax <= 255 or -128 <= oq.qmin and oq.qmax <= 127)
            and m.weight is not None and m.bias is not None):
        return None
    signed = oq.qmin < 0
    zp = int(round(float(oq.zero_point.reshape(()))))
    consts = [_f32(iq.scale), _f32(iq.zero_point), iq.alpha.detach().long().reshape(-1).cpu(),
              _f32(m.weight), _f32(m.bias), _f32(oq.scale), _f32(oq.zero_point)]
    attrs = dict(in_qmax_f=float(iq.qmax), out_qmin_f=float(oq.qmin), out_qmax_f=float(oq.qmax),
                 zero_weight_i=int(bool((m.weight == 0).any())), m_bits_i=8)
    dq = (oq.scale.detach().float().reshape(()).cpu(),
          torch.tensor(zp, dtype=torch.int8 if signed else torch.uint8, device='cpu'))
    spec = _Spec('IntLayerNormS8' if signed else 'IntLayerNorm',
                 lambda x: type(m).forward(m, x), consts, attrs, dq)
    return lambda x: _apply(spec, record, x)


def ptf_custom(q, record):
    """``FakeQuantRow`` for a PTF quantizer (the residual stream's)."""
    if not _per_tensor(q.scale, q.zero_point):
        return None
    consts = [_f32(q.channel_scale()), _f32(q.zero_point)]
    spec = _Spec('FakeQuantRow', lambda x: type(q).forward(q, x), consts,
                 dict(qmin_f=float(q.qmin), qmax_f=float(q.qmax)))
    return CUSTOM['ptf'], lambda x: _apply(spec, record, x)


def lis_custom(m, record):
    """``LogIntSoftmax`` for a :class:`mmvq.modules.QuantSoftmax` on its LIS path."""
    from ..quantizers.base import host_value
    lis, iq = m.lis_quantizer, m.input_quantizer
    if not (_per_tensor(iq.scale, iq.zero_point) and lis.bits <= 6):
        return None
    scale = host_value(lis, 'logit_scale', iq.scale, float)
    a, b, c = POLY
    consts = [_f32(iq.scale), _f32(iq.zero_point),
              torch.tensor([scale, math.floor(-LN2 / scale), math.floor(b / a / scale),
                            math.floor(c / a / scale ** 2)], dtype=torch.float64, device='cpu'),
              _f32(lis.pow2_table)]
    def forward(x, mask=None):
        # the float64 form where it is exact for this row length, else int64 (as mmvq)
        spec = _Spec('LogIntSoftmax', lambda t, mk=None: type(m).forward(m, t, mk), consts,
                     dict(qmin_f=float(iq.qmin), qmax_f=float(iq.qmax), n_i=int(lis.n),
                          bits_i=int(lis.bits), f64_i=int(float64_exact(scale, lis.n,
                                                                         x.shape[-1]))))
        if mask is None:
            return _apply(spec, record, x)
        mask = mask.float()
        if mask.dim() > x.dim() or mask.shape[-1] != x.shape[-1]:
            mask = mask.expand(x.shape)
        return _apply(spec, record, x, mask)
    return forward


def adalog_custom(q, record):
    """``AdaLog`` for an AdaLog quantizer."""
    if not _per_tensor(q.scale, q.shift):
        return None
    thr, lut = q.fused_tables()
    spec = _Spec('AdaLog', lambda x: type(q).forward(q, x),
                 [_f32(q.scale), _f32(q.shift), _f32(thr), _f32(lut)],
                 dict(levels_i=2 ** q.bits, unshift_i=int(q.shifted and not q.is_folded())))
    return CUSTOM['adalog'], lambda x: _apply(spec, record, x)


def igq_custom(q, record):
    """``IGQ`` for an IGQ quantizer (units: rows, or channels last)."""
    g = q.centres.shape[0]
    if not (q.scale.numel() == q.zero_point.numel() == g and q.centres.dim() == 2):
        return None
    consts = [_f32(q.centres), _f32(q.scale), _f32(q.zero_point)]

    def forward(x):
        mode = 1 if x.dim() == 4 and q.unit != 'row' else (0 if q.unit == 'row' else 2)
        spec = _Spec('IGQ', lambda t: type(q).forward(q, t), consts,
                     dict(qmin_f=float(q.qmin), qmax_f=float(q.qmax), mode_i=mode))
        return _apply(spec, record, x)
    return CUSTOM['igq'], forward


__all__ = ['DOMAIN', 'CUSTOM', 'recorder', 'name_custom_nodes', 'layernorm_custom', 'ptf_custom',
           'lis_custom', 'adalog_custom', 'igq_custom']

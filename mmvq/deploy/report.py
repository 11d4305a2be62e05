"""The export report: what became of every quantizer in the ONNX graph.

Built from the graph itself, not from what the exporter was asked to do:
each quantizer of the quant summary is looked up by name among the graph's
``QuantizeLinear`` / ``DequantizeLinear`` nodes (``<quantizer>/QuantizeLinear``,
named by :func:`mmvq.deploy.export.name_quantizer_nodes`), and the report
records its export form and the nodes found, so a quantizer that vanished
from the graph shows up as a mismatch. After
onnxruntime has optimised the graph (:func:`runtime_kernels`), the report also
counts the integer kernels the runtime actually runs.
"""
from collections import Counter

from ..modes import iter_quantizers
from ..summary import quant_summary

# onnxruntime's integer kernels a QDQ pattern fuses into
INTEGER_KERNELS = ('MatMulIntegerToFloat', 'QLinearMatMul', 'MatMulInteger', 'QGemm',
                   'QLinearConv', 'ConvInteger', 'DynamicQuantizeMatMul', 'QAttention',
                   'QLinearAdd', 'QLinearMul', 'QLinearSoftmax', 'QLinearGlobalAveragePool',
                   'MatMulNBits')       # weight-only (4-bit weights with a float input)
FLOAT_MATMULS = ('MatMul', 'Gemm', 'FusedMatMul', 'Conv', 'FusedConv', 'FusedGemm')


def export_report(model, proto, forms, path=None, opset=None):
    """The report of an exported model (``export_onnx`` returns it).

    Args:
        model (nn.Module): the quantized model that was exported.
        proto (onnx.ModelProto): the exported graph.
        forms (dict): ``{quantizer name: export form}`` from ``export_mode``.
        path (str | None): where the graph is written.
        opset (int | None): its opset.

    Returns:
        dict: ``quantizers`` (one row per quantizer: name, kind, bits,
        granularity, form, the ``q_nodes`` / ``dq_nodes`` named after it),
        ``forms`` (count per form), ``graph`` (node counts per op
        type, ``qdq_pairs``, integer weights) and ``checks`` (``ok``: every
        enabled quantizer of the quant summary was exported, every uniform /
        PTF activation quantizer has a QDQ pair, every weight quantizer a
        DequantizeLinear of integer codes).
    """
    nodes = list(proto.graph.node)
    int_inits = {i.name for i in proto.graph.initializer if i.data_type in (2, 3) and len(i.dims)}

    named = Counter((n.name.split('/')[0], n.op_type) for n in nodes
                    if n.op_type in ('QuantizeLinear', 'DequantizeLinear'))

    def found(name, op):
        return named[(name, op)]

    rows, summary = [], {(r['module'], r['slot']): r for r in quant_summary(model)}
    for name, q in iter_quantizers(model):
        if name not in forms:
            continue
        form = forms[name]
        q_nodes, dq_nodes = found(name, 'QuantizeLinear'), found(name, 'DequantizeLinear')
        info = q.summary()
        rows.append(dict(name=name, kind=info['kind'], bits=info['bits'],
                         granularity=info.get('granularity', 'tensor'), form=form,
                         q_nodes=q_nodes, dq_nodes=dq_nodes))
    ops = Counter(n.op_type for n in nodes)
    qdq_rows = [r for r in rows if r['form'].startswith('qdq')]
    weight_rows = [r for r in rows if r['form'].startswith('weight-dq')]
    checks = dict(
        qdq_quantizers=len(qdq_rows),
        qdq_quantizers_in_graph=sum(1 for r in qdq_rows if r['q_nodes'] >= 1 and r['dq_nodes'] >= 1),
        weight_quantizers=len(weight_rows),
        weight_quantizers_in_graph=sum(1 for r in weight_rows if r['dq_nodes'] >= 1),
        emulated=sum(1 for r in rows if r['form'].startswith('emulated')),
        custom=sum(1 for r in rows if r['form'].startswith('custom')),
        custom_nodes=sum(1 for n in nodes if n.domain == 'mmvq'),
        summary_quantizers=sum(1 for r in summary.values() if r['enabled']))
    exported = {r['name'] for r in rows}
    checks['missing'] = sorted(
        n for n in (f'{m + "." if m else ""}{slot.split("+")[0]}_quantizer'
                    for (m, slot), r in summary.items() if r['enabled']) if n not in exported)
    checks['ok'] = (not checks['missing']
                    and checks['qdq_quantizers'] == checks['qdq_quantizers_in_graph']
                    and checks['weight_quantizers'] == checks['weight_quantizers_in_graph']
                    and (not checks['custom'] or checks['custom_nodes'] > 0))
    extra = {k: v for k, v in forms.items() if k not in {r['name'] for r in rows}}
    return dict(path=path, opset=opset, quantizers=rows,
                forms=dict(Counter(r['form'].split(' (')[0] for r in rows)),
                subgraphs=extra,
                graph=dict(nodes=len(nodes), ops=dict(sorted(ops.items())),
                           qdq_pairs=ops.get('QuantizeLinear', 0),
                           dequantize=ops.get('DequantizeLinear', 0),
                           integer_weights=len(int_inits)),
                checks=checks)


def runtime_kernels(optimized_proto):
    """Integer and float matmul/conv kernels in onnxruntime's optimised graph."""
    ops = Counter(n.op_type for n in optimized_proto.graph.node)
    return dict(integer={k: ops[k] for k in INTEGER_KERNELS if ops.get(k)},
                float={k: ops[k] for k in FLOAT_MATMULS if ops.get(k)},
                quantize=ops.get('QuantizeLinear', 0) + ops.get('DynamicQuantizeLinear', 0),
                dequantize=ops.get('DequantizeLinear', 0))


def format_report(report):
    """The report as text: one line per quantizer, then the totals."""
    rows = report['quantizers']
    w = max([len(r['name']) for r in rows] + [10])
    lines = [f'{"quantizer".ljust(w)}  {"kind":<12} bits  {"Q":>2} {"DQ":>2}  form',
             f'{"-" * w}  {"-" * 12} ----  -- --  ----']
    for r in rows:
        lines.append(f'{r["name"].ljust(w)}  {r["kind"]:<12} {r["bits"]:>4}  {r["q_nodes"]:>2} '
                     f'{r["dq_nodes"]:>2}  {r["form"]}')
    for name, form in report.get('subgraphs', {}).items():
        lines.append(f'{name.ljust(w)}  {"":<12} {"":>4}  {"":>2} {"":>2}  {form}')
    c, g = report['checks'], report['graph']
    lines.append('')
    lines.append(f'{len(rows)} quantizers exported ({c["summary_quantizers"]} enabled in the quant '
                 f'summary): ' + ', '.join(f'{k}={v}' for k, v in sorted(report['forms'].items())))
    lines.append(f'QDQ: {c["qdq_quantizers_in_graph"]}/{c["qdq_quantizers"]} activation quantizers '
                 f'as QuantizeLinear/DequantizeLinear, {c["weight_quantizers_in_graph"]}/'
                 f'{c["weight_quantizers"]} weights as integer codes + DequantizeLinear; '
                 f'{c["emulated"]} emulated, {c.get("custom", 0)} in mmvq custom operators '
                 f'({c.get("custom_nodes", 0)} nodes); graph: {g["nodes"]} nodes, {g["qdq_pairs"]} '
                 f'QuantizeLinear, {g["dequantize"]} DequantizeLinear')
    if 'runtime' in report:
        rt = report['runtime']
        lines.append(f'onnxruntime ({rt.get("provider", "CPU")}): integer kernels '
                     + (', '.join(f'{k}={v}' for k, v in rt['integer'].items()) or 'none')
                     + '; float matmul/conv ' + (', '.join(f'{k}={v}' for k, v in rt['float'].items())
                                                 or 'none'))
    lines.append(f'onnx.checker: {"passed" if report.get("checker", True) else "not run"}')
    return '\n'.join(lines)


__all__ = ['export_report', 'runtime_kernels', 'format_report', 'INTEGER_KERNELS']

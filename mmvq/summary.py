"""The printable quant summary: one row per quantizer slot."""
from collections import OrderedDict

from .modules.base import QuantModuleMixin


def quant_summary(model):
    """Rows ``(module, slot, kind, bits, granularity)`` for every quantizer."""
    rows = []
    for name, module in model.named_modules():
        # a wrapper's children (an attention's matmuls and softmax) are rows
        # of their own: each module lists the quantizers it holds itself
        if isinstance(module, QuantModuleMixin):
            for slot, q in module.own_quantizers():
                if slot == 'input' and getattr(module, 'stream_input', False):
                    slot = 'input+skip'       # the quantized residual stream
                info = q.summary()
                rows.append(OrderedDict(module=name, slot=slot, kind=info.pop('kind'),
                                        bits=info.pop('bits'),
                                        granularity=info.pop('granularity', 'tensor'),
                                        enabled=q.enabled, extra=info))
    return rows


def format_summary(model):
    """The quant summary as a fixed-width text table."""
    rows = quant_summary(model)
    header = ('module', 'slot', 'kind', 'bits', 'granularity')
    table = [header] + [tuple(str(r[h]) + ('' if r['enabled'] or h != 'kind' else ' (off)')
                              for h in header) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in table]
    lines.insert(1, '  '.join('-' * w for w in widths))
    counts = {}
    for r in rows:
        counts[r['kind']] = counts.get(r['kind'], 0) + 1
    lines.append(f'{len(rows)} quantizers: ' + ', '.join(f'{k}={v}' for k, v in sorted(counts.items())))
    return '\n'.join(lines)

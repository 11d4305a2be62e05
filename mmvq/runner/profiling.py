"""Where evaluation time goes: torch.profiler over one evaluation phase, with
every mmvq wrapper and quantizer labelled (``tools/ptq.py --profile``)."""
import contextlib

from ..modules.base import QuantModuleMixin
from ..quantizers.base import BaseQuantizer
from ..utils.io import atomic_write_text


def _label(module):
    if isinstance(module, BaseQuantizer):
        return f'mmvq.quantizer[{module.kind}]'
    if isinstance(module, QuantModuleMixin):
        return f'mmvq.{type(module).__name__}'
    return None


def _attach_labels(model):
    """Forward hooks opening/closing a ``record_function`` per mmvq module."""
    from torch.profiler import record_function
    handles = []

    def pre(mod, args, label):
        mod.__dict__.setdefault('_mmvq_rf', []).append(record_function(label).__enter__())

    def post(mod, args, out):
        stack = mod.__dict__.get('_mmvq_rf')
        if stack:
            stack.pop().__exit__(None, None, None)

    for module in model.modules():
        label = _label(module)
        if label is not None:
            handles.append(module.register_forward_pre_hook(
                lambda m, a, label=label: pre(m, a, label)))
            handles.append(module.register_forward_hook(post))
    return handles


def _detach_labels(model, handles):
    for h in handles:
        h.remove()
    for module in model.modules():
        module.__dict__.pop('_mmvq_rf', None)


def report(prof, title, row_limit=25):
    """Text report: mmvq labels by total time, then aten ops by self time."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    lines = [f'# {title}', '', f'total CPU time {total / 1e3:.1f} ms (profiler overhead included)',
             '', '| mmvq module / quantizer | calls | total ms | % of eval |', '|---|---:|---:|---:|']
    for e in sorted((e for e in events if e.key.startswith('mmvq.')),
                    key=lambda e: -e.cpu_time_total):
        lines.append(f'| {e.key} | {e.count} | {e.cpu_time_total / 1e3:.1f} | '
                     f'{100 * e.cpu_time_total / total:.1f} |')
    lines += ['', 'Operators by self time:', '',
              events.table(sort_by='self_cpu_time_total', row_limit=row_limit), '']
    return '\n'.join(lines)


@contextlib.contextmanager
def profile_to(model, path, title):
    """Profile the block's CPU time; write :func:`report` to ``path``."""
    from torch.profiler import ProfilerActivity, profile
    handles = _attach_labels(model)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield
    finally:
        _detach_labels(model, handles)
    atomic_write_text(report(prof, title), path)

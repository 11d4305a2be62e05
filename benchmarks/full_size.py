"""Full-size detectors at 1333x800: calibration time, eval time and peak memory, FP vs each method.

Random (seeded) weights: time and memory do not depend on training, and no
checkpoint can be downloaded here. With random weights the number of
detections would follow the quantization noise and with it the RoI/mask
heads' time and memory, so the R-CNN keeps its top 100 boxes whatever their
score (``score_thr=0``): FP and quantized evaluations run the same head
workload and differ only by what mmvq adds. Each (model, method) runs in its
own process so that memory is measured from a fresh start, and freed memory
is handed back (:func:`mmvq.utils.memory.release_memory`) before each timed
phase, FP and quantized alike. On CPU the workers run with glibc's mmap
threshold fixed at 4 MiB (``MALLOC_MMAP_THRESHOLD_``, unless already set):
by default glibc raises it after large frees and then keeps freed
activations in its heap, so a phase's peak RSS would depend on allocation
history (the same FP evaluation peaked 150 MB apart in two processes); with
it fixed, tensors of 4 MiB and more (every activation that matters here)
are returned when freed and peak RSS follows the memory tensors really
need — the quantity a GPU run is limited by —, while small temporaries
(the 2 MiB slices of the integer paths) are still reused from the heap
(a 128 KiB threshold made FQ-ViT's evaluation 4.8x slower in page faults)::

    python benchmarks/full_size.py                                   # CPU: Cascade Swin-S, 4 methods
    python benchmarks/full_size.py --models mask_rcnn_swin_t cascade_swin_s --methods all
    python benchmarks/full_size.py --device cuda --eval-images 5     # on a GPU machine

Per row: calibration wall time on 1 image (observers + searches, the
device's search budgets), eval time per image (mean over ``--eval-images``
after one untimed warm-up) and the peak memory of the FP and the quantized
evaluation — resident set size on CPU (the kernel's per-phase high-water
mark), ``torch.cuda.max_memory_allocated`` on CUDA — and their ratios,
measured side by side in the same process. Writes ``full_size.md`` and
``full_size.json`` to ``--work-dir``.
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
MODELS = dict(
    mask_rcnn_swin_t=('Mask R-CNN Swin-T', 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'),
    mask_rcnn_swin_s=('Mask R-CNN Swin-S', 'mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py'),
    cascade_swin_t=('Cascade Mask R-CNN Swin-T',
                    osp.join(ROOT, 'configs/_base_/models/cascade-mask-rcnn_swin-t-p4-w7_fpn.py')),
    cascade_swin_s=('Cascade Mask R-CNN Swin-S',
                    osp.join(ROOT, 'configs/_base_/models/cascade-mask-rcnn_swin-s-p4-w7_fpn.py')),
)
ALL_METHODS = ('uniform_w8a8', 'uniform_w6a6', 'uniform_w4a4', 'fqvit_w8a8_attn4', 'fqvit_w8a8_attn8',
               'adalog_w3a3', 'adalog_w4a4', 'adalog_w6a6', 'igq_w4a4_g8', 'igq_w4a4_g12',
               'igq_w6a6_g8', 'igq_w6a6_g12', 'mixed_w4a4')
DEFAULT_METHODS = ('uniform_w8a8', 'fqvit_w8a8_attn4', 'adalog_w4a4', 'igq_w4a4_g8')
SIZE = (800, 1333)                 # (h, w): mmdet's 1333x800 test scale


def _image(seed):
    """A real COCO image resized to 1333x800 when ../shared has one, else a drawn one."""
    import numpy as np
    shared = os.environ.get('MMVQ_SHARED', osp.join(ROOT, '..', 'shared'))
    folder = osp.join(shared, 'data', 'coco_mini', 'val2017')
    files = sorted(os.listdir(folder)) if osp.isdir(folder) else []
    if files:
        import mmcv
        img = mmcv.imread(osp.join(folder, files[seed % len(files)]), channel_order='rgb')
        return mmcv.imresize(img, SIZE[::-1])
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    from shapes import draw_det_image
    return draw_det_image(np.random.default_rng(seed), *SIZE)[0]


def _batch(seed, device):
    import torch
    from mmdet.structures import DetDataSample
    img = _image(seed)
    meta = dict(img_id=seed, img_shape=SIZE, ori_shape=SIZE, scale_factor=(1.0, 1.0),
                pad_shape=SIZE, batch_input_shape=SIZE)
    return dict(inputs=[torch.from_numpy(img).permute(2, 0, 1).contiguous()],
                data_samples=[DetDataSample(metainfo=meta)])


class _Phase:
    """Wall time and peak memory of a block (RSS on CPU, allocated memory on CUDA)."""

    def __init__(self, device):
        self.cuda = device.startswith('cuda')

    def __enter__(self):
        import torch
        from mmvq.utils.memory import PeakRSS
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
        else:
            self.rss = PeakRSS().__enter__()
            self.start_mb = self.rss.start_mb
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.rss.__exit__(*exc)
            self.peak_mb = self.rss.peak_mb
        self.seconds = time.perf_counter() - self.t0
        return False


def worker(args):
    import torch
    from mmdet.registry import MODELS as DET_MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    import mmvq
    from mmvq.utils import load_config
    from mmvq.utils.env import device_report
    from mmvq.utils.memory import release_memory
    register_all_modules(init_default_scope=True)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    cfg = load_config(MODELS[args.model][1])
    cfg.model.backbone.init_cfg = None
    cfg.model.test_cfg.rcnn.score_thr = 0.0
    torch.manual_seed(0)
    model = DET_MODELS.build(cfg.model).to(args.device).eval()
    evals = [_batch(100 + i, args.device) for i in range(args.eval_images)]
    calib = [_batch(0, args.device)]

    def evaluate():
        with torch.no_grad():
            t0 = time.perf_counter()
            model.test_step(evals[0])                      # untimed warm-up
            warmup = time.perf_counter() - t0
            release_memory()
            steps, digests = [], []
            with _Phase(args.device) as phase:
                for batch in evals:
                    t0 = time.perf_counter()
                    out = model.test_step(batch)
                    if args.device.startswith('cuda'):
                        torch.cuda.synchronize()
                    steps.append(time.perf_counter() - t0)
                    # a digest of the detections (boxes, scores, labels, masks),
                    # untimed; keeping them would add ~100 MB per image of masks
                    digests.append(digest(out))
                    del out
        phase.seconds, phase.digests, phase.warmup_s = sum(steps), digests, warmup
        return phase

    def digest(out):
        import hashlib
        h = hashlib.sha256()
        pred = out[0].pred_instances
        for key in ('bboxes', 'scores', 'labels', 'masks'):
            if key in pred:
                h.update(pred[key].detach().cpu().contiguous().numpy())   # no copy
        return h.hexdigest()

    fp = evaluate()
    qcfg = Config.fromfile(osp.join(ROOT, 'configs', '_base_', 'quant', f'{args.method}.py')).quant.to_dict()
    with _Phase(args.device) as cal:
        mmvq.convert(model, qcfg)
        searches = [mmvq.calibration.build_search(s) for s in qcfg.get('searches', [])]
        mmvq.calibrate(model, calib, lambda m, b: m.test_step(b),
                       searches=[] if args.no_searches else searches)
    q = evaluate()
    eager = None
    if not args.no_eager:
        from mmvq.modes import fused_quantizers
        with fused_quantizers(model, False):
            eager = evaluate()
    row = dict(model=args.model, method=args.method, name=qcfg.get('name', args.method),
               device=device_report(args.device), calib_s=cal.seconds,
               calib_peak_mb=cal.peak_mb, search_budgets={s.name: s.budget for s in searches},
               fp_ms=1e3 * fp.seconds / len(evals), q_ms=1e3 * q.seconds / len(evals),
               fp_peak_mb=fp.peak_mb, q_peak_mb=q.peak_mb, fp_start_mb=fp.start_mb,
               q_start_mb=q.start_mb, eval_images=len(evals), searches=not args.no_searches,
               q_warmup_s=q.warmup_s, fp_warmup_s=fp.warmup_s,
               eager_ms=1e3 * eager.seconds / len(evals) if eager else None,
               eager_peak_mb=eager.peak_mb if eager else None,
               identical_to_eager=q.digests == eager.digests if eager else None)
    with open(args.out, 'w') as f:
        json.dump(row, f, indent=2, default=str)


def markdown(rows):
    dev = rows[0]['device'] if rows else {}
    mem = 'GPU memory allocated' if dev.get('type') == 'cuda' else 'RSS'
    lines = [f'Device: {dev.get("name", "?")} ({dev.get("device", "?")}); 1333x800, random weights, '
             f'1 calibration image, {rows[0]["eval_images"] if rows else 0} eval image(s); '
             f'peak memory = {mem}.', '',
             '| model | method | calib s | FP ms/img | quantized ms/img | time vs FP | eager ms/img '
             '| eager vs FP | = eager | FP peak MB | quantized peak MB | peak vs FP |',
             '|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|']
    for r in rows:
        eager = (f'{r["eager_ms"]:.0f} | {r["eager_ms"] / r["fp_ms"]:.2f}x | '
                 + ('✓' if r['identical_to_eager'] else '✗') if r.get('eager_ms') else '- | - | -')
        lines.append(f'| {MODELS[r["model"]][0]} | {r["name"]} | {r["calib_s"]:.1f} | {r["fp_ms"]:.0f} | '
                     f'{r["q_ms"]:.0f} | {r["q_ms"] / r["fp_ms"]:.2f}x | {eager} | {r["fp_peak_mb"]:.0f} | '
                     f'{r["q_peak_mb"]:.0f} | {r["q_peak_mb"] / r["fp_peak_mb"]:.2f}x |')
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', default=['cascade_swin_s'], choices=list(MODELS))
    p.add_argument('--methods', nargs='+', default=list(DEFAULT_METHODS),
                   help=f'quantization blocks, or "all" ({", ".join(ALL_METHODS)})')
    p.add_argument('--device', default='cpu')
    p.add_argument('--eval-images', type=int, default=1)
    p.add_argument('--threads', type=int, default=None)
    p.add_argument('--work-dir', default='work_dirs/full_size')
    p.add_argument('--no-searches', action='store_true',
                   help='calibrate with observers only (FPCS / IGQ allocation skipped: they set '
                        'parameter values, not the work an evaluation does): time and memory rows '
                        'in minutes instead of an hour on a CPU')
    p.add_argument('--no-eager', action='store_true',
                   help='skip the second quantized evaluation on the eager (unfused) quantizers')
    p.add_argument('--worker', nargs=3, metavar=('MODEL', 'METHOD', 'OUT'), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.model, args.method, args.out = args.worker
        return worker(args)
    methods = list(ALL_METHODS) if args.methods == ['all'] else args.methods
    os.makedirs(args.work_dir, exist_ok=True)
    rows = []
    for model in args.models:
        for method in methods:
            out = osp.join(args.work_dir, f'{model}_{method}.json')
            cmd = [sys.executable, osp.abspath(__file__), '--device', args.device, '--eval-images',
                   str(args.eval_images), '--worker', model, method, out]
            cmd[2:2] = (['--no-searches'] if args.no_searches else []) + (
                ['--no-eager'] if args.no_eager else [])
            if args.threads:
                cmd[2:2] = ['--threads', str(args.threads)]
            print(f'[full_size] {model} {method} ...', flush=True)
            t0 = time.perf_counter()
            env = dict(os.environ)
            if args.device == 'cpu':
                env.setdefault('MALLOC_MMAP_THRESHOLD_', str(4 << 20))
            proc = subprocess.run(cmd, env=env)
            if proc.returncode != 0:
                print(f'[full_size] {model} {method} failed (exit {proc.returncode})', flush=True)
                continue
            with open(out) as f:
                rows.append(json.load(f))
            r = rows[-1]
            print(f'[full_size] {model} {method}: calib {r["calib_s"]:.1f} s, eval {r["q_ms"] / r["fp_ms"]:.2f}x'
                  + (f' (eager {r["eager_ms"] / r["fp_ms"]:.2f}x, identical={r["identical_to_eager"]})'
                     if r.get('eager_ms') else '')
                  + f', peak {r["q_peak_mb"] / r["fp_peak_mb"]:.2f}x ({time.perf_counter() - t0:.0f} s)',
                  flush=True)
    sys.path.insert(0, osp.join(ROOT, 'benchmarks'))
    from _data import write_table
    write_table(args.work_dir, 'full_size', rows, markdown(rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())

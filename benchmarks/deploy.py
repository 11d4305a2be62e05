"""Deployment benchmark: latency of PyTorch FP32, onnxruntime FP32 and mmvq's
exported int8 graphs, side by side in one process.

For each model (random, seeded weights: latency does not depend on training)
the FP32 model is timed in PyTorch and, exported with the plain ONNX exporter,
in onnxruntime; then for each method the model is converted and calibrated
(on 2 random batches: enough for timing), timed in PyTorch fake-quant, exported
with :func:`mmvq.export_onnx` and timed in onnxruntime. As a reference the
FP32 graph is also quantized by onnxruntime's own static quantizer
(``quantize_static``, QDQ, per-channel int8 weights) when ``--ort-static`` is
given. Each latency is the median of ``--repeats`` runs after warm-up, per
image at every ``--batch`` size, with ``--threads`` threads for both
runtimes::

    python benchmarks/deploy.py                                   # tiny ViT, DeiT-S, Swin-T, detector
    python benchmarks/deploy.py --models deit_s --batch 1 --threads 1 --ort-static

Writes ``deploy.md`` / ``deploy.json`` to ``--work-dir`` (with the graphs'
file sizes and the integer kernels onnxruntime ran). Accuracy of the deployed
tiny models is ``tools/ptq.py ... --backend onnxruntime`` (README).
"""
import argparse
import json
import os
import os.path as osp
import statistics
import sys
import time
import warnings

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = dict(
    tiny_vit=('tiny ViT (28x28)', 'benchmarks/configs/tiny_vit_cls.py', 'mmpretrain', (28, 28)),
    deit_s=('DeiT-S (224x224)', 'mmpretrain::deit/deit-small_4xb256_in1k.py', 'mmpretrain', (224, 224)),
    swin_t=('Swin-T (224x224)', 'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py', 'mmpretrain',
            (224, 224)),
    det_swin_t=('Mask R-CNN Swin-T backbone+neck (1344x800)',
                'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', 'mmdet', (800, 1344)),
)
METHODS = ('uniform_w8a8', 'fqvit_w8a8_attn4', 'adalog_w4a4', 'igq_w4a4_g8', 'mixed_w4a4')


def build(model_key):
    import torch
    from mmengine.config import Config
    from mmengine.registry import DefaultScope
    from mmvq.utils import load_config
    title, cfg_path, scope, size = MODELS[model_key]
    cfg = load_config(cfg_path) if '::' in cfg_path else Config.fromfile(osp.join(ROOT, cfg_path))
    if scope == 'mmpretrain':
        import mmpretrain.utils
        from mmpretrain.registry import MODELS as REG
        mmpretrain.utils.register_all_modules(init_default_scope=False)
    else:
        import mmdet.utils
        from mmdet.registry import MODELS as REG
        mmdet.utils.register_all_modules(init_default_scope=False)
    cfg.model.backbone.init_cfg = None
    cfg.model.pop('init_cfg', None)
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope(scope):
        model = REG.build(cfg.model)
    model.eval()
    if scope == 'mmpretrain':
        return model, (lambda m, x: m(x, mode='tensor')), size
    return model, (lambda m, x: tuple(m.extract_feat(x))), size


def quant_block(name):
    """The quantization block ``configs/_base_/quant/<name>.py``."""
    from mmengine.config import Config
    return Config.fromfile(osp.join(ROOT, 'configs', '_base_', 'quant', f'{name}.py')).quant.to_dict()


def median_ms(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def export_float(model, forward, x, path):
    import torch
    import torch.nn as nn

    class Traced(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, t):
            return forward(self.model, t)

    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(Traced(), (x, ), path, dynamo=False, opset_version=17,
                          input_names=['input'])
    return path


def ort_static(fp_path, x, out_path):
    """onnxruntime's own static QDQ quantization of the FP32 graph (the reference)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{'input': x.numpy()}])

        def get_next(self):
            return next(self.items, None)

    quantize_static(fp_path, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out_path


def openvino_runner(path, threads):
    """OpenVINO (CPU plugin) compiled from the same ONNX graph, f32 inference
    precision (so FP32 is FP32, and only the QDQ parts run in integer);
    returns ``(run(x), {runtime precision of the matmul/conv layers: count})``."""
    import numpy as np
    import openvino as ov
    import torch
    compiled = ov.Core().compile_model(path, 'CPU', {'INFERENCE_NUM_THREADS': threads,
                                                     'INFERENCE_PRECISION_HINT': 'f32',
                                                     'PERFORMANCE_HINT': 'LATENCY'})
    req = compiled.create_infer_request()
    precisions = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        if 'layerType' in info and info['layerType'].astype(str) in ('FullyConnected', 'MatMul',
                                                                      'Convolution'):
            p = info['runtimePrecision'].astype(str)
            precisions[p] = precisions.get(p, 0) + 1

    def run(x):
        req.infer({0: np.ascontiguousarray(x.numpy())})
        return [torch.from_numpy(req.get_output_tensor(i).data.copy())
                for i in range(len(compiled.outputs))]
    return run, precisions


def bench_model(args, key, log):
    import torch

    import mmvq
    from mmvq.deploy import export_onnx, kernels_of, ort_session, run_session
    from mmvq.deploy.runtime import profile_split
    torch.set_num_threads(args.threads)
    title, _, _, size = MODELS[key]
    rows = []
    wd = osp.join(args.work_dir, key)
    os.makedirs(wd, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    xs = {b: torch.randn(b, 3, *size, generator=g) for b in args.batch}
    calib = [torch.randn(1, 3, *size, generator=g) for _ in range(2)]

    def timed(tag, fn_of_batch, kind, path=None, kernels=None):
        row = dict(model=key, title=title, runtime=tag, kind=kind, threads=args.threads,
                   file_mb=round(osp.getsize(path) / 2**20, 2) if path else None, kernels=kernels)
        for b, x in xs.items():
            row[f'b{b}_ms_per_image'] = median_ms(lambda: fn_of_batch(b, x), args.repeats) / b
        rows.append(row)
        log(f'[deploy] {title} {tag} {kind}: ' + ', '.join(
            f'batch {b} {row[f"b{b}_ms_per_image"]:.1f} ms/image' for b in xs))
        return row

    for method in ['fp'] + list(args.methods):
        model, forward, _ = build(key)
        if method != 'fp':
            mmvq.quantize(model, quant_block(method), calib, forward)
        with torch.no_grad():
            timed('PyTorch', lambda b, x: forward(model, x), 'FP32' if method == 'fp' else
                  f'{method} fake-quant')
        for custom in ([False] if method == 'fp' else args.custom_ops):
            tag = '-custom' if custom else ''
            sessions = {}
            for b, x in xs.items():
                path = osp.join(wd, f'{method}{tag}_b{b}.onnx')
                if method == 'fp':
                    export_float(model, forward, x, path)
                else:
                    rep = export_onnx(model, x, path, forward_fn=forward, custom_ops=custom)
                    if custom and not any(f.startswith('custom') for f in rep['forms']):
                        break                  # nothing of this method has a custom operator
                sessions[b] = (path, ort_session(path, args.threads, quantized=method != 'fp'))
            if len(sessions) < len(xs):
                continue
            first = sessions[args.batch[0]][0]
            kind = ('FP32' if method == 'fp' else
                    f'{method} (mmvq export, {"custom ops" if custom else "portable"})')
            row = timed('onnxruntime', lambda b, x: run_session(sessions[b][1], x), kind, first,
                        kernels_of(first, args.threads, quantized=method != 'fp'))
            if args.profile:
                b, x = next(iter(xs.items()))
                s = ort_session(first, args.threads, quantized=method != 'fp',
                                profile_prefix=osp.join(wd, f'profile_{method}{tag}'))
                for _ in range(3):
                    run_session(s, x)
                row['profile'] = profile_split(s.end_profiling())
                log(f'[deploy]   profile: {row["profile"]}')
        if args.openvino:
            ov = {b: openvino_runner(p, args.threads) for b, (p, _) in sessions.items()}
            row = timed('OpenVINO', lambda b, x: ov[b][0](x), kind, first,
                        dict(integer={f'{k} layers': v for k, v in ov[args.batch[0]][1].items()
                                      if k in ('u8', 'i8')},
                             float={f'{k} layers': v for k, v in ov[args.batch[0]][1].items()
                                    if k not in ('u8', 'i8')}))
            b, x = next(iter(xs.items()))
            ref, got = run_session(sessions[b][1], x), ov[b][0](x)
            row['vs_onnxruntime_max_rel'] = max(
                float((a - c).abs().max() / a.abs().max().clamp(min=1e-12)) for a, c in zip(ref, got))
        if method == 'fp' and args.ort_static:
            static = {}
            for b, x in xs.items():
                path = ort_static(sessions[b][0], x, osp.join(wd, f'ort_static_b{b}.onnx'))
                static[b] = (path, ort_session(path, args.threads, quantized=False))
            first = static[args.batch[0]][0]
            timed('onnxruntime', lambda b, x: run_session(static[b][1], x),
                  'int8 (onnxruntime quantize_static)', first, kernels_of(first, args.threads, False))
    return rows


def markdown(rows, meta):
    out = [f'# mmvq deployment benchmark ({meta["date"]}, {meta["machine"]})', '',
           f'{meta["threads"]} thread(s) for PyTorch and onnxruntime; median of {meta["repeats"]} '
           'runs after 2 warm-ups; ms per image; speed-up against PyTorch FP32 at the same batch.', '']
    batches = meta['batch']
    for key in dict.fromkeys(r['model'] for r in rows):
        mrows = [r for r in rows if r['model'] == key]
        base = next(r for r in mrows if r['runtime'] == 'PyTorch' and r['kind'] == 'FP32')
        out += [f'## {mrows[0]["title"]}', '',
                '| runtime | model | ' + ' | '.join(f'batch {b} ms | vs PyTorch FP32' for b in batches)
                + ' | file MB | integer kernels (onnxruntime) |',
                '|---|---|' + '---:|---:|' * len(batches) + '---:|---|']
        for r in mrows:
            cells = []
            for b in batches:
                ms = r[f'b{b}_ms_per_image']
                cells.append(f'{ms:.1f} | {base[f"b{b}_ms_per_image"] / ms:.2f}x')
            kern = r.get('kernels') or {}
            ints = ', '.join(f'{k} {v}' for k, v in kern.get('integer', {}).items())
            flo = ', '.join(f'{k} {v}' for k, v in kern.get('float', {}).items())
            kcell = (ints or 'none') + (f'; float: {flo}' if flo else '') if kern else ''
            if 'vs_onnxruntime_max_rel' in r:
                kcell += f' (max rel. diff to onnxruntime {r["vs_onnxruntime_max_rel"]:.1e})'
            out.append(f'| {r["runtime"]} | {r["kind"]} | ' + ' | '.join(cells)
                       + f' | {r["file_mb"] if r["file_mb"] is not None else "-"} | {kcell} |')
        out.append('')
        for r in mrows:
            if r.get('profile'):
                out.append(f'- profile, {r["kind"]}: ' + ', '.join(
                    f'{k} {100 * v:.0f} %' for k, v in r['profile'].items()))
        out.append('')
    return '\n'.join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', choices=sorted(MODELS), default=list(MODELS))
    p.add_argument('--methods', nargs='+', default=list(METHODS))
    p.add_argument('--batch', type=int, nargs='+', default=[1, 8])
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--openvino', action='store_true',
                   help='also run every graph in OpenVINO (pip install openvino==2026.4.1; '
                        'not a dependency of mmvq)')
    p.add_argument('--ort-static', action='store_true',
                   help="also time onnxruntime's own static int8 quantization of the FP32 graph")
    p.add_argument('--custom-ops', nargs='+', choices=('on', 'off'), default=['off', 'on'],
                   help="mmvq's exports with its onnxruntime custom operators (on), the portable "
                        'graph (off), or both (default)')
    p.add_argument('--profile', action='store_true',
                   help="onnxruntime's profile of every graph at the first batch size: time "
                        'share per op kind')
    p.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs', 'deploy'))
    args = p.parse_args(argv)
    args.work_dir = osp.abspath(args.work_dir)
    args.custom_ops = [c == 'on' for c in dict.fromkeys(args.custom_ops)]
    os.makedirs(args.work_dir, exist_ok=True)
    import platform
    rows = []
    for key in args.models:
        rows += bench_model(args, key, lambda s: print(s, flush=True))
    meta = dict(date=time.strftime('%Y-%m-%d'), threads=args.threads, repeats=args.repeats,
                batch=args.batch, machine=f'{platform.machine()}, {os.cpu_count()} CPU cores',
                command='python benchmarks/deploy.py ' + ' '.join(argv if argv is not None
                                                                  else sys.argv[1:]))
    from mmvq.utils.io import atomic_write_text
    md = markdown(rows, meta) + f'`{meta["command"]}`\n'
    atomic_write_text(md, osp.join(args.work_dir, 'deploy.md'))
    atomic_write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + '\n',
                      osp.join(args.work_dir, 'deploy.json'))
    print(md)
    return 0


if __name__ == '__main__':
    sys.exit(main())

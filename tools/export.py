"""Export a model calibrated by mmvq to ONNX (QDQ + emulated subgraphs).

Usage::

    python tools/ptq.py CONFIG CHECKPOINT --save-quantized q.pth ...   # calibrate once
    python tools/export.py CONFIG CHECKPOINT --load-quantized q.pth --out model.onnx \\
        [--shape H W] [--batch-size B] [--opset 17] [--threads N]

A classifier is exported whole (image -> logits), a detector's backbone and
neck (image -> feature maps; RPN and RoI heads stay in mmdet, see
``tools/ptq.py --backend onnxruntime`` for the end-to-end evaluation). The
graph has static shapes: by default those of the first test image after the
config's test pipeline and data preprocessor (``--shape`` for another size,
random values). Next to ``model.onnx`` it writes ``model.onnx.report.txt``
and ``.json`` — every quantizer and what it became (QDQ pair, integer weight
codes, emulated subgraph), the counts against the quant summary,
``onnx.checker`` and the integer kernels onnxruntime runs — and it checks the
graph in onnxruntime against the PyTorch fake-quantized model on the example
input (max difference, and for a classifier whether the top-1 agrees).
"""
import argparse
import json
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import ptq  # noqa: E402  (its warning filter applies before mmengine is imported)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description='mmvq: export a calibrated model to ONNX')
    p.add_argument('config')
    p.add_argument('checkpoint', nargs='?', default=None, help='float checkpoint of the config')
    p.add_argument('--load-quantized', required=True, metavar='PATH',
                   help='quantized checkpoint written by tools/ptq.py --save-quantized')
    p.add_argument('--out', required=True, help='the .onnx file to write')
    p.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                   help='export for this input size (random input) instead of the first test image')
    p.add_argument('--batch-size', type=int, default=1)
    p.add_argument('--opset', type=int, default=17)
    p.add_argument('--custom-ops', choices=['on', 'off'], default='off',
                   help="on: integer LayerNorm, LIS, PTF, AdaLog and IGQ as mmvq's fused "
                        'onnxruntime custom operators (the graph then needs mmvq to run); '
                        'off: the portable graph every ONNX runtime runs')
    p.add_argument('--threads', type=int, default=None, help='onnxruntime threads for the check')
    p.add_argument('--cfg-options', nargs='+', action=ptq.DictAction)
    p.add_argument('--trust-checkpoint', action='store_true')
    p.add_argument('--verbose', action='store_true')
    p.add_argument('--debug', action='store_true')
    args = p.parse_intermixed_args(argv)
    args.launcher, args.local_rank = 'none', 0
    args.work_dir = osp.join(osp.dirname(osp.abspath(args.out)), 'export_logs')
    args.calib_images, args.calib_split, args.seed, args.skip_fp = None, None, None, True
    args.save_quantized, args.max_eval_images, args.profile, args.eval_repeats = None, None, False, 1
    return args


def export(args):
    import torch
    from mmengine.model import is_model_wrapper

    from mmvq.calibration import CalibrationSamples
    from mmvq.checkpoint import load_quantized
    from mmvq.deploy import format_report, graph_forward, kernels_of, ort_session, run_session
    from mmvq.deploy.export import export_onnx
    from mmvq.utils import checks
    from mmvq.utils.io import atomic_write_text

    if not args.out.endswith('.onnx'):
        raise checks.UserInputError('--out must name a .onnx file')
    if args.batch_size < 1:
        raise checks.UserInputError(f'--batch-size must be at least 1, got {args.batch_size}')
    checks.check_work_dir(osp.dirname(osp.abspath(args.out)))
    runner_args = argparse.Namespace(**{**vars(args), 'out': None})
    runner = ptq.build_runner(runner_args)
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    model.eval()
    load_quantized(model, args.load_quantized)
    forward_fn, part = graph_forward(model)
    device = next(model.parameters()).device
    if args.shape:
        g = torch.Generator(device='cpu').manual_seed(0)
        x = torch.randn(args.batch_size, 3, *args.shape, generator=g).to(device)
    else:
        batch = CalibrationSamples.from_config(runner.cfg, 1, 0, 'test')[0]
        x = model.data_preprocessor(batch, False)['inputs']
        x = x.expand(args.batch_size, *x.shape[1:]).contiguous()
    report = export_onnx(model, x, args.out, forward_fn=forward_fn, opset=args.opset,
                         custom_ops=args.custom_ops == 'on')
    report['part'] = part
    report['runtime'] = kernels_of(args.out, args.threads)
    with torch.no_grad():
        ref = forward_fn(model, x)
    ref = ref if isinstance(ref, tuple) else (ref, )
    got = run_session(ort_session(args.out, args.threads), x)
    diffs = [float((a.float() - b.float()).abs().max()) for a, b in zip(ref, got)]
    check = dict(input_shape=list(x.shape), max_abs_diff=max(diffs),
                 max_abs_ref=max(float(a.abs().max()) for a in ref))
    if part == 'model' and ref[0].dim() == 2:
        check['top1_agree'] = float((ref[0].argmax(1) == got[0].argmax(1)).float().mean())
    report['runtime_check'] = check
    text = format_report(report) + (
        f'\nonnxruntime vs PyTorch fake-quant on input {tuple(x.shape)}: max |diff| '
        f'{check["max_abs_diff"]:.3g} (max |output| {check["max_abs_ref"]:.3g})'
        + (f', top-1 agreement {check["top1_agree"]:.3f}' if 'top1_agree' in check else ''))
    atomic_write_text(text + '\n', args.out + '.report.txt')
    atomic_write_text(json.dumps(report, indent=2, default=str) + '\n', args.out + '.report.json')
    print(text)
    print(f'[mmvq] {part} exported to {args.out} ({report["file_bytes"] / 2**20:.1f} MB); '
          f'report: {args.out}.report.txt')
    return report


def main(argv=None):
    return ptq.run_tool('export.py', export, parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())

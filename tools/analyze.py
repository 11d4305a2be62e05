"""Per-layer quantization sensitivity and activation plots for a config.

Usage:
    python tools/analyze.py CONFIG [CHECKPOINT] [--work-dir DIR] [--calib-images N]
        [--analysis-images N] [--cfg-options ...] [--no-plots]

Calibrates the config's quantization block (as tools/ptq.py does), then
quantizes one layer at a time and writes, to the work dir:
``sensitivity.md`` / ``sensitivity.json`` (SQNR and MSE of the model output —
logits for classifiers, backbone+neck features for detectors — one row per
quantized layer, most sensitive first), ``quant_summary.txt`` and, unless
``--no-plots``, ``plots/ln_channel_ranges.png``, ``plots/post_softmax_hist.png``
and ``plots/post_gelu_hist.png``.
"""
import argparse
import json
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import ptq  # noqa: E402,F401  (its warning filter applies before mmengine is imported)


def parse_args(argv=None):
    from ptq import DictAction
    p = argparse.ArgumentParser(description='mmvq per-layer sensitivity and activation plots')
    p.add_argument('config')
    p.add_argument('checkpoint', nargs='?', default=None)
    p.add_argument('--work-dir')
    p.add_argument('--cfg-options', nargs='+', action=DictAction)
    p.add_argument('--calib-images', type=int, default=None)
    p.add_argument('--seed', type=int, default=None)
    p.add_argument('--analysis-images', type=int, default=2,
                   help='images of the test split the output error is measured on')
    p.add_argument('--max-layers', type=int, default=4, help='layers per plot')
    p.add_argument('--no-plots', action='store_true')
    p.add_argument('--trust-checkpoint', action='store_true')
    p.add_argument('--verbose', action='store_true', help="mmengine's tables on the console too")
    p.add_argument('--debug', action='store_true')
    args = p.parse_intermixed_args(argv)     # CHECKPOINT may follow options, as in ptq.py
    # fields tools/ptq.py's runner builder reads
    args.launcher, args.local_rank, args.out = 'none', 0, None
    args.calib_split, args.skip_fp, args.save_quantized = None, True, None
    args.load_quantized, args.max_eval_images, args.profile = None, None, False
    args.eval_repeats = 1
    return args


def _pick(names, k):
    """Up to ``k`` names spread over the network (first, ..., last)."""
    if len(names) <= k:
        return names
    idx = sorted({round(i * (len(names) - 1) / (k - 1)) for i in range(k)})
    return [names[i] for i in idx]


def analyze(args):
    import torch
    from mmengine.model import is_model_wrapper

    import mmvq
    from mmvq import analysis
    from mmvq.adapters import model_task
    from mmvq.calibration import CalibrationSamples, build_search, run_calibration
    from mmvq.schema import calib_images_for, calib_settings
    from mmvq.utils.io import atomic_write_text
    from mmvq.modules import QuantLayerNorm, QuantLinear, QuantMatMul
    from ptq import build_runner

    runner = build_runner(args)
    cfg = runner.cfg
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    model.eval()
    qcfg = cfg.quant.to_dict()
    settings = calib_settings(qcfg, args.calib_images, seed=args.seed)
    task = model_task(model)
    n_calib, source = calib_images_for(task, settings['images'],
                                       (qcfg.get('calib') or {}).get('images'))
    split = settings['split']
    samples = CalibrationSamples.from_config(cfg, n_calib, settings['seed'], split, source)
    runner.logger.info(f'[mmvq] calibration: {len(samples)} images of the {split} split '
                       f'({samples.source})')
    probe = CalibrationSamples.from_config(cfg, args.analysis_images, 0, 'test')
    is_classifier = task == 'classification'

    def inputs_of(batch):
        return model.data_preprocessor(batch, False)['inputs']

    def output_fn(m, x):
        return m(x, mode='tensor') if is_classifier else m.extract_feat(x)

    probe_inputs = [inputs_of(probe[i]) for i in range(len(probe))]
    mmvq.convert(model, qcfg)
    run_calibration(model, samples, lambda m, b: m.test_step(b),
                    [build_search(s) for s in qcfg.get('searches', [])], runner.logger)
    rows, total = analysis.layer_sensitivity(model, probe_inputs, output_fn)
    title = qcfg.get('name', osp.basename(args.config))
    work = cfg.work_dir
    atomic_write_text(analysis.sensitivity_markdown(rows, total, title), osp.join(work, 'sensitivity.md'))
    atomic_write_text(json.dumps(dict(method=title, total=total, layers=rows), indent=2) + '\n',
                      osp.join(work, 'sensitivity.json'))
    atomic_write_text(mmvq.format_summary(model) + '\n', osp.join(work, 'quant_summary.txt'))
    runner.logger.info(f'[mmvq] sensitivity of {len(rows)} layers written to {work}/sensitivity.md '
                       f'(all on: {total["sqnr_db"]:.2f} dB)')
    if args.no_plots:
        return
    mods = dict(model.named_modules())
    ln = _pick([n for n, m in mods.items() if isinstance(m, QuantLayerNorm)], args.max_layers)
    sm = _pick([n for n, m in mods.items() if isinstance(m, QuantMatMul) and n.endswith('matmul2')],
               args.max_layers)
    gelu = _pick([n for n, m in mods.items() if isinstance(m, QuantLinear) and n.endswith('ffn.layers.1')],
                 args.max_layers)
    acts = analysis.capture(model, probe_inputs, output_fn, ln, sm, gelu)
    os.makedirs(osp.join(work, 'plots'), exist_ok=True)
    analysis.plot_ln_channel_ranges({n: acts[n] for n in ln}, osp.join(work, 'plots', 'ln_channel_ranges.png'),
                                    args.max_layers)

    def softmax_quantizer(name):
        owner = mods[name.rsplit('.', 1)[0]]
        lis = getattr(getattr(owner, 'softmax', None), 'lis_quantizer', None)
        a = mods[name].a_quantizer
        return lis if getattr(lis, 'integer_softmax', False) else a

    analysis.plot_histograms({n: acts[n] for n in sm}, {n: softmax_quantizer(n) for n in sm},
                             osp.join(work, 'plots', 'post_softmax_hist.png'), f'post-softmax: {title}')
    analysis.plot_histograms({n: acts[n] for n in gelu}, {n: mods[n].input_quantizer for n in gelu},
                             osp.join(work, 'plots', 'post_gelu_hist.png'), f'post-GELU: {title}')
    runner.logger.info(f'[mmvq] plots written to {work}/plots')
    del torch


def main(argv=None):
    args = parse_args(argv)
    try:
        analyze(args)
    except Exception as exc:  # noqa: BLE001
        if args.debug:
            raise
        text = str(exc).strip()
        print(f'analyze.py: error: {text.splitlines()[0] if text else type(exc).__name__}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())

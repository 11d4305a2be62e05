"""Post-training quantization of an mmdet/mmpretrain model, FP vs quantized.

Same arguments as mmdet's ``tools/test.py`` plus calibration options::

    python tools/ptq.py configs/cascade_swin_s_fqvit.py CHECKPOINT \\
        --work-dir work_dirs/x --calib-images 1 --max-eval-images 50

The config must hold a ``quant = dict(...)`` block (see
``configs/_base_/quant/``). Calibration draws ``--calib-images`` images
(seeded) from the train split with the test pipeline; FP and quantized models
are evaluated on the same data with the config's metric; ``results.json`` and
``results.md`` go to the work dir.
"""
import argparse
import os
import os.path as osp
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='mmvq post-training quantization (FP vs quantized)')
    parser.add_argument('config', help='config file (must contain a `quant` block)')
    parser.add_argument('checkpoint', nargs='?', default=None, help='float checkpoint file')
    parser.add_argument('--work-dir', help='directory for logs and results')
    parser.add_argument('--out', type=str, help='dump quantized predictions to a pickle file')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, key=value')
    parser.add_argument('--launcher', choices=['none', 'pytorch', 'slurm', 'mpi'], default='none')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    parser.add_argument('--calib-images', type=int, default=None,
                        help='calibration images from the train split (default: config, else 1)')
    parser.add_argument('--calib-split', default=None, help='split to calibrate on (default train)')
    parser.add_argument('--seed', type=int, default=None, help='seed of the calibration draw')
    parser.add_argument('--skip-fp', action='store_true', help='evaluate only the quantized model')
    parser.add_argument('--save-quantized', metavar='PATH', help='write the quantized checkpoint')
    parser.add_argument('--load-quantized', metavar='PATH',
                        help='load a quantized checkpoint instead of calibrating')
    parser.add_argument('--max-eval-images', type=int, default=None,
                        help='evaluate only the first N images (essential on CPU)')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks')
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


class DictAction(argparse.Action):
    """Lazy proxy to mmengine's DictAction (keeps ``--help`` import-free)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from mmengine.config import DictAction as _DictAction
        _DictAction(self.option_strings, self.dest)(parser, namespace, values, option_string)


def build_runner(args):
    from mmengine.config import Config
    from mmengine.runner import Runner

    import mmvq  # noqa: F401  (registers mmvq.PTQLoop)
    from mmvq.calibration import validate_qcfg

    if not osp.isfile(args.config) or not args.config.endswith('.py'):
        raise FileNotFoundError(f'config {args.config} is not a Python config file')
    if args.checkpoint is not None and not osp.isfile(args.checkpoint):
        raise FileNotFoundError(f'checkpoint {args.checkpoint} does not exist')
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    validate_qcfg(cfg.get('quant'))
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    os.makedirs(cfg.work_dir, exist_ok=True)
    if not os.access(cfg.work_dir, os.W_OK):
        raise PermissionError(f'work dir {cfg.work_dir} is not writable: pass --work-dir')
    cfg.load_from = args.checkpoint
    cfg.test_cfg = dict(type='mmvq.PTQLoop', quant=cfg.quant.to_dict() if hasattr(cfg.quant, 'to_dict')
                        else dict(cfg.quant),
                        calib_images=args.calib_images, calib_split=args.calib_split, seed=args.seed,
                        skip_fp=args.skip_fp, save_quantized=args.save_quantized,
                        load_quantized=args.load_quantized, max_eval_images=args.max_eval_images)
    if args.launcher != 'none':
        cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})
        import torch
        if not torch.cuda.is_available():
            cfg.env_cfg.dist_cfg['backend'] = 'gloo'
    runner = Runner.from_cfg(cfg)
    if args.out is not None:
        from mmdet.engine.hooks.utils import trigger_visualization_hook  # noqa: F401
        from mmdet.evaluation import DumpDetResults
        if not args.out.endswith(('.pkl', '.pickle')):
            raise ValueError('--out must be a .pkl or .pickle file')
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    return runner


def main(argv=None):
    args = parse_args(argv)
    try:
        runner = build_runner(args)
        runner.test()
    except (FileNotFoundError, PermissionError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        if args.debug:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f'ptq.py: error: {msg}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())

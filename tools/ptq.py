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
import warnings

# mmengine imports pkg_resources (needed for its `mmdet::` config lookup),
# which warns on every import; nothing for a user to act on
warnings.filterwarnings('ignore', message='pkg_resources is deprecated', category=UserWarning)


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
                        help='calibration images from the train split (default: the block\'s '
                             'calib.images, else 32 for a classifier and 1 for a detector)')
    parser.add_argument('--calib-split', default=None, help='split to calibrate on (default train)')
    parser.add_argument('--seed', type=int, default=None, help='seed of the calibration draw')
    parser.add_argument('--skip-fp', action='store_true', help='evaluate only the quantized model')
    parser.add_argument('--save-quantized', metavar='PATH', help='write the quantized checkpoint')
    parser.add_argument('--load-quantized', metavar='PATH',
                        help='load a quantized checkpoint instead of calibrating')
    parser.add_argument('--max-eval-images', type=int, default=None,
                        help='evaluate N images drawn with --seed, spread over the evaluation '
                             'set (essential on CPU)')
    parser.add_argument('--eval-repeats', type=int, default=1, metavar='K',
                        help='time each evaluation over K passes and report the fastest '
                             '(metrics from the first); steadies time ratios of short evaluations')
    parser.add_argument('--backend', choices=['pytorch', 'onnxruntime'], default='pytorch',
                        help='onnxruntime: also export the quantized model to ONNX (work dir onnx/) '
                             'and evaluate it in onnxruntime, a third phase of results.json')
    parser.add_argument('--custom-ops', choices=['on', 'off'], default='off',
                        help="with --backend onnxruntime: on = export integer LayerNorm, LIS, PTF, "
                             "AdaLog and IGQ as mmvq's fused onnxruntime custom operators; off = "
                             'the portable graph every ONNX runtime runs')
    parser.add_argument('--ort-threads', type=int, default=None,
                        help='onnxruntime intra-op threads (default: one per core)')
    parser.add_argument('--compare-eager', action='store_true',
                        help='also evaluate the quantized model on the eager (unfused) quantizer '
                             'code: metrics must be identical, times side by side')
    parser.add_argument('--profile', action='store_true',
                        help='write profile_fp.txt / profile_quantized.txt (where eval time goes)')
    parser.add_argument('--trust-checkpoint', action='store_true',
                        help='allow a checkpoint holding pickled objects (only files you trust)')
    parser.add_argument('--verbose', action='store_true',
                        help="show mmengine's environment, config and hook tables on the console "
                             '(always in the log file)')
    parser.add_argument('--debug', action='store_true', help='show full tracebacks')
    # intermixed: the optional CHECKPOINT may follow options (dist_ptq.sh puts
    # --launcher first), as long as it precedes --cfg-options
    args = parser.parse_intermixed_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


class DictAction(argparse.Action):
    """Lazy proxy to mmengine's DictAction (keeps ``--help`` import-free)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from mmengine.config import DictAction as _DictAction
        _DictAction(self.option_strings, self.dest)(parser, namespace, values, option_string)


# (dataloader, loop config, optimizer/evaluator): mmengine's Runner wants each
# triple all set or all None; ptq.py never trains or validates
UNUSED_TRIPLES = (('train_dataloader', 'train_cfg', 'optim_wrapper'),
                  ('val_dataloader', 'val_cfg', 'val_evaluator'))


def _drop_partial_triples(cfg):
    """A test-only config may keep a train split for calibration without
    ``train_cfg``/``optim_wrapper``; the runner gets none of the three."""
    for keys in UNUSED_TRIPLES:
        present = [cfg.get(k) is not None for k in keys]
        if any(present) and not all(present):
            for k in keys:
                cfg[k] = None


def build_runner(args):
    from mmengine.config import Config
    from mmengine.model import is_model_wrapper
    from mmengine.runner import Runner

    import mmvq  # noqa: F401  (registers mmvq.PTQLoop)
    from mmvq.schema import calib_settings, check_calib_images, validate_qcfg
    from mmvq.calibration.data import config_splits, missing_split_message
    from mmvq.utils import checks
    from mmvq.utils.console import QuietConsoleRunner

    checks.check_config_path(args.config)
    if getattr(args, 'backend', 'pytorch') == 'onnxruntime':
        from mmvq.utils.optional import require
        require('onnx', 'onnxruntime', purpose='--backend onnxruntime')
    state = None
    if args.checkpoint is not None:
        state = checks.load_state_dict(args.checkpoint, args.trust_checkpoint)
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    validate_qcfg(cfg.get('quant'))
    check_calib_images(args.calib_images)
    if args.eval_repeats < 1:
        raise checks.UserInputError(f'--eval-repeats must be at least 1, got {args.eval_repeats}')
    if args.out is not None and not args.out.endswith(('.pkl', '.pickle')):
        raise checks.UserInputError('--out must name a .pkl or .pickle file')
    if cfg.get('test_dataloader') is None or cfg.get('test_evaluator') is None:
        raise checks.UserInputError('the config has no test_dataloader/test_evaluator: ptq.py '
                                    'evaluates on the test split, as tools/test.py')
    checks.check_dataset(cfg, 'test_dataloader')
    calib_split = calib_settings(cfg.quant, split=args.calib_split)['split']
    calib_loader = None
    if args.load_quantized is None:
        calib_loader = cfg.get(f'{calib_split}_dataloader')
        if calib_loader is None:
            raise checks.UserInputError(missing_split_message(calib_split, config_splits(cfg)))
        checks.check_dataset(cfg, f'{calib_split}_dataloader')
        calib_loader = calib_loader.to_dict() if hasattr(calib_loader, 'to_dict') else calib_loader
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    checks.check_work_dir(cfg.work_dir)
    cfg.load_from = None                       # loaded (and checked) below
    quant = cfg.quant.to_dict() if hasattr(cfg.quant, 'to_dict') else dict(cfg.quant)
    cfg.test_cfg = dict(type='mmvq.PTQLoop', quant=quant, checkpoint=args.checkpoint,
                        calib_images=args.calib_images, calib_split=args.calib_split, seed=args.seed,
                        skip_fp=args.skip_fp, save_quantized=args.save_quantized,
                        load_quantized=args.load_quantized, max_eval_images=args.max_eval_images,
                        profile=args.profile, eval_repeats=args.eval_repeats,
                        backend=getattr(args, 'backend', 'pytorch'),
                        ort_threads=getattr(args, 'ort_threads', None),
                        custom_ops=getattr(args, 'custom_ops', 'off') == 'on',
                        compare_eager=getattr(args, 'compare_eager', False),
                        calib_dataloader=calib_loader)
    _drop_partial_triples(cfg)
    if args.launcher != 'none' and getattr(args, 'backend', 'pytorch') != 'pytorch':
        raise checks.UserInputError('--backend onnxruntime evaluates in one process: drop --launcher')
    if args.launcher != 'none':
        import torch
        import torch.distributed as dist
        if not torch.cuda.is_available():
            # CPU: mmengine's init_dist needs CUDA and its DDP wrapper rejects
            # CPU modules, so start gloo here and use an inference-only wrapper
            cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
            cfg.model_wrapper_cfg = dict(type='mmvq.InferenceOnlyWrapper')
            if args.launcher != 'pytorch':
                raise checks.UserInputError(f'--launcher {args.launcher} needs GPUs; on CPU use '
                                            'tools/dist_ptq.sh (--launcher pytorch)')
            if not dist.is_initialized():
                dist.init_process_group('gloo')
    runner = (Runner if getattr(args, 'verbose', False) else QuietConsoleRunner).from_cfg(cfg)
    if state is not None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        checks.check_state_dict_fits(state, model, args.checkpoint)
        model.load_state_dict(state, strict=True)
        runner.logger.info(f'[mmvq] loaded checkpoint {args.checkpoint}')
    if args.out is not None:
        from mmdet.evaluation import DumpDetResults
        runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
    return runner


def run_tool(prog, fn, args):
    """``fn(args)``; an error is one ``<prog>: error: ...`` line and exit code 2
    (the traceback with ``--debug``)."""
    try:
        fn(args)
    except Exception as exc:  # noqa: BLE001 - one line for users, full trace with --debug
        if args.debug:
            raise
        text = str(exc).strip()
        msg = text.splitlines()[0] if text else type(exc).__name__
        if type(exc).__name__ not in ('UserInputError', 'MissingExtraError') and not isinstance(exc, (ValueError, OSError)):
            msg = f'{type(exc).__name__}: {msg} (run with --debug for the traceback)'
        entry = osp.basename(sys.argv[0]) if sys.argv else ''
        print(f'{entry if entry.startswith("mmvq-") else prog}: error: {msg}', file=sys.stderr)
        return 2
    return 0


def main(argv=None):
    return run_tool('ptq.py', lambda args: build_runner(args).test(), parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())

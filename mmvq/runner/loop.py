"""``mmvq.PTQLoop``: calibrate on the train split, evaluate FP and quantized.

Selected by ``test_cfg=dict(type='mmvq.PTQLoop', quant=..., ...)`` (what
``tools/ptq.py`` sets), so mmengine's Runner provides checkpoint loading,
``--cfg-options``, work dirs, logging and launchers exactly as in mmdet's
``tools/test.py``. Quantization and reports are :class:`PTQSession`'s, shared
with ``mmvq.PTQHook``; the loop adds the FP evaluation and the timing protocol.
"""
import contextlib
import copy
import os.path as osp
import time

import torch
from mmengine.dist import is_main_process
from mmengine.registry import DATASETS
from mmengine.runner.loops import BaseLoop

from ..calibration.data import spread_subset
from ..modes import fused_quantizers
from ..modules.base import module_device
from ..registry import LOOPS
from ..schema import calib_settings, validate_qcfg
from ..utils.memory import release_memory
from ..utils.progress import progress_bar
from .profiling import profile_to
from .report import PhaseMeter
from .session import PTQSession

BACKENDS = ('pytorch', 'onnxruntime')


@LOOPS.register_module()
class PTQLoop(BaseLoop):
    """Post-training quantization test loop.

    Args:
        runner (Runner): the runner.
        dataloader (dict | DataLoader): evaluation dataloader.
        evaluator (dict | list | Evaluator): evaluation metrics.
        quant (dict): quantization block (``roles``, ``scope``, ``searches``,
            ``calib`` ...); see :mod:`mmvq.schema`.
        calib_images (int | None): calibration images (default: the block's
            ``calib.images``, else the task's: 32 for a classifier, 1 for a
            detector, as the papers).
        calib_split (str | None): split to calibrate on (default ``'train'``).
        calib_dataloader (dict | None): that split's dataloader config (only
            its ``dataset`` is used); default ``cfg[f'{calib_split}_dataloader']``.
            ``tools/ptq.py`` passes it so that a test-only config (no
            ``train_cfg``/``optim_wrapper``) can calibrate on its train split.
        seed (int | None): seed of the calibration draw and of the
            ``max_eval_images`` subset.
        skip_fp (bool): evaluate only the quantized model.
        save_quantized (str | None): write the quantized checkpoint here.
        load_quantized (str | None): skip calibration, load this checkpoint.
        max_eval_images (int | None): evaluate N images drawn with ``seed``
            and spread over the evaluation set (kept in dataset order; their
            indices go to ``results.json``).
        profile (bool): profile both evaluations (torch.profiler, mmvq modules
            labelled) into ``profile_fp.txt`` / ``profile_quantized.txt``;
            their timings then include the profiler's overhead.
        eval_repeats (int): time each evaluation over this many passes and
            report the fastest (metrics come from the first pass; the others
            only run the model). Steadies the FP-vs-quantized time ratio of
            evaluations that take seconds, where machine noise dominates.
        checkpoint (str | None): float checkpoint path, for the report.
        backend (str): ``'pytorch'`` (the fake-quantized model) or
            ``'onnxruntime'``: also export the quantized model to ONNX
            (:func:`mmvq.deploy.export_onnx`; a classifier whole, a detector's
            backbone + neck, one graph per input shape under
            ``<work_dir>/onnx/``) and evaluate it in onnxruntime with the same
            data and evaluator, a third phase of ``results.json``.
        ort_threads (int | None): onnxruntime intra-op threads.
        custom_ops (bool): export with mmvq's onnxruntime custom operators
            (:func:`mmvq.deploy.export_onnx`).
        compare_eager (bool): after the quantized evaluation, evaluate the
            same quantized model again with every quantizer on its eager
            PyTorch code (``quant.fused=False``): ``results.json`` gains
            ``metrics.eager``, ``metrics.identical_to_eager`` and the eager
            time per image.
    """

    def __init__(self, runner, dataloader, evaluator, quant=None, calib_images=None,
                 calib_split=None, seed=None, skip_fp=False, save_quantized=None,
                 load_quantized=None, max_eval_images=None, checkpoint=None, profile=False,
                 eval_repeats=1, calib_dataloader=None, backend='pytorch', ort_threads=None, custom_ops=False,
                 compare_eager=False):
        validate_qcfg(quant)
        if backend not in BACKENDS:
            raise ValueError(f'--backend {backend!r}: use one of {", ".join(BACKENDS)}')
        self.backend, self.ort_threads = backend, ort_threads
        self.custom_ops = bool(custom_ops)
        self.compare_eager = bool(compare_eager)
        if not isinstance(eval_repeats, int) or eval_repeats < 1:
            raise ValueError(f'--eval-repeats must be a positive integer, got {eval_repeats!r}')
        self.eval_repeats = eval_repeats
        self.seed = calib_settings(quant, seed=seed)['seed']
        self.max_eval_images = max_eval_images
        self.eval_subset = None
        self.profile = profile
        if max_eval_images is not None:
            if max_eval_images < 1:
                raise ValueError(f'--max-eval-images must be positive, got {max_eval_images}')
            if isinstance(dataloader, dict):
                dataloader = self._spread_eval_subset(dataloader, max_eval_images)
        super().__init__(runner, dataloader)
        if isinstance(evaluator, (dict, list)):
            self.evaluator = runner.build_evaluator(evaluator)
        else:
            self.evaluator = evaluator
        dataset = self.dataloader.dataset
        if hasattr(dataset, 'metainfo'):
            self.evaluator.dataset_meta = dataset.metainfo
            self.runner.visualizer.dataset_meta = dataset.metainfo
        self._restrict_metrics()
        self.skip_fp = skip_fp
        # fail fast, before any evaluation: the quantization block must fit the
        # model and the calibration split must hold enough images
        self.session = PTQSession(runner, quant, calib_images=calib_images,
                                  calib_split=calib_split, seed=seed,
                                  calib_dataloader=calib_dataloader,
                                  save_quantized=save_quantized, load_quantized=load_quantized,
                                  checkpoint=checkpoint, entry='PTQLoop')

    def _spread_eval_subset(self, dataloader, n):
        """Evaluate ``n`` images drawn with the seed, spread over the dataset."""
        dataloader = copy.deepcopy(dataloader)
        dataset = dataloader['dataset']
        if isinstance(dataset, dict):
            dataset = DATASETS.build(dataset)
        if not hasattr(dataset, 'get_subset_'):
            raise ValueError(f'--max-eval-images needs an mmengine BaseDataset; '
                             f'{type(dataset).__name__} has no get_subset_')
        total = len(dataset)
        indices = spread_subset(total, n, self.seed)
        dataset.get_subset_(indices)
        dataloader['dataset'] = dataset
        self.eval_subset = dict(images=len(indices), of=total, seed=self.seed,
                                indices=indices)
        return dataloader

    def _restrict_metrics(self):
        """COCO metrics evaluate every annotated image unless told the subset."""
        dataset = self.dataloader.dataset
        if self.max_eval_images is None:
            return
        ids = [dataset.get_data_info(i).get('img_id') for i in range(len(dataset))]
        for metric in self.evaluator.metrics:
            if hasattr(metric, 'img_ids') and None not in ids:
                metric.img_ids = ids

    @torch.no_grad()
    def _evaluate(self, tag, model=None):
        """Evaluate the model as it stands (or ``model``, something with a
        ``test_step``); returns ``(metrics, PhaseMeter)``."""
        model_ = model or self.runner.model
        self.runner.model.eval()
        self.runner.call_hook('before_test_epoch')
        # one untimed forward first (lazy initialisation, allocator warm-up,
        # cached fake-quantized weights, the ONNX export of the first input
        # shape), so the timings compare steady state with steady state
        t0 = time.perf_counter()
        model_.test_step(next(iter(self.dataloader)))
        warmup_s = time.perf_counter() - t0
        release_memory()          # both phases start from the memory they hold, not glibc's leftovers
        bar = progress_bar(len(self.dataloader), f'eval {tag}')
        prof = contextlib.nullcontext()
        model = self.session.model
        if self.profile and is_main_process():
            prof = profile_to(model, osp.join(self.runner.work_dir, f'profile_{tag.lower()}.txt'),
                              f'{tag} evaluation, {len(self.dataloader)} batches')
        with PhaseMeter(module_device(model), warmup_s=warmup_s) as meter, prof:
            for idx, data_batch in enumerate(self.dataloader):
                self.runner.call_hook('before_test_iter', batch_idx=idx, data_batch=data_batch)
                outputs = model_.test_step(data_batch)
                self.evaluator.process(data_samples=outputs, data_batch=data_batch)
                self.runner.call_hook('after_test_iter', batch_idx=idx, data_batch=data_batch,
                                      outputs=outputs)
                if bar is not None:
                    bar.update(1)
            meter.lap()
            for _ in range(self.eval_repeats - 1):       # timing only
                for data_batch in self.dataloader:
                    model_.test_step(data_batch)
                meter.lap()
        if meter.busy:
            self.runner.logger.warning(
                f'[mmvq] the machine was busy during the {tag} evaluation '
                f'({meter.describe_load()}): its time, and the quantized/FP time ratio, are not '
                'reliable; re-run on a quiet machine to compare times')
        if bar is not None:
            bar.close()
        metrics = self.evaluator.evaluate(len(self.dataloader.dataset))
        self.runner.call_hook('after_test_epoch', metrics=metrics)
        self.runner.logger.info(f'[mmvq] {tag} evaluation: {len(self.dataloader.dataset)} images '
                                f'in {meter.elapsed:.2f} s')
        return metrics, meter

    def _deployed(self):
        """The quantized model with its exported part in onnxruntime, and the
        record ``results.json`` keeps of it (filled as graphs are exported)."""
        from ..deploy import DeployedModel, kernels_of, onnx_dir_export_fn
        record = dict(backend='onnxruntime', threads=self.ort_threads, export_s=0.0, graphs={},
                      custom_ops=self.custom_ops)
        export = onnx_dir_export_fn(self.session.model, osp.join(self.runner.work_dir, 'onnx'),
                                    logger=self.runner.logger, reports=record['graphs'],
                                    custom_ops=self.custom_ops)

        def timed_export(x):
            t0 = time.perf_counter()
            path = export(x)
            record['graphs'][osp.basename(path)]['runtime'] = kernels_of(path, self.ort_threads)
            record['export_s'] += time.perf_counter() - t0
            return path
        return DeployedModel(self.session.model, timed_export, self.ort_threads), record

    def run(self):
        self.runner.call_hook('before_test')
        self.runner.logger.info(f'[mmvq] full log (environment, config): {self.runner.log_dir}')
        metrics, phases = dict(fp=None), {}
        if not self.skip_fp:
            metrics['fp'], phases['fp'] = self._evaluate('FP')
        self.session.quantize()
        metrics['quantized'], phases['quantized'] = self._evaluate('quantized')
        if self.compare_eager:
            with fused_quantizers(self.session.model, False):
                metrics['eager'], phases['eager'] = self._evaluate('eager')
        deploy = None
        if self.backend == 'onnxruntime':
            deployed, deploy = self._deployed()
            metrics['onnxruntime'], phases['onnxruntime'] = self._evaluate('onnxruntime', deployed)
            deploy['graphs'] = {k: {f: v for f, v in r.items() if f != 'quantizers'}
                                for k, r in deploy['graphs'].items()}
        self.session.report(phases, metrics, len(self.dataloader.dataset), self.eval_subset,
                            self.eval_repeats, self.profile, deploy=deploy)
        self.runner.call_hook('after_test')
        return metrics['quantized']

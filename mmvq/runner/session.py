"""What ``mmvq.PTQLoop`` and ``mmvq.PTQHook`` share: one PTQ session.

A session is made from a Runner and a quantization block. Made, it has
checked the block against the model and drawn the calibration images, so a
bad block or a too-small split fails before any evaluation; then
:meth:`PTQSession.quantize` converts and calibrates the model (or loads a
quantized checkpoint), writes the quant summary and the optional quantized
checkpoint, and :meth:`PTQSession.report` writes ``results.json`` /
``results.md`` and the console lines. The loop adds an FP evaluation and its
timing protocol around it; the hook runs inside the user's own test loop.
"""
import copy
import os.path as osp
import time

from mmengine.dist import get_rank, get_world_size, is_main_process
from mmengine.model import is_model_wrapper

from ..adapters import model_task
from ..calibration import CalibrationSamples, build_search, run_calibration
from ..calibration.data import config_splits, missing_split_message
from ..checkpoint import load_quantized, save_quantized
from ..conversion import convert, resolve_scope, validate_plan
from ..schema import calib_images_for, calib_settings, validate_qcfg
from ..summary import format_summary
from ..utils.io import atomic_write_text
from ..utils.progress import progress_bar
from .report import build_results, console_lines, write_results


def unwrap(model):
    """The model inside an mmengine model wrapper."""
    return model.module if is_model_wrapper(model) else model


class PTQSession:
    """Quantize a Runner's model with a quantization block; report the run.

    Args:
        runner (Runner): the runner (its model, config, logger, work dir).
        quant (dict): the quantization block (:mod:`mmvq.schema`).
        calib_images (int | None): calibration images (default: the block's
            ``calib.images``, else the task's: 32 for a classifier, 1 for a
            detector, as the papers).
        calib_split (str | None): split to calibrate on (default: the
            block's ``calib.split``, else ``'train'``).
        seed (int | None): seed of the calibration draw (default: the
            block's ``calib.seed``, else 0).
        calib_dataloader (dict | None): that split's dataloader config (only
            its ``dataset`` is used); default ``cfg[f'{calib_split}_dataloader']``.
        save_quantized (str | None): write the quantized checkpoint here.
        load_quantized (str | None): skip calibration, load this checkpoint.
        checkpoint (str | None): float checkpoint path, for the report
            (default the config's ``load_from``).
        entry (str): who runs the session, for the report.
    """

    def __init__(self, runner, quant, calib_images=None, calib_split=None, seed=None,
                 calib_dataloader=None, save_quantized=None, load_quantized=None,
                 checkpoint=None, entry='PTQLoop'):
        validate_qcfg(quant)
        self.runner = runner
        self.entry = entry
        self.qcfg = copy.deepcopy(dict(quant))
        settings = calib_settings(self.qcfg, calib_images, calib_split, seed)
        self.calib_split, self.seed = settings['split'], settings['seed']
        self.save_quantized, self.load_quantized = save_quantized, load_quantized
        self.checkpoint = checkpoint or runner.cfg.get('load_from')
        self.searches = [build_search(s) for s in self.qcfg.get('searches', [])]
        model = self.model
        self.task = model_task(model)
        self.scope = resolve_scope(model, self.qcfg.get('scope', 'auto'))
        validate_plan(model, self.qcfg)
        block = (self.qcfg.get('calib') or {}).get('images')
        self.calib_images, self.calib_source = calib_images_for(self.task, settings['images'],
                                                                block)
        self.calib_samples = None
        if not load_quantized:
            loader = calib_dataloader or runner.cfg.get(f'{self.calib_split}_dataloader')
            if loader is None:
                raise ValueError(missing_split_message(self.calib_split,
                                                      config_splits(runner.cfg)))
            self.calib_samples = CalibrationSamples(
                loader, runner.cfg.test_dataloader.dataset.pipeline, self.calib_images, self.seed,
                self.calib_split, source=self.calib_source)
            self.calib_source = self.calib_samples.source
            self.calib_images = len(self.calib_samples)
            runner.logger.info(
                f'[mmvq] calibration: {self.calib_images} images of the {self.calib_split} split, '
                f'seed {self.seed} ({self.calib_source}); scope {self.scope}')
            for s in self.searches:
                # stages recording on images of their own (block reconstruction:
                # 1,024 / 256): the same split and seed, so they start with the
                # calibration images
                want = s.wanted_images(self.task)
                if want and want != self.calib_images:
                    own = CalibrationSamples(
                        loader, runner.cfg.test_dataloader.dataset.pipeline, want, self.seed,
                        self.calib_split, source=f'quant.searches {s.name} images')
                    s.use_samples(own)
                    runner.logger.info(f'[mmvq] {s.name}: {len(own)} images of the '
                                       f'{self.calib_split} split ({own.source})')
        self.summary = None

    @property
    def model(self):
        return unwrap(self.runner.model)

    def _calibrate(self, model):
        samples = self.calib_samples
        rank, world = get_rank(), get_world_size()
        bar = progress_bar(len(range(rank, len(samples), world)), 'calibrate')

        def forward(m, batch):
            return self.runner.model.test_step(batch)

        try:
            times = run_calibration(model, samples, forward, self.searches, self.runner.logger,
                                    progress=(lambda p: bar.update(1)) if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        return dict(images=len(samples), images_from=self.calib_source, split=samples.split,
                    seed=samples.seed, image_ids=samples.image_ids(), stage_times=times,
                    searches={s.name: s.report or {} for s in self.searches},
                    search_budgets={s.name: getattr(s, 'budget', None) for s in self.searches})

    def quantize(self):
        """Convert and calibrate the model (or load the quantized checkpoint);
        write ``quant_summary.txt`` and the quantized checkpoint if asked.

        Returns:
            dict: the calibration record of ``results.json``.
        """
        model, logger = self.model, self.runner.logger
        t0 = time.perf_counter()
        if self.load_quantized:
            meta = load_quantized(model, self.load_quantized, self.qcfg)
            record = dict(loaded_from=self.load_quantized, **meta.get('calibration', {}))
        else:
            convert(model, self.qcfg)
            record = self._calibrate(model)
            for s in self.searches:
                line = s.deviations()
                if line:
                    logger.info(line)
        record['wall_time'] = time.perf_counter() - t0
        self.summary = format_summary(model)
        logger.info('[mmvq] quantizers: ' + self.summary.splitlines()[-1])
        if is_main_process():
            atomic_write_text(self.summary + '\n',
                              osp.join(self.runner.work_dir, 'quant_summary.txt'))
        if self.save_quantized and is_main_process():
            save_quantized(model, self.save_quantized, self.qcfg,
                           meta=dict(config=self.config_name,
                                     calibration={k: v for k, v in record.items()
                                                  if k != 'searches'}))
            logger.info(f'[mmvq] quantized checkpoint written to {self.save_quantized}')
        self.calibration = record
        return record

    @property
    def config_name(self):
        return getattr(self.runner.cfg, 'filename', None)

    def report(self, phases, metrics, eval_images, eval_subset=None, repeats=1, profiled=False,
               deploy=None):
        """Write ``results.json`` / ``results.md`` (main process) and log the
        lines a user reads first; returns the results (None off rank 0).

        Args:
            phases (dict[str, PhaseMeter]): ``'fp'`` (optional), ``'quantized'``.
            metrics (dict): ``'fp'`` (or None) and ``'quantized'`` metrics.
            eval_images (int): images evaluated.
            eval_subset (dict | None): the seeded evaluation subset.
            repeats (int): passes per evaluation phase.
            profiled (bool): whether the phases were profiled.
            deploy (dict | None): the exported graphs and their runtime, when
                a phase ran in onnxruntime.
        """
        if not is_main_process():
            return None
        results = build_results(self.model, self.qcfg, phases, metrics, config=self.config_name,
                                checkpoint=self.checkpoint, task=self.task, scope=self.scope,
                                eval_images=eval_images, eval_subset=eval_subset,
                                calibration=self.calibration, repeats=repeats, profiled=profiled,
                                entry=self.entry, deploy=deploy)
        work_dir = self.runner.work_dir
        write_results(work_dir, results, self.summary)
        self.runner.logger.info(f'[mmvq] results written to {work_dir}/results.json and results.md')
        for line in console_lines(results):
            self.runner.logger.info(line)
        return results

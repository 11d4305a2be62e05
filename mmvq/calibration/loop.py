"""``mmvq.PTQLoop``: calibrate on the train split, evaluate FP and quantized.

Selected by ``test_cfg=dict(type='mmvq.PTQLoop', quant=..., ...)`` (what
``tools/ptq.py`` sets), so mmengine's Runner provides checkpoint loading,
``--cfg-options``, work dirs, logging and launchers exactly as in mmdet's
``tools/test.py``.
"""
import contextlib
import copy
import json
import os.path as osp
import time

import torch
from mmengine.dist import get_rank, get_world_size, is_main_process
from mmengine.model import is_model_wrapper
from mmengine.registry import DATASETS
from mmengine.runner.loops import BaseLoop

from ..adapters import model_task
from ..api import (convert, format_summary, iter_quantizers, quant_summary, resolve_scope,
                   validate_plan)
from ..checkpoint import atomic_write_text, file_sha256, load_quantized, save_quantized
from ..registry import LOOPS
from ..quantizers.exact import integer_dtype
from ..utils import collect_env
from ..utils.env import device_report
from ..utils.load import MachineLoad
from ..utils.memory import PeakRSS, release_memory
from ..utils.progress import progress_bar
from ..utils.profiling import profile_to
from .budget import describe_deviations, model_device
from .data import (CalibrationSamples, calib_images_for, config_splits, missing_split_message,
                   spread_subset)
from .driver import run_calibration
from .fpcs import make_search

QCFG_KEYS = {'name', 'scope', 'integer_layernorm', 'residual_stream', 'roles', 'overrides',
             'searches', 'calib'}


def validate_qcfg(qcfg):
    """Raise a one-line error for an unusable quantization block."""
    if not isinstance(qcfg, dict):
        raise ValueError('the config has no `quant` block: add `quant = dict(...)` '
                         '(see configs/_base_/quant/)')
    unknown = set(qcfg) - QCFG_KEYS
    if unknown:
        raise ValueError(f'unknown key(s) {sorted(unknown)} in the quant block; allowed: '
                         f'{sorted(QCFG_KEYS)}')


@LOOPS.register_module()
class PTQLoop(BaseLoop):
    """Post-training quantization test loop.

    Args:
        runner (Runner): the runner.
        dataloader (dict | DataLoader): evaluation dataloader.
        evaluator (dict | list | Evaluator): evaluation metrics.
        quant (dict): quantization block (``roles``, ``scope``, ``searches``,
            ``calib`` ...); see :mod:`mmvq.api`.
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
    """

    def __init__(self, runner, dataloader, evaluator, quant=None, calib_images=None,
                 calib_split=None, seed=None, skip_fp=False, save_quantized=None,
                 load_quantized=None, max_eval_images=None, checkpoint=None, profile=False,
                 eval_repeats=1, calib_dataloader=None):
        validate_qcfg(quant)
        if not isinstance(eval_repeats, int) or eval_repeats < 1:
            raise ValueError(f'--eval-repeats must be a positive integer, got {eval_repeats!r}')
        self.eval_repeats = eval_repeats
        self.qcfg = copy.deepcopy(dict(quant))
        calib = dict(self.qcfg.get('calib', {}))
        self.calib_split = calib_split or calib.get('split', 'train')
        self.seed = seed if seed is not None else calib.get('seed', 0)
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
        self.checkpoint = checkpoint or self.runner.cfg.get('load_from')
        self.save_quantized = save_quantized
        self.load_quantized = load_quantized
        self.searches = [make_search(s) for s in self.qcfg.get('searches', [])]
        # fail fast, before any evaluation: the quantization block must fit the
        # model and the calibration split must hold enough images
        model = self._model()
        self.task = model_task(model)
        self.scope = resolve_scope(model, self.qcfg.get('scope', 'auto'))
        validate_plan(model, self.qcfg)
        self.calib_images, self.calib_source = calib_images_for(self.task, calib_images,
                                                                calib.get('images'))
        self.calib_samples = None
        if not load_quantized:
            loader = calib_dataloader or self.runner.cfg.get(f'{self.calib_split}_dataloader')
            if loader is None:
                raise ValueError(missing_split_message(self.calib_split,
                                                      config_splits(self.runner.cfg)))
            self.calib_samples = CalibrationSamples(loader, self.runner.cfg.test_dataloader.dataset
                                                    .pipeline, self.calib_images, self.seed,
                                                    self.calib_split,
                                                    cap=self.calib_source != '--calib-images')
            self.calib_source = self.calib_samples.describe(self.calib_source)
            self.calib_images = len(self.calib_samples)
            self.runner.logger.info(
                f'[mmvq] calibration: {self.calib_images} images of the {self.calib_split} split, '
                f'seed {self.seed} ({self.calib_source}); scope {self.scope}')

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

    # ------------------------------------------------------------ stages
    def _model(self):
        model = self.runner.model
        return model.module if is_model_wrapper(model) else model

    @torch.no_grad()
    def _evaluate(self, tag):
        self.runner.model.eval()
        self.runner.call_hook('before_test_epoch')
        # one untimed forward first (lazy initialisation, allocator warm-up,
        # cached fake-quantized weights), so FP and quantized timings compare
        # steady state with steady state
        self.runner.model.test_step(next(iter(self.dataloader)))
        release_memory()          # both phases start from the memory they hold, not glibc's leftovers
        bar = progress_bar(len(self.dataloader), f'eval {tag}')
        prof = contextlib.nullcontext()
        if self.profile and is_main_process():
            prof = profile_to(self._model(), osp.join(self.runner.work_dir,
                                                      f'profile_{tag.lower()}.txt'),
                              f'{tag} evaluation, {len(self.dataloader)} batches')
        passes = []
        cuda = model_device(self._model()).type == 'cuda'
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            cuda_start = torch.cuda.memory_allocated()
        with PeakRSS() as mem, MachineLoad() as load, prof:
            t0 = time.perf_counter()
            for idx, data_batch in enumerate(self.dataloader):
                self.runner.call_hook('before_test_iter', batch_idx=idx, data_batch=data_batch)
                outputs = self.runner.model.test_step(data_batch)
                self.evaluator.process(data_samples=outputs, data_batch=data_batch)
                self.runner.call_hook('after_test_iter', batch_idx=idx, data_batch=data_batch,
                                      outputs=outputs)
                if bar is not None:
                    bar.update(1)
            passes.append(time.perf_counter() - t0)
            for _ in range(self.eval_repeats - 1):       # timing only
                t0 = time.perf_counter()
                for data_batch in self.dataloader:
                    self.runner.model.test_step(data_batch)
                passes.append(time.perf_counter() - t0)
            if cuda:
                torch.cuda.synchronize()
        elapsed = min(passes)
        self._passes[tag] = passes
        self._memory[tag] = mem.as_dict()
        self._load[tag] = load.as_dict()
        if load.busy:
            self.runner.logger.warning(
                f'[mmvq] the machine was busy during the {tag} evaluation ({load.describe()}): '
                'its time, and the quantized/FP time ratio, are not reliable; re-run on a quiet '
                'machine to compare times')
        if cuda:
            self._memory[tag].update(cuda_start_mb=round(cuda_start / 2**20, 1),
                                     cuda_peak_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1))
        if bar is not None:
            bar.close()
        metrics = self.evaluator.evaluate(len(self.dataloader.dataset))
        self.runner.call_hook('after_test_epoch', metrics=metrics)
        self.runner.logger.info(f'[mmvq] {tag} evaluation: {len(self.dataloader.dataset)} images '
                                f'in {elapsed:.2f} s')
        return metrics, elapsed

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
        return samples, times

    def run(self):
        self.runner.call_hook('before_test')
        self.runner.logger.info(f'[mmvq] full log (environment, config): {self.runner.log_dir}')
        model = self._model()
        record = dict(fp=None, quantized=None, eval_time={}, calibration={})
        self._memory, self._passes, self._load = {}, {}, {}
        if not self.skip_fp:
            record['fp'], record['eval_time']['fp'] = self._evaluate('FP')
        t0 = time.perf_counter()
        if self.load_quantized:
            meta = load_quantized(model, self.load_quantized, self.qcfg)
            record['calibration'] = dict(loaded_from=self.load_quantized, **meta.get('calibration', {}))
        else:
            convert(model, self.qcfg)
            samples, times = self._calibrate(model)
            record['calibration'] = dict(images=len(samples), images_from=self.calib_source,
                                         split=samples.split, seed=samples.seed,
                                         image_ids=samples.image_ids(), stage_times=times,
                                         searches={s.name: getattr(s, 'report', {})
                                                   for s in self.searches},
                                         search_budgets={s.name: getattr(s, 'budget', None)
                                                         for s in self.searches})
            for s in self.searches:
                line = describe_deviations(s.name, getattr(s, 'budget', {}) or {},
                                           getattr(s, 'PRESETS', {}))
                if line:
                    self.runner.logger.info(line)
        record['calibration']['wall_time'] = time.perf_counter() - t0
        summary = format_summary(model)
        self.runner.logger.info('[mmvq] quantizers: ' + summary.splitlines()[-1])
        if is_main_process():
            atomic_write_text(summary + '\n', osp.join(self.runner.work_dir, 'quant_summary.txt'))
        if self.save_quantized and is_main_process():
            save_quantized(model, self.save_quantized, self.qcfg,
                           meta=dict(config=self._config_name(),
                                     calibration={k: v for k, v in record['calibration'].items()
                                                  if k != 'searches'}))
            self.runner.logger.info(f'[mmvq] quantized checkpoint written to {self.save_quantized}')
        record['quantized'], record['eval_time']['quantized'] = self._evaluate('quantized')
        if is_main_process():
            results = self._write_results(record, summary, model)
            for line in self._console_summary(results):
                self.runner.logger.info(line)
        self.runner.call_hook('after_test')
        return record['quantized']

    # ----------------------------------------------------------- results
    def _config_name(self):
        return getattr(self.runner.cfg, 'filename', None)

    def _write_results(self, record, summary, model):
        work_dir = self.runner.work_dir
        ckpt = self.checkpoint
        n_eval = len(self.dataloader.dataset)
        fp, q = record['fp'] or {}, record['quantized'] or {}
        delta = {k: q[k] - fp[k] for k in q if k in fp and isinstance(q[k], (int, float))}
        device = model_device(model)
        times = record['eval_time']
        ratio = times['quantized'] / times['fp'] if times.get('fp') else None
        # a ratio taken while other processes used the CPUs measures them
        reliable = not any(load.get('busy') for load in self._load.values())
        kinds = {}
        for row in quant_summary(model):
            kinds.setdefault(row['kind'], set()).add(row['bits'])
        results = dict(
            config=self._config_name(), checkpoint=ckpt,
            checkpoint_sha256=file_sha256(ckpt) if ckpt and osp.isfile(ckpt) else None,
            method=self.qcfg.get('name', 'unnamed'),
            bits={k: sorted(v) for k, v in kinds.items()},
            quant=self.qcfg, task=self.task, scope=self.scope,
            metrics=dict(fp=fp or None, quantized=q, delta=delta or None),
            eval_images=n_eval, eval_subset=self.eval_subset,
            eval_time=dict(total=record['eval_time'],
                           per_image={k: v / max(1, n_eval) for k, v in record['eval_time'].items()},
                           quantized_vs_fp=ratio, reliable=reliable,
                           repeats=self.eval_repeats,
                           passes={k.lower(): v for k, v in self._passes.items()},
                           load={k.lower(): v for k, v in self._load.items()}),
            calibration=record['calibration'], profiled=self.profile,
            device=dict(device_report(device),
                        integer_dtype=str(integer_dtype(device)).replace('torch.', '')),
            memory={k.lower(): v for k, v in self._memory.items()},
            num_quantizers=len(list(iter_quantizers(model))),
            versions=dict(collect_env()), rank=get_rank())
        atomic_write_text(json.dumps(results, indent=2, default=str) + '\n',
                          osp.join(work_dir, 'results.json'))
        atomic_write_text(self._markdown(results, summary), osp.join(work_dir, 'results.md'))
        self.runner.logger.info(f'[mmvq] results written to {work_dir}/results.json and results.md')
        return results

    @staticmethod
    def _console_summary(r):
        """The lines a user reads first: metrics FP -> quantized, time ratio."""
        m = r['metrics']
        fp, q = m['fp'] or {}, m['quantized'] or {}
        lines = []
        for k, v in q.items():
            if isinstance(v, (int, float)):
                lines.append(f'[mmvq] {k}: ' + (f'FP {fp[k]:.4g} -> quantized {v:.4g} '
                                                 f'({v - fp[k]:+.4g})' if k in fp else
                                                 f'quantized {v:.4g}'))
        t = r['eval_time']
        if t['quantized_vs_fp'] is not None:
            lines.append(f'[mmvq] evaluation time per image: quantized {t["quantized_vs_fp"]:.2f}x FP'
                         + ('' if t['reliable'] else ' (timed on a busy machine: not reliable)'))
        return lines

    @staticmethod
    def _markdown(r, summary):
        m = r['metrics']
        fp, q, d = m['fp'] or {}, m['quantized'], m['delta'] or {}
        lines = [f'# mmvq PTQ results: {r["method"]}', '',
                 f'- config: `{r["config"]}`', f'- checkpoint: `{r["checkpoint"]}` '
                 f'(sha256 `{r["checkpoint_sha256"]}`)',
                 f'- scope: {r["scope"]}; quantizers: {r["num_quantizers"]} '
                 f'({", ".join(f"{k} " + "/".join(map(str, v)) + "-bit" for k, v in r["bits"].items())})',
                 f'- calibration: {r["calibration"].get("images", "loaded")} image(s) of the '
                 f'{r["calibration"].get("split", "-")} split, seed {r["calibration"].get("seed", "-")}, '
                 f'{r["calibration"]["wall_time"]:.1f} s',
                 f'- evaluation: {r["eval_images"]} images; per image FP '
                 f'{r["eval_time"]["per_image"].get("fp", float("nan")):.3f} s, quantized '
                 f'{r["eval_time"]["per_image"]["quantized"]:.3f} s'
                 + ('' if r['eval_time']['quantized_vs_fp'] is None else
                    f' ({r["eval_time"]["quantized_vs_fp"]:.2f}x FP'
                    + ('' if r['eval_time']['reliable'] else ', timed on a busy machine') + ')'),
                 '',
                 '| metric | FP | quantized | delta |', '|---|---|---|---|']
        for k, v in q.items():
            if isinstance(v, (int, float)):
                fpv = fp.get(k)
                lines.append(f'| {k} | {"-" if fpv is None else f"{fpv:.4f}"} | {v:.4f} | '
                             f'{"-" if k not in d else f"{d[k]:+.4f}"} |')
        lines += ['', f'versions: torch {r["versions"]["PyTorch"]}, mmcv {r["versions"]["mmcv"]}, '
                  f'mmdet {r["versions"]["mmdet"]}, mmpretrain {r["versions"]["mmpretrain"]}, '
                  f'mmvq {r["versions"]["mmvq"]}', '']
        return '\n'.join(lines)

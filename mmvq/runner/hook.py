"""``mmvq.PTQHook``: quantize inside a user's own ``tools/test.py``.

With ``custom_hooks = [dict(type='mmvq.PTQHook')]`` (and
``custom_imports = dict(imports=['mmvq'])``, which every mmvq quantization
block sets) mmdet's and mmpretrain's own test scripts — or ``mim test`` —
convert and calibrate the model after its checkpoint is loaded and before the
test epoch, then evaluate the *quantized* model with the config's metric.
The hook writes what ``tools/ptq.py`` writes (``quant_summary.txt``,
``results.json``, ``results.md``; no FP phase), through the same
:class:`~mmvq.runner.session.PTQSession`, so the two give the same quantizer
parameters and metrics for the same seed. ``configs/_base_/quant/hook/``
holds every block in this form.
"""
import copy

from mmengine.hooks import Hook

from ..modules.base import module_device
from ..registry import HOOKS
from ..schema import validate_qcfg
from .report import PhaseMeter
from .session import PTQSession


@HOOKS.register_module()
class PTQHook(Hook):
    """Post-training quantization as a test-time hook.

    Args:
        quant (dict | None): the quantization block (:mod:`mmvq.schema`);
            default the config's ``quant``.
        calib (dict | None): overrides of the block's ``calib`` (``images``,
            ``split``, ``seed`` ...).
        save_quantized (str | None): write the quantized checkpoint here.
        load_quantized (str | None): load this quantized checkpoint instead of
            calibrating.
    """

    priority = 'VERY_HIGH'        # quantized before any other hook sees the model

    def __init__(self, quant=None, calib=None, save_quantized=None, load_quantized=None):
        if quant is not None:
            validate_qcfg(quant)
        self.quant = copy.deepcopy(quant)
        self.calib = dict(calib or {})
        self.save_quantized = save_quantized
        self.load_quantized = load_quantized
        self.session = None

    def _block(self, runner):
        quant = self.quant if self.quant is not None else runner.cfg.get('quant')
        if hasattr(quant, 'to_dict'):
            quant = quant.to_dict()
        validate_qcfg(quant)
        quant = copy.deepcopy(dict(quant))
        if self.calib:
            quant['calib'] = dict(quant.get('calib') or {}, **self.calib)
            validate_qcfg(quant)
        return quant

    def before_test(self, runner):
        from .loop import PTQLoop
        if isinstance(runner.test_loop, PTQLoop):
            raise ValueError('mmvq.PTQHook with test_cfg=mmvq.PTQLoop would quantize twice: '
                             'use tools/ptq.py (the loop) or your tools/test.py (the hook)')
        self.session = PTQSession(runner, self._block(runner), save_quantized=self.save_quantized,
                                  load_quantized=self.load_quantized, entry='PTQHook')
        self.session.quantize()
        runner.model.eval()

    def before_test_epoch(self, runner):
        if self.session is None:
            return
        self._batches = len(runner.test_loop.dataloader)
        self._meter = PhaseMeter(module_device(self.session.model)).__enter__()

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if self.session is not None and batch_idx == self._batches - 1:
            self._meter.lap()
            self._meter.__exit__(None, None, None)

    def after_test_epoch(self, runner, metrics=None):
        if self.session is None:
            return
        meter = self._meter
        if not meter.passes:             # an empty or interrupted epoch
            meter.lap()
            meter.__exit__(None, None, None)
        if meter.busy:
            runner.logger.warning(f'[mmvq] the machine was busy during the quantized evaluation '
                                  f'({meter.describe_load()}): its time is not reliable')
        runner.logger.info(f'[mmvq] quantized evaluation: '
                           f'{len(runner.test_loop.dataloader.dataset)} images in '
                           f'{meter.elapsed:.2f} s')
        self.session.report(dict(quantized=meter), dict(fp=None, quantized=dict(metrics or {})),
                            len(runner.test_loop.dataloader.dataset))

"""Registries of mmvq.

mmvq follows the layout of OpenMMLab plugin projects (mmdet ``projects/``,
mmyolo): the registries below are *children* of mmengine's root registries, so
a config whose default scope is ``mmdet`` or ``mmpretrain`` reaches mmvq types
as ``mmvq.Name`` (``test_cfg=dict(type='mmvq.PTQLoop')``,
``custom_hooks=[dict(type='mmvq.PTQHook')]``).

``QUANTIZERS`` is mmvq's own root registry: quantizers are pure tensor math and
are built from quantization configs, never from a model config. ``SEARCHES``
(calibration search stages: ``fpcs``, ``igq_allocation``) likewise, from
``quant.searches``.

``QUANT_WRAPPERS`` maps an original module class (``nn.Linear``,
``nn.LayerNorm``, mmdet's ``WindowMSA`` ...) to the quantized wrapper class that
replaces it in place, as NVIDIA ModelOpt's ``QuantModuleRegistry`` does.
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import LOOPS as MMENGINE_LOOPS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import Registry

LOOPS = Registry('loop', parent=MMENGINE_LOOPS, locations=['mmvq.runner'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, locations=['mmvq.runner'])
MODEL_WRAPPERS = Registry('model_wrapper', parent=MMENGINE_MODEL_WRAPPERS,
                          locations=['mmvq.runner'])
QUANTIZERS = Registry('quantizer', scope='mmvq', locations=['mmvq.quantizers'])
SEARCHES = Registry('search', scope='mmvq', locations=['mmvq.calibration'])


class WrapperRegistry:
    """Map original module classes to their quantized wrapper classes.

    Lookup walks the MRO of the module's class, so a subclass of a registered
    class is wrapped too unless it is registered itself.
    """

    def __init__(self):
        self._map = {}

    def register(self, *float_classes):
        """Class decorator: ``@QUANT_WRAPPERS.register(nn.Linear)``."""

        def _wrap(qcls):
            for fcls in float_classes:
                if fcls in self._map and self._map[fcls] is not qcls:
                    raise KeyError(f'{fcls.__name__} already maps to '
                                   f'{self._map[fcls].__name__}')
                self._map[fcls] = qcls
            return qcls

        return _wrap

    def get(self, float_class):
        for klass in float_class.__mro__:
            if klass in self._map:
                return self._map[klass]
        return None

    def __contains__(self, float_class):
        return self.get(float_class) is not None

    def items(self):
        return list(self._map.items())


QUANT_WRAPPERS = WrapperRegistry()

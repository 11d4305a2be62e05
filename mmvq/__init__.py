"""mmvq: post-training quantization of vision transformers for OpenMMLab.

Importing the package registers every quantizer (``QUANTIZERS``), wrapper
(``QUANT_WRAPPERS``), adapter and loop/hook (children of mmengine's registries).
"""
from . import adapters, calibration, modules, quantizers, utils  # noqa: F401
from .api import (calibrate, convert, enable_quantizers, finish_calibration, format_summary,
                  iter_quantizers, plan, quant_summary, quantize, set_quant_mode)
from .registry import HOOKS, LOOPS, MODELS, QUANT_WRAPPERS, QUANTIZERS
from .version import __version__

__all__ = ['__version__', 'convert', 'calibrate', 'quantize', 'plan', 'set_quant_mode',
           'enable_quantizers', 'finish_calibration', 'iter_quantizers', 'quant_summary',
           'format_summary', 'QUANTIZERS', 'QUANT_WRAPPERS', 'MODELS', 'LOOPS', 'HOOKS']

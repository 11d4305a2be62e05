"""mmvq: post-training quantization of vision transformers for OpenMMLab.

Importing the package registers every quantizer (``QUANTIZERS``), wrapper
(``QUANT_WRAPPERS``), adapter, search stage (``SEARCHES``) and the loop, hook
and model wrapper (children of mmengine's registries), and the ``mmvq::`` config
scope (``utils.register_config_scope``).
"""
from . import adapters, calibration, deploy, modules, quantizers, runner, utils  # noqa: F401
from .api import (calibrate, convert, enable_quantizers, finish_calibration, format_summary,
                  iter_quantizers, plan, quant_state, quant_summary, quantize, set_quant_mode)
from .deploy import export_onnx
from .registry import HOOKS, LOOPS, QUANT_WRAPPERS, QUANTIZERS, SEARCHES
from .runner import PTQHook, PTQLoop
from .version import __version__

utils.register_config_scope()

__all__ = ['__version__', 'convert', 'calibrate', 'quantize', 'plan', 'quant_state',
           'set_quant_mode',
           'enable_quantizers', 'finish_calibration', 'iter_quantizers', 'quant_summary',
           'format_summary', 'export_onnx', 'PTQLoop', 'PTQHook', 'QUANTIZERS', 'QUANT_WRAPPERS', 'SEARCHES',
           'LOOPS', 'HOOKS']

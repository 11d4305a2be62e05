"""Quantizer modes: iterate a converted model's quantizers, switch them
between ``'float'``, ``'calib'`` and ``'quant'``, enable them by name."""
import contextlib
import fnmatch

from .quantizers.base import BaseQuantizer


def iter_quantizers(model):
    """Yield ``(qualified_name, quantizer)`` for every quantizer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, BaseQuantizer):
            yield name, module


def set_quant_mode(model, mode):
    """Put every quantizer of ``model`` in ``'float'``, ``'calib'`` or ``'quant'``.

    Entering ``'quant'`` also reads, once, the few host values the quantized
    forward needs (calibrated flags, LIS logit scales, AdaLog folding, zero
    LayerNorm weights), so that evaluation makes no device synchronisation.
    """
    for _, q in iter_quantizers(model):
        q.set_mode(mode)
    if mode == 'quant':
        for module in model.modules():
            prime = getattr(module, 'mmvq_prime', None)
            if callable(prime):
                prime()
    return model


def enable_quantizers(model, enabled=True, pattern='*'):
    """Enable/disable quantizers whose qualified name matches ``pattern``."""
    for name, q in iter_quantizers(model):
        if fnmatch.fnmatch(name, pattern):
            q.enabled = enabled
    return model


@contextlib.contextmanager
def fused_quantizers(model, fused=True):
    """Within the block every quantizer of ``model`` runs its fused kernel
    (``True``, where one applies) or its eager code (``False``); the
    previous flags are restored after."""
    before = [(q, q.fused) for _, q in iter_quantizers(model)]
    for q, _ in before:
        q.fused = bool(fused)
    try:
        yield model
    finally:
        for q, flag in before:
            q.fused = flag

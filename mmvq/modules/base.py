"""In-place conversion of float modules to quantized wrappers.

A wrapper is a mixin class whose ``forward`` replaces the float module's; the
float module's class is swapped for ``type(Name, (Wrapper, FloatClass), {})``
so the module keeps its parameters, buffers, hooks and ``state_dict`` names
(``fc.weight`` stays ``fc.weight``) and ``isinstance(m, nn.Linear)`` still
holds — the approach of NVIDIA ModelOpt's quant module registry. Quantizers
are added as child modules (``fc.input_quantizer.scale`` ...).

Each wrapper declares *slots* (``input``, ``weight`` ...) and the converter
passes, for each slot, a quantizer config or ``None`` (identity).
"""
import weakref

import torch
import torch.nn as nn

from ..registry import QUANTIZERS

_DYNAMIC = {}


def build_quantizer(cfg):
    """Build a quantizer from a config dict; ``None`` gives ``None``."""
    if cfg is None:
        return None
    cfg = dict(cfg)
    cfg.pop('_scope_', None)   # added by mmengine to dicts of a base inherited by scope
    qtype = cfg.pop('type', None)
    qcls = QUANTIZERS.get(qtype) if isinstance(qtype, str) else qtype
    if qcls is None:
        raise KeyError(f'unknown quantizer type {qtype!r}; registered: '
                       f'{", ".join(sorted(QUANTIZERS.module_dict))}')
    return qcls(**cfg)


class QuantModuleMixin:
    """Behaviour shared by all quantized wrappers.

    Subclasses list their quantizer slots in ``slots`` and implement
    ``forward``; ``quant_setup`` is called once after the class swap.
    """

    slots = ()

    def quant_setup(self, slot_cfgs, **kwargs):
        """Create the quantizers of every slot (missing/None -> identity), on
        the device of the module's own parameters/buffers."""
        unknown = set(slot_cfgs) - set(self.slots)
        if unknown:
            raise KeyError(f'{type(self).__name__} has no quantizer slot(s) {sorted(unknown)}; '
                           f'slots: {list(self.slots)}')
        with torch.device(module_device(self)):
            for slot in self.slots:
                q = build_quantizer(slot_cfgs.get(slot))
                setattr(self, f'{slot}_quantizer', q if q is not None else nn.Identity())

    def quantized_weight(self):
        """``weight_quantizer(self.weight)``, from cached integer codes in inference.

        Weights and weight-quantizer parameters are constant between calls in
        evaluation, so the weight's integer codes are computed once — held in
        8 bits, a quarter of a float copy — and each call dequantizes them,
        ``(c - z) s``: bit for bit the fake-quantized weight (``c - z`` is
        the same integer the fake quantizer multiplies by ``s``), for one
        pass over the weight. The codes are recomputed when the weight or any
        quantizer buffer changes (object, in-place version, device/dtype) or
        the quantizer's ``enabled`` flag changes; outside ``quant`` mode, with
        autograd on, or for a weight quantizer without integer codes nothing
        is cached. The cache is a plain attribute, never in ``state_dict``.
        """
        wq, w = self.weight_quantizer, self.weight
        if (torch.is_grad_enabled() or isinstance(wq, nn.Identity) or wq.mode != 'quant'
                or not wq.enabled or not getattr(wq, 'affine', False)):
            return wq(w)
        key = (id(w), w._version, w.dtype, w.device,
               tuple((id(b), b._version) for b in wq.buffers()))
        cache = self.__dict__.get('_mmvq_wq_cache')
        if cache is None or cache[0] != key or cache[1]() is not w:
            cache = (key, weakref.ref(w), wq.codes(w))
            self.__dict__['_mmvq_wq_cache'] = cache
        return wq.dequantize(cache[2], w.dtype)

    def quantizers(self):
        """Yield ``(slot, quantizer)`` for every non-identity slot."""
        for slot in self.slots:
            q = getattr(self, f'{slot}_quantizer', None)
            if q is not None and not isinstance(q, nn.Identity):
                yield slot, q

    def own_quantizers(self):
        """The quantizers this module holds itself, not through wrapped
        children (a row each in summaries and sensitivity tables); for most
        wrappers all of :meth:`quantizers`."""
        return self.quantizers()


def module_device(module):
    """Device of a module's first parameter or buffer; a module holding
    neither (a softmax, an attention matmul) gets the current default device,
    which the converter sets to the device of the module that owns it."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.get_default_device()


def swap_class(module, wrapper_cls):
    """Make ``module`` an instance of ``wrapper_cls`` mixed into its class."""
    base = type(module)
    if issubclass(base, wrapper_cls):
        return module
    key = (wrapper_cls, base)
    if key not in _DYNAMIC:
        name = wrapper_cls.__name__
        _DYNAMIC[key] = type(name, (wrapper_cls, base), {'__module__': wrapper_cls.__module__,
                                                           '_float_class': base})
    module.__class__ = _DYNAMIC[key]
    return module


def float_class(module):
    """The original class of a converted module (or its own class)."""
    return getattr(type(module), '_float_class', type(module))

"""Reconstruction units: the backbone's blocks (the adapter's) and the
modules outside the backbone a forward calls, each holding a weight
quantizer whose rounding can be learned."""
import torch

from ....adapters import split_backbone
from ....modes import set_quant_mode
from ....quantizers.base import BaseQuantizer
from .learn import treatment_of


def has_learnable_weight(unit):
    """Whether ``unit`` holds an enabled weight quantizer whose rounding can be learned."""
    return any(isinstance(q, BaseQuantizer) and q.enabled and treatment_of(q).weight is not None
               for q in (getattr(m, 'weight_quantizer', None) for m in unit.modules()))


def find_units(model):
    """``(name, module, kind)`` of the backbone's units, in forward order:
    patch embedding, blocks, patch merging (the adapter's
    :meth:`~mmvq.adapters.base.BaseAdapter.blocks`) holding a uniform weight
    quantizer; the units outside the backbone are :func:`outer_units`."""
    from ....adapters import find_adapter
    prefix, backbone = split_backbone(model)
    try:
        adapter = find_adapter(backbone)
    except Exception:  # noqa: BLE001 - a backbone no adapter knows: no units
        return []
    units = [(n, m, k) for n, m, k in adapter.blocks(backbone, prefix) if has_learnable_weight(m)]
    return units


def outer_units(model, samples, forward_fn):
    """The outermost modules outside the backbone that a forward calls and
    that hold a uniform weight quantizer (a classifier's head; a detector's
    neck, RPN head, RoI box/mask heads), in call order.

    Found by one float forward on the first image with hooks on every
    candidate; a module reached only through a method other than
    ``__call__`` (mmdet's RoI head) is replaced by its called children.
    """
    if samples is None or forward_fn is None or len(samples) == 0:
        return []
    skip = {'backbone', 'data_preprocessor'}
    cands = [(n, m) for n, m in model.named_modules()
             if n and n.split('.')[0] not in skip and has_learnable_weight(m)]
    order, handles = [], []
    for n, m in cands:
        handles.append(m.register_forward_pre_hook(
            lambda mod, args, n=n: order.append(n) if n not in order else None))
    set_quant_mode(model, 'float')
    try:
        with torch.no_grad():
            forward_fn(model, samples[0])
    finally:
        for h in handles:
            h.remove()
        set_quant_mode(model, 'calib')
    units = []
    for n in order:
        if any(n.startswith(u + '.') for u, _, _ in units):
            continue
        units.append((n, model.get_submodule(n), 'neck' if n.split('.')[0] == 'neck' else 'head'))
    return units


__all__ = ['find_units', 'outer_units', 'has_learnable_weight']

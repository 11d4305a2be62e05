"""Backbone adapters (one file per backbone family)."""
from .base import (ADAPTERS, BaseAdapter, Site, generic_sites, model_task, register_adapter,
                   split_backbone)
from .swin import QuantWindowMSA, SwinAdapter
from .vit import QuantMultiheadAttention, ViTAdapter


def find_adapter(backbone):
    """The adapter handling ``backbone`` or a one-line error listing support."""
    for adapter in ADAPTERS:
        if adapter.matches(backbone):
            return adapter
    supported = [s for a in ADAPTERS for s in a.supported]
    raise TypeError(f'backbone {type(backbone).__module__}.{type(backbone).__name__} is not '
                    f'supported by mmvq; supported: {", ".join(supported)}')


__all__ = ['ADAPTERS', 'BaseAdapter', 'Site', 'generic_sites', 'model_task', 'register_adapter',
           'split_backbone',
           'find_adapter', 'SwinAdapter', 'ViTAdapter', 'QuantWindowMSA',
           'QuantMultiheadAttention']

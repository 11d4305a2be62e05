"""Shared pieces of the attention wrappers (matmuls + softmax as modules).

The backbone-specific wrappers (mmdet's ``WindowMSA``, mmpretrain's
``MultiheadAttention``) mix this in from :mod:`mmvq.adapters`.
"""
import torch
import torch.nn as nn

from .base import QuantModuleMixin, build_quantizer, module_device, swap_class
from .matmul import QuantMatMul
from .softmax import QuantSoftmax


class QuantAttentionMixin(QuantModuleMixin):
    """Gives an attention module ``matmul1`` (q @ k^T), ``softmax`` and
    ``matmul2`` (attn @ v) child modules carrying its quantizers.

    Slots: ``q``, ``k`` (matmul1 operands), ``logits`` and ``lis`` (the
    softmax's logits quantizer and optional Log-Int-Softmax), ``probs`` and
    ``v`` (matmul2 operands).
    """

    slots = ('q', 'k', 'logits', 'lis', 'probs', 'v')
    # slots whose quantizers the wrapper holds itself (``<slot>_quantizer``),
    # not its matmul / softmax children; ``extra_roles`` maps them to roles
    own_slots = ()
    extra_roles = {}

    def quant_setup(self, slot_cfgs, **kwargs):
        unknown = set(slot_cfgs) - set(self.slots) - set(self.own_slots)
        if unknown:
            raise KeyError(f'{type(self).__name__} has no quantizer slot(s) {sorted(unknown)}')
        with torch.device(module_device(self)):
            self._build_children(slot_cfgs)
            for slot in self.own_slots:
                q = build_quantizer(slot_cfgs.get(slot))
                setattr(self, f'{slot}_quantizer', q if q is not None else nn.Identity())

    def _build_children(self, slot_cfgs):
        self.matmul1 = QuantMatMul(dict(a=slot_cfgs.get('q'), b=slot_cfgs.get('k')))
        self.matmul2 = QuantMatMul(dict(a=slot_cfgs.get('probs'), b=slot_cfgs.get('v')))
        softmax = getattr(self, 'softmax', None)
        if not isinstance(softmax, nn.Softmax):
            softmax = nn.Softmax(dim=-1)
        self.softmax = swap_class(softmax, QuantSoftmax)
        self.softmax.quant_setup(dict(input=slot_cfgs.get('logits'), lis=slot_cfgs.get('lis')))

    def quantizers(self):
        for prefix, mod in (('matmul1', self.matmul1), ('softmax', self.softmax),
                            ('matmul2', self.matmul2)):
            for slot, q in mod.quantizers():
                yield f'{prefix}.{slot}', q
        yield from self.own_quantizers()

    def own_quantizers(self):
        """``(slot, quantizer)`` of the :attr:`own_slots` that are set (the
        matmul / softmax children list theirs themselves)."""
        for slot in self.own_slots:
            q = getattr(self, f'{slot}_quantizer', None)
            if q is not None and not isinstance(q, nn.Identity):
                yield slot, q

    def any_quantizer_active(self):
        """Whether the explicit (matmul, softmax, matmul) path must run: some
        quantizer is active, or :attr:`force_explicit` is set (activation
        capture with every quantizer off still needs the matmul inputs)."""
        return self.force_explicit or any(q.enabled and q.mode != 'float' for _, q in self.quantizers())

    force_explicit = False

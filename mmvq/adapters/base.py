"""Adapters: find the quantizable sites of a supported backbone.

An adapter knows one backbone family. It walks the model and yields
:class:`Site` records — a module, the wrapper class it becomes, and the *role*
of each quantizer slot (``qkv_input``, ``fc2_input``, ``attn_probs`` ...).
The converter (:mod:`mmvq.conversion`) turns roles into quantizer configs from the
user's quantization config, so methods are expressed per role, never per
model. Adding a backbone is one adapter file registered in ``ADAPTERS``.
"""
import importlib
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch.nn as nn
from mmcv.cnn.bricks.transformer import FFN

from ..registry import QUANT_WRAPPERS
from .residual import QuantResidualBlock

ADAPTERS = []

# slots of an attention wrapper and their roles: q @ k^T operands, the logits
# before softmax, the (LIS) softmax itself, the probabilities and V of attn @ V
ATTENTION_ROLES = dict(q='q', k='k', logits='attn_logits', lis='softmax',
                       probs='attn_probs', v='v')


def register_adapter(cls):
    ADAPTERS.append(cls())
    return cls


@dataclass
class Site:
    """One module to convert.

    Attributes:
        name (str): qualified module name in the model.
        module (nn.Module): the float module.
        wrapper (type): quantized wrapper class.
        roles (dict): slot -> role name (``None``: slot left float).
        hints (dict): slot -> extra quantizer kwargs applied when the
            resolved quantizer type accepts them (e.g. PTF ``tied_channels``).
        kwargs (dict): extra ``quant_setup`` arguments.
        optional (bool): convert only when some slot gets a quantizer.
        option (str | None): convert only when the quantization config sets
            this key (e.g. ``residual_stream``).
    """
    name: str
    module: nn.Module
    wrapper: type
    roles: Dict[str, Optional[str]]
    hints: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    kwargs: Dict[str, Any] = field(default_factory=dict)
    optional: bool = False
    option: Optional[str] = None


def linear_site(name, module, input_role, output_role='linear_output'):
    return Site(name, module, QUANT_WRAPPERS.get(type(module)),
                dict(input=input_role, weight='linear_weight', output=output_role))


def conv_site(name, module, input_role='conv_input', output_role='conv_output'):
    return Site(name, module, QUANT_WRAPPERS.get(type(module)),
                dict(input=input_role, weight='conv_weight', output=output_role))


def layernorm_site(name, module, tied_channels=1):
    hints = {'input': dict(tied_channels=tied_channels)} if tied_channels > 1 else {}
    return Site(name, module, QUANT_WRAPPERS.get(type(module)),
                dict(input='ln_input', output='ln_output'), hints=hints)


class BaseAdapter:
    """Walk a backbone and yield its sites.

    Subclasses set ``backbones`` (classes handled), ``attention`` (float
    attention class -> wrapper class), ``patch_merging`` (classes whose
    LayerNorm input is an ``nn.Unfold`` of 4 positions per channel) and
    ``residual_blocks`` (block class -> names of its two LayerNorms; see
    :mod:`mmvq.adapters.residual`).

    Output roles: ``qkv_output`` / ``proj_output`` (attention Linears),
    ``fc2_output`` (the FFN's last Linear), ``patch_embed_output`` (the
    patch-embedding convolution when no LayerNorm follows it; with one, the
    LayerNorm's input role covers that tensor); float unless configured.
    """

    name = 'base'
    backbones = ()
    attention = {}
    patch_merging = ()
    residual_blocks = {}

    def matches(self, module):
        return isinstance(module, self.backbones) if self.backbones else False

    def sites(self, backbone, prefix):
        taken = set()
        for name, module in backbone.named_modules(prefix=prefix):
            if name in taken:
                continue
            for att_cls, wrapper in self.attention.items():
                if isinstance(module, att_cls):
                    yield Site(name, module, wrapper,
                               dict(ATTENTION_ROLES, **getattr(wrapper, 'extra_roles', {})),
                               hints={'probs': dict(unit='row')})
                    for sub in ('qkv', 'proj'):
                        child = getattr(module, sub, None)
                        if isinstance(child, nn.Linear):
                            taken.add(f'{name}.{sub}')
                            yield linear_site(f'{name}.{sub}', child, f'{sub}_input',
                                              f'{sub}_output')
                    taken.add(f'{name}.softmax')
                    break
            else:
                if isinstance(module, FFN):
                    linears = [(n, m) for n, m in module.named_modules(prefix=name)
                               if isinstance(m, nn.Linear)]
                    for i, (n, m) in enumerate(linears):
                        taken.add(n)
                        yield (linear_site(n, m, 'fc1_input') if i == 0 else
                               linear_site(n, m, 'fc2_input', 'fc2_output'))
                elif isinstance(module, self.patch_merging):
                    for sub, child in module.named_children():
                        full = f'{name}.{sub}'
                        if isinstance(child, nn.LayerNorm):
                            taken.add(full)
                            yield layernorm_site(full, child, tied_channels=4)
                        elif isinstance(child, nn.Linear):
                            taken.add(full)
                            yield linear_site(full, child, 'reduction_input')
                elif isinstance(module, nn.LayerNorm):
                    yield layernorm_site(name, module)
                elif isinstance(module, nn.Conv2d):
                    if 'patch_embed' in name:
                        parent = backbone.get_submodule(name[len(prefix) + 1 if prefix else 0:]
                                                        .rpartition('.')[0])
                        normed = isinstance(getattr(parent, 'norm', None), nn.LayerNorm)
                        yield conv_site(name, module, 'patch_embed_input',
                                        'conv_output' if normed else 'patch_embed_output')
                    else:
                        yield conv_site(name, module)
                elif isinstance(module, nn.Linear):
                    yield linear_site(name, module, 'linear_input')
                for block_cls, norms in self.residual_blocks.items():
                    if isinstance(module, block_cls):
                        yield Site(name, module, QuantResidualBlock, {},
                                   kwargs=dict(norms=norms), option='residual_stream')

    def blocks(self, backbone, prefix):
        """Yield ``(name, module, kind)`` of the units block reconstruction
        optimises (:mod:`mmvq.calibration.searches.recon`), in forward order: the patch
        embedding (``'patch_embed'``), every residual block (``'block'``) and
        every patch merging (``'merging'``), none inside another."""
        block_types = tuple(self.residual_blocks) + tuple(self.patch_merging)
        taken = []
        for name, module in backbone.named_modules(prefix=prefix):
            if any(name.startswith(t + '.') for t in taken):
                continue
            rel = name[len(prefix) + 1:] if prefix else name
            if rel == 'patch_embed':
                kind = 'patch_embed'
            elif self.patch_merging and isinstance(module, tuple(self.patch_merging)):
                kind = 'merging'
            elif block_types and isinstance(module, block_types):
                kind = 'block'
            else:
                continue
            taken.append(name)
            yield name, module, kind


TASKS = (('mmpretrain.models.classifiers', 'BaseClassifier', 'classification'),
         ('mmdet.models.detectors', 'BaseDetector', 'detection'))


def model_task(model):
    """``'classification'`` (mmpretrain classifier), ``'detection'`` (mmdet
    detector) or ``None`` (anything else: a bare backbone, a custom model)."""
    for module_name, class_name, task in TASKS:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except Exception:  # noqa: BLE001 - either library is optional
            continue
        if isinstance(model, cls):
            return task
    return None


def _logit_layers(model):
    """Names of the classifier head's Linears that produce class scores."""
    head = getattr(model, 'head', None)
    classes = getattr(head, 'num_classes', None)
    if not isinstance(head, nn.Module) or classes is None:
        return set()
    return {f'head.{n}' for n, m in head.named_modules()
            if isinstance(m, nn.Linear) and m.out_features == classes}


def split_backbone(model):
    """``(prefix, backbone)``: ``('backbone', model.backbone)`` for an mmdet /
    mmpretrain model with a backbone module, else ``('', model)`` (a bare
    backbone). The one place mmvq decides what "the backbone" is."""
    backbone = getattr(model, 'backbone', None)
    if isinstance(backbone, nn.Module):
        return 'backbone', backbone
    return '', model


def _reads_final_layernorm(model):
    """Whether the classifier's head reads the backbone's final LayerNorm at the
    class token directly (mmpretrain ViT/DeiT: ``out_type='cls_token'``,
    ``final_norm``, no neck)."""
    backbone = getattr(model, 'backbone', None)
    return (getattr(backbone, 'out_type', None) == 'cls_token'
            and bool(getattr(backbone, 'final_norm', False))
            and getattr(model, 'neck', None) is None)


def generic_sites(model, prefix, skip_prefixes):
    """Every Conv2d/Linear outside the backbone (scope ``'model'``).

    Linears under a ``head`` take role ``head_input``; in a classifier, the
    head Linears that produce the class scores have the output role
    ``logits`` (FQ-ViT's ``act_out``; float unless a block sets it). The
    first head Linear of a ViT that reads the final LayerNorm's class token
    takes ``cls_head_input`` (falls back to ``head_input``; FQ-ViT leaves it
    to the LayerNorm's output quantizer, ``qact2``).
    ``nn.ConvTranspose2d`` (mask upsampling) is not a ``Conv2d`` and stays
    float, as in the public detection pipelines (RepQ-ViT, APHQ-ViT).
    """
    is_cls = model_task(model) == 'classification'
    logits = _logit_layers(model) if is_cls else set()
    cls_head = is_cls and _reads_final_layernorm(model)
    for name, module in model.named_modules(prefix=prefix):
        if any(name == p or name.startswith(p + '.') for p in skip_prefixes):
            continue
        if isinstance(module, nn.Conv2d):
            yield conv_site(name, module)
        elif isinstance(module, nn.Linear):
            role = 'head_input' if 'head' in name else 'linear_input'
            if cls_head and role == 'head_input':
                role, cls_head = 'cls_head_input', False
            yield linear_site(name, module, role,
                              'logits' if name in logits else 'linear_output')

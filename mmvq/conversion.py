"""Conversion: the plan of a quantization block for a model, its validation,
and the in-place conversion (:func:`convert`). The block's keys are
:mod:`mmvq.schema`'s.

Quantization configs are plain dicts (mmengine-config friendly)::

    qcfg = dict(
        scope='auto',                     # 'backbone', 'model' (alias 'detector');
                                          # auto: classifiers whole, detectors' backbone
        integer_layernorm=False,          # FQ-ViT integer LN (needs PTF)
        residual_stream=False,            # FQ-ViT: LayerNorm input quantizers also
                                          # quantize the skip connections
        roles=dict(                       # quantizer config per role
            weight=dict(type='UniformQuantizer', bits=8, symmetric=True,
                        granularity='channel', ch_axis=0),
            act=dict(type='UniformQuantizer', bits=8),
            attn_probs=dict(type='AdaLogQuantizer', bits=4, fixed_scale=1.0),
        ),
        overrides=[                       # by module-name pattern (fnmatch)
            dict(name='*patch_embed*', roles=dict(patch_embed_input=dict(bits=8))),
        ],
    )

Scope ``'auto'`` (the default) quantizes a classifier whole — backbone and
head, as FQ-ViT, AdaLog and RepQ-ViT evaluate on ImageNet (the head's input
role ``head_input`` falls back to the activation bits; ``logits`` is float
unless set) — and a detector's backbone (``'model'`` adds neck, RPN and RoI
heads, as the RepQ-ViT/APHQ-ViT detection pipelines).

Roles fall back along :data:`mmvq.schema.ROLE_FALLBACK` (``qkv_input`` -> ``linear_input``
-> ``act``); a role set to ``None`` is left in float. An override applies to a
slot when its ``roles`` name the slot's role or one of its fallbacks (nearest
wins): ``None`` disables, a dict with ``type`` replaces, a dict without
``type`` is merged into the resolved config (``act=dict(bits=4)`` makes every
activation of the matched modules 4-bit, whatever its quantizer). Roles with no fallback
(``ln_input``, ``ln_output``, ``attn_logits``, ``softmax``, the outputs
``linear_output``, ``qkv_output``, ``proj_output``, ``fc2_output``,
``conv_output``, ``patch_embed_output``, ``logits``, ViT's ``cls_embed`` and
``pos_embed``, Swin's ``attn_scores`` and ``rel_pos_table``) are float unless
configured.
"""
import copy
import fnmatch
import inspect
import json

import torch

from .adapters import find_adapter, generic_sites, model_task, split_backbone
from .modes import iter_quantizers
from .modules.base import build_quantizer, swap_class
from .registry import QUANTIZERS
from .schema import QuantConfig, apply_override, chain_lookup, resolve_role, scope_for_task


def _apply_hints(cfg, hints):
    if cfg is None or not hints:
        return cfg
    qcls = QUANTIZERS.get(cfg['type'])
    params = inspect.signature(qcls.__init__).parameters
    for key, value in hints.items():
        if key in params and key not in cfg:
            cfg[key] = value
    return cfg


def _check_slot(site, slot, role, cfg):
    """Reject configs that cannot work, naming the role and the fix."""
    if cfg is None:
        return
    qcls = QUANTIZERS.get(cfg['type'])
    if qcls is None:
        raise KeyError(f'unknown quantizer type {cfg["type"]!r} for role {role}; registered: '
                       f'{", ".join(sorted(QUANTIZERS.module_dict))}')
    if slot == 'weight' and not qcls.quantizes_weights:
        raise ValueError(f'{qcls.__name__} cannot quantize weights (role {role} of {site.name}): '
                         'use UniformQuantizer for weights (or a quantizer with '
                         'quantizes_weights = True)')
    groups = cfg.get('num_groups')
    channels = getattr(site.module, 'in_features', None)
    if groups is not None and slot == 'input' and channels is not None and groups > channels:
        raise ValueError(f'num_groups={groups} is larger than the {channels} input channels of '
                         f'{site.name} (role {role}): use at most {channels} groups')


def resolve_scope(model, scope='auto'):
    """The scope a quantization block means for ``model``
    (:func:`mmvq.schema.scope_for_task` of its task)."""
    return scope_for_task(model_task(model), scope)


def plan(model, qcfg):
    """List the sites of ``model`` with the quantizer config of every slot.

    Returns:
        list[tuple[Site, dict]]: site and ``slot -> cfg | None``.
    """
    scope = resolve_scope(model, qcfg.get('scope', 'auto'))
    roles = qcfg.get('roles', {})
    overrides = qcfg.get('overrides', [])
    prefix, backbone = split_backbone(model)
    adapter = find_adapter(backbone)
    sites = list(adapter.sites(backbone, prefix))
    if scope != 'backbone' and prefix:
        sites += list(generic_sites(model, '', skip_prefixes=[prefix]))
    planned = []
    for site in sites:
        if site.option and not qcfg.get(site.option):
            continue
        slot_cfgs = {}
        for slot, role in site.roles.items():
            cfg = resolve_role(roles, role) if role else None
            for ov in overrides:
                if role and fnmatch.fnmatch(site.name, ov['name']):
                    cfg = apply_override(cfg, chain_lookup(ov.get('roles', {}), role))
            slot_cfgs[slot] = _apply_hints(cfg, site.hints.get(slot))
            _check_slot(site, slot, role, slot_cfgs[slot])
        if site.optional and all(c is None for c in slot_cfgs.values()):
            continue
        planned.append((site, slot_cfgs))
    return planned


def validate_plan(model, qcfg):
    """Check ``qcfg`` against ``model`` without converting it (fails fast).

    Resolves every site's quantizer configs and builds each distinct one
    once, so unknown types, impossible roles, too many groups and bad bit
    widths raise before any evaluation runs. Returns the number of sites.
    """
    seen = set()
    planned = plan(model, copy.deepcopy(dict(qcfg)))
    for site, slot_cfgs in planned:
        for slot, cfg in slot_cfgs.items():
            key = json.dumps(cfg, sort_keys=True, default=str)
            if cfg is not None and key not in seen:
                seen.add(key)
                try:
                    with torch.device('meta'):         # arguments only: no memory
                        build_quantizer(cfg)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f'{site.name} ({slot}): {exc}') from None
    return len(planned)


def convert(model, qcfg):
    """Convert ``model`` in place to its quantized form (quantizers in float mode).

    Float ``state_dict`` keys are preserved; quantizer buffers are added
    beside them. Returns the model.
    """
    state = QuantConfig.parse(qcfg)
    qcfg = state.as_dict()
    integer_ln = bool(state.integer_layernorm)
    for site, slot_cfgs in plan(model, qcfg):
        if site.wrapper is None:
            raise TypeError(f'no quantized wrapper for {type(site.module).__name__} ({site.name})')
        module = swap_class(site.module, site.wrapper)
        kwargs = dict(site.kwargs)
        if 'integer' in inspect.signature(module.quant_setup).parameters:
            inp = slot_cfgs.get('input')
            kwargs['integer'] = integer_ln and inp is not None \
                and QUANTIZERS.get(inp['type']).power_of_two_factors
        module.quant_setup(slot_cfgs, **kwargs)
    fused = state.fused
    for name, q in iter_quantizers(model):
        q.site_name = name
        q.fused = fused
    model.__dict__[_STATE_ATTR] = state
    return model


_STATE_ATTR = '_mmvq_quant_state'


def quant_state(model):
    """The :class:`~mmvq.schema.QuantConfig` ``model`` was converted with
    (:func:`convert`), or ``None`` for a model that is not converted."""
    return model.__dict__.get(_STATE_ATTR)

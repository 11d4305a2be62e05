"""User API: ``convert``, ``calibrate``, ``quantize``, modes and summary.

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

Roles fall back along :data:`ROLE_FALLBACK` (``qkv_input`` -> ``linear_input``
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
from collections import OrderedDict

import torch
import torch.nn as nn

from .adapters import find_adapter, generic_sites, model_task
from .adapters.attention import QuantAttentionMixin
from .modules.base import QuantModuleMixin, swap_class
from .quantizers.base import BaseQuantizer
from .registry import QUANTIZERS

ROLE_FALLBACK = {
    'linear_weight': 'weight', 'conv_weight': 'weight',
    'qkv_input': 'linear_input', 'proj_input': 'linear_input', 'fc1_input': 'linear_input',
    'fc2_input': 'linear_input', 'reduction_input': 'linear_input',
    'cls_head_input': 'head_input', 'head_input': 'linear_input', 'linear_input': 'act',
    'patch_embed_input': 'conv_input', 'conv_input': 'act',
    'q': 'matmul_input', 'k': 'matmul_input', 'v': 'matmul_input', 'matmul_input': 'act',
    'attn_probs': 'act',
}
SCOPES = ('auto', 'backbone', 'model', 'detector')
_MISSING = object()


def resolve_role(roles, role):
    """Quantizer config of ``role`` following the fallback chain (or None)."""
    seen = role
    while seen is not None:
        if seen in roles:
            cfg = roles[seen]
            return None if cfg is None else dict(cfg)
        seen = ROLE_FALLBACK.get(seen)
    return None


def _chain_lookup(roles, role):
    """The entry for ``role`` or its nearest fallback ancestor (or _MISSING)."""
    while role is not None:
        if role in roles:
            return roles[role]
        role = ROLE_FALLBACK.get(role)
    return _MISSING


def _apply_override(cfg, override):
    if override is _MISSING:
        return cfg
    if override is None:
        return None
    override = dict(override)
    if cfg is None or 'type' in override:
        return override if 'type' in override else None
    cfg.update(override)
    return cfg


def _apply_hints(cfg, hints):
    if cfg is None or not hints:
        return cfg
    qcls = QUANTIZERS.get(cfg['type'])
    params = inspect.signature(qcls.__init__).parameters
    for key, value in hints.items():
        if key in params and key not in cfg:
            cfg[key] = value
    return cfg


WEIGHT_QUANTIZERS = ('UniformQuantizer', )


def _check_slot(site, slot, role, cfg):
    """Reject configs that cannot work, naming the role and the fix."""
    if cfg is None:
        return
    qcls = QUANTIZERS.get(cfg['type'])
    if qcls is None:
        raise KeyError(f'unknown quantizer type {cfg["type"]!r} for role {role}; registered: '
                       f'{", ".join(sorted(QUANTIZERS.module_dict))}')
    if slot == 'weight' and qcls.__name__ not in WEIGHT_QUANTIZERS:
        raise ValueError(f'{qcls.__name__} cannot quantize weights (role {role} of {site.name}): '
                         'use UniformQuantizer for weights')
    groups = cfg.get('num_groups')
    channels = getattr(site.module, 'in_features', None)
    if groups is not None and slot == 'input' and channels is not None and groups > channels:
        raise ValueError(f'num_groups={groups} is larger than the {channels} input channels of '
                         f'{site.name} (role {role}): use at most {channels} groups')


def _find_backbone(model):
    backbone = getattr(model, 'backbone', None)
    if isinstance(backbone, nn.Module):
        return 'backbone', backbone
    return '', model


def resolve_scope(model, scope='auto'):
    """The scope a quantization block means for ``model``.

    ``'auto'`` is ``'model'`` for an mmpretrain classifier (its head is
    quantized, as in the papers' ImageNet tables) and ``'backbone'``
    otherwise; ``'detector'`` is an alias of ``'model'``.
    """
    if scope not in SCOPES:
        raise ValueError(f'scope={scope!r}: use one of {SCOPES}')
    if scope == 'auto':
        return 'model' if model_task(model) == 'classification' else 'backbone'
    return 'model' if scope == 'detector' else scope


def plan(model, qcfg):
    """List the sites of ``model`` with the quantizer config of every slot.

    Returns:
        list[tuple[Site, dict]]: site and ``slot -> cfg | None``.
    """
    scope = resolve_scope(model, qcfg.get('scope', 'auto'))
    roles = qcfg.get('roles', {})
    overrides = qcfg.get('overrides', [])
    prefix, backbone = _find_backbone(model)
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
                    cfg = _apply_override(cfg, _chain_lookup(ov.get('roles', {}), role))
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
    import json

    from .modules.base import build_quantizer
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
    qcfg = copy.deepcopy(dict(qcfg))
    integer_ln = bool(qcfg.get('integer_layernorm', False))
    for site, slot_cfgs in plan(model, qcfg):
        if site.wrapper is None:
            raise TypeError(f'no quantized wrapper for {type(site.module).__name__} ({site.name})')
        module = swap_class(site.module, site.wrapper)
        kwargs = dict(site.kwargs)
        if 'integer' in inspect.signature(module.quant_setup).parameters:
            inp = slot_cfgs.get('input')
            kwargs['integer'] = integer_ln and inp is not None \
                and QUANTIZERS.get(inp['type']) is QUANTIZERS.get('PTFQuantizer')
        module.quant_setup(slot_cfgs, **kwargs)
    for name, q in iter_quantizers(model):
        q.site_name = name
    model._mmvq_qcfg = qcfg
    return model


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


def finish_calibration(model):
    """Observers -> parameters, then quant mode (for hand-driven calib passes).

    Use after running forwards yourself with ``set_quant_mode(model, 'calib')``;
    merges observers across ranks, fits every quantizer, folds AdaLog shifts.
    """
    from .calibration.driver import finalize, initialise_parameters, sync_observers
    sync_observers(model)
    initialise_parameters(model)
    finalize(model)
    return model


def fold_adalog_shifts(model):
    """Fold every shifted AdaLog input quantizer into its Linear's bias."""
    from .quantizers.adalog import AdaLogQuantizer
    for module in model.modules():
        q = getattr(module, 'input_quantizer', None)
        if (isinstance(module, nn.Linear) and isinstance(q, AdaLogQuantizer) and q.shifted
                and q.enabled and q.is_calibrated()):
            q.fold_shift_into(module)


def calibrate(model, batches, forward_fn=None, searches=None, logger=None):
    """Calibrate a converted model on ``batches`` (a sequence) and switch to quant mode.

    Runs :func:`mmvq.calibration.run_calibration`: observers over every
    batch, the searches of the quantization config (``qcfg['searches']``,
    e.g. FPCS, IGQ allocation) unless ``searches`` is given, AdaLog folding.

    Args:
        model (nn.Module): converted model.
        batches (Sequence): calibration inputs.
        forward_fn (callable | None): ``forward_fn(model, batch)``; default
            ``model(batch)``.
        searches (list | None): search stages or their config dicts.
        logger: optional logger with ``.info``.
    """
    from .calibration import make_search, run_calibration
    forward_fn = forward_fn or (lambda m, b: m(b))
    if searches is None:
        searches = getattr(model, '_mmvq_qcfg', {}).get('searches', [])
    searches = [make_search(s) if isinstance(s, dict) else s for s in searches]
    was_training = model.training
    run_calibration(model, list(batches), forward_fn, searches, logger)
    model.train(was_training)
    return model


def quantize(model, qcfg, calib_data, forward_fn=None):
    """One call for notebooks: convert ``model`` in place with ``qcfg`` and
    calibrate it on ``calib_data``; returns the quantized model."""
    convert(model, qcfg)
    return calibrate(model, calib_data, forward_fn)


def quant_summary(model):
    """Rows ``(module, slot, kind, bits, granularity)`` for every quantizer."""
    rows = []
    for name, module in model.named_modules():
        # attention wrappers' quantizers live in their matmul/softmax children,
        # which are listed themselves, except their own slots
        if isinstance(module, QuantModuleMixin):
            own = (module.own_quantizers() if isinstance(module, QuantAttentionMixin)
                   else module.quantizers())
            for slot, q in own:
                if slot == 'input' and getattr(module, 'stream_input', False):
                    slot = 'input+skip'       # the quantized residual stream
                info = q.summary()
                rows.append(OrderedDict(module=name, slot=slot, kind=info.pop('kind'),
                                        bits=info.pop('bits'),
                                        granularity=info.pop('granularity', 'tensor'),
                                        enabled=q.enabled, extra=info))
    return rows


def format_summary(model):
    """The quant summary as a fixed-width text table."""
    rows = quant_summary(model)
    header = ('module', 'slot', 'kind', 'bits', 'granularity')
    table = [header] + [tuple(str(r[h]) + ('' if r['enabled'] or h != 'kind' else ' (off)')
                              for h in header) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ['  '.join(c.ljust(w) for c, w in zip(r, widths)) for r in table]
    lines.insert(1, '  '.join('-' * w for w in widths))
    counts = {}
    for r in rows:
        counts[r['kind']] = counts.get(r['kind'], 0) + 1
    lines.append(f'{len(rows)} quantizers: ' + ', '.join(f'{k}={v}' for k, v in sorted(counts.items())))
    return '\n'.join(lines)

"""The quantization block's schema: keys, scopes, role fallbacks, calibration
settings and their validation (no model, no torch).

A block is parsed once, by :meth:`QuantConfig.parse` (``mmvq.convert`` does it
and keeps the result on the model: :func:`mmvq.quant_state`); every default
below is written once, in :class:`QuantConfig` / :class:`CalibSettings`.

One place for what a ``quant = dict(...)`` block may say, used alike by
:func:`mmvq.convert`, ``mmvq.PTQLoop``, ``mmvq.PTQHook`` and the tools::

    quant = dict(
        name='AdaLog W4A4',              # for reports
        scope='auto',                    # SCOPES
        integer_layernorm=False,         # FQ-ViT integer LayerNorm (needs PTF)
        residual_stream=False,           # FQ-ViT: LN input quantizers also on the skips
        roles=dict(...),                 # quantizer config per role (ROLE_FALLBACK)
        overrides=[dict(name='*patch_embed*', roles=dict(...))],
        searches=[dict(type='fpcs', ...)],   # mmvq.SEARCHES
        calib=dict(split='train', seed=0, images=None,      # CALIB_KEYS
                   store_device='cpu', store_mb=64),
        fused=True,                      # fused CPU kernels (mmvq.quantizers.fused)
    )
"""

import copy
import dataclasses
from typing import Any, Optional, Tuple

SCOPES = ('auto', 'backbone', 'model', 'detector')


@dataclasses.dataclass(frozen=True)
class CalibSettings:
    """``quant.calib``: what calibration reads, and where its records live.

    Args:
        images (int | dict | None): calibration images (a dict: per task);
            ``None``: :func:`calib_images_for` chooses.
        split (str): the dataloader split drawn from (``'<split>_dataloader'``).
        seed (int): seed of the draw.
        store_device (str): where observer records live: ``'cpu'`` or
            ``'same'`` (the data's device) or a device name.
        store_mb (int): bound of one observer's sample store, MiB.
    """

    images: Any = None
    split: str = 'train'
    seed: int = 0
    store_device: str = 'cpu'
    store_mb: int = 64

    @classmethod
    def from_dict(cls, calib):
        calib = {k: v for k, v in dict(calib or {}).items() if k != '_scope_'}
        unknown = set(calib) - set(CALIB_KEYS)
        if unknown:
            raise ValueError(f'unknown key(s) {sorted(unknown)} in quant.calib; allowed: '
                             f'{sorted(CALIB_KEYS)}')
        return cls(**calib)

    def store(self):
        """The observer store policy, ``dict(device, max_bytes)``."""
        return dict(device=self.store_device, max_bytes=int(self.store_mb) << 20)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """A parsed quantization block (see the module docstring for its keys).

    ``block`` is the block as written (``_scope_`` tags removed): what
    checkpoints record and what :meth:`as_dict` returns.
    """

    name: Optional[str] = None
    scope: str = 'auto'
    integer_layernorm: bool = False
    residual_stream: bool = False
    roles: Any = None
    overrides: Tuple = ()
    searches: Tuple = ()
    calib: CalibSettings = CalibSettings()
    fused: bool = True
    block: Any = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, qcfg):
        """Validate ``qcfg`` (one-line errors, :func:`validate_qcfg`) and parse it."""
        if isinstance(qcfg, cls):
            return qcfg
        validate_qcfg(qcfg)
        block = without_config_scope(copy.deepcopy(dict(qcfg)))
        fused = block.get('fused', True)
        if not isinstance(fused, bool):
            raise ValueError(f'quant.fused={fused!r}: use True (fused CPU kernels where they '
                             'apply) or False (eager PyTorch code)')
        fields = {k: v for k, v in block.items() if k not in ('calib', 'overrides', 'searches')}
        return cls(**fields, overrides=tuple(block.get('overrides') or ()),
                   searches=tuple(block.get('searches') or ()),
                   calib=CalibSettings.from_dict(block.get('calib')), block=block)

    def as_dict(self):
        """The block as written (a copy)."""
        return copy.deepcopy(self.block if self.block is not None else {})


QCFG_KEYS = tuple(f.name for f in dataclasses.fields(QuantConfig) if f.name != 'block')
CALIB_KEYS = tuple(f.name for f in dataclasses.fields(CalibSettings))

ROLE_FALLBACK = {
    'linear_weight': 'weight', 'conv_weight': 'weight',
    'qkv_input': 'linear_input', 'proj_input': 'linear_input', 'fc1_input': 'linear_input',
    'fc2_input': 'linear_input', 'reduction_input': 'linear_input',
    'cls_head_input': 'head_input', 'head_input': 'linear_input', 'linear_input': 'act',
    'patch_embed_input': 'conv_input', 'conv_input': 'act',
    'q': 'matmul_input', 'k': 'matmul_input', 'v': 'matmul_input', 'matmul_input': 'act',
    'attn_probs': 'act',
}
MISSING = object()
CLI_SOURCE = '--calib-images'     # a number the user gave: never capped to the split

# calibration images when neither --calib-images nor the block's calib.images
# says: the papers' protocols (ImageNet: 32 train images for AdaLog, RepQ-ViT,
# IGQ-ViT; COCO: 1 image for RepQ-ViT, IGQ-ViT, APHQ-ViT)
DEFAULT_CALIB_IMAGES = dict(classification=32, detection=1)
FALLBACK_CALIB_IMAGES = 1


def calib_images_for(task, cli=None, block=None):
    """Number of calibration images and where it came from.

    Args:
        task (str | None): ``'classification'``, ``'detection'`` or None.
        cli (int | None): ``--calib-images``.
        block (int | dict | None): the quantization block's ``calib.images``;
            a dict gives it per task (``dict(classification=1000)``: FQ-ViT's
            10 batches of 100), the default for tasks it does not name.

    Returns:
        tuple[int, str]: the number and a phrase naming its source.
    """
    if cli is not None:
        return cli, CLI_SOURCE
    if isinstance(block, dict):
        if task in block:
            return block[task], f'quant.calib.images.{task}'
        block = None
    if block is not None:
        return block, 'quant.calib.images'
    if task in DEFAULT_CALIB_IMAGES:
        return DEFAULT_CALIB_IMAGES[task], f'the {task} default'
    return FALLBACK_CALIB_IMAGES, 'the default for an unknown task'


def without_config_scope(obj):
    """``obj`` with every ``_scope_`` key removed, recursively (a copy).

    mmengine tags each dict of a base inherited by scope (``'mmvq::_base_/quant/...'``)
    with ``_scope_='mmvq'``; mmvq's quantizer, role and search configs are plain
    keyword arguments and the registry scope is always mmvq's own.
    """
    if isinstance(obj, dict):
        return {k: without_config_scope(v) for k, v in obj.items() if k != '_scope_'}
    if isinstance(obj, (list, tuple)):
        return type(obj)(without_config_scope(v) for v in obj)
    return obj


def validate_qcfg(qcfg):
    """Raise a one-line error for an unusable quantization block."""
    if not isinstance(qcfg, dict):
        raise ValueError('the config has no `quant` block: add `quant = dict(...)` '
                         '(see configs/_base_/quant/)')
    unknown = set(qcfg) - set(QCFG_KEYS) - {'_scope_'}
    if unknown:
        raise ValueError(f'unknown key(s) {sorted(unknown)} in the quant block; allowed: '
                         f'{sorted(QCFG_KEYS)}')
    CalibSettings.from_dict(qcfg.get('calib'))
    if qcfg.get('scope', 'auto') not in SCOPES:
        raise ValueError(f'scope={qcfg["scope"]!r}: use one of {SCOPES}')
    for search in qcfg.get('searches') or []:
        if not isinstance(search, dict) or 'type' not in search:
            raise ValueError(f'quant.searches holds {search!r}: each search is a dict with a '
                             "`type` (e.g. dict(type='fpcs'))")


def check_calib_images(n, what='--calib-images'):
    """``n`` (None or a positive int) or a one-line error naming ``what``."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f'{what} must be at least 1, got {n}')
    return n


def calib_settings(qcfg, images=None, split=None, seed=None):
    """The calibration split and seed: explicit values over the block's
    ``calib`` over the defaults (``'train'``, 0). ``images`` is only checked
    here; :func:`calib_images_for` resolves it once the task is known.

    Returns:
        dict: ``images`` (checked, maybe None), ``split``, ``seed``.
    """
    calib = CalibSettings.from_dict((qcfg or {}).get('calib'))
    return dict(images=check_calib_images(images),
                split=split or calib.split,
                seed=seed if seed is not None else calib.seed)


def scope_for_task(task, scope='auto'):
    """The scope ``scope`` means for a model of ``task``.

    ``'auto'`` is ``'model'`` for a classifier (its head is quantized, as in
    the papers' ImageNet tables) and ``'backbone'`` otherwise; ``'detector'``
    is an alias of ``'model'``.
    """
    if scope not in SCOPES:
        raise ValueError(f'scope={scope!r}: use one of {SCOPES}')
    if scope == 'auto':
        return 'model' if task == 'classification' else 'backbone'
    return 'model' if scope == 'detector' else scope


def resolve_role(roles, role):
    """Quantizer config of ``role`` following the fallback chain (or None)."""
    seen = role
    while seen is not None:
        if seen in roles:
            cfg = roles[seen]
            return None if cfg is None else dict(cfg)
        seen = ROLE_FALLBACK.get(seen)
    return None


def chain_lookup(roles, role):
    """The entry for ``role`` or its nearest fallback ancestor (or MISSING)."""
    while role is not None:
        if role in roles:
            return roles[role]
        role = ROLE_FALLBACK.get(role)
    return MISSING


def apply_override(cfg, override):
    if override is MISSING:
        return cfg
    if override is None:
        return None
    override = dict(override)
    if cfg is None or 'type' in override:
        return override if 'type' in override else None
    cfg.update(override)
    return cfg

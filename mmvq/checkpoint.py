"""Quantized checkpoints: float weights under their names + quantizer state.

Format (``format='mmvq-quantized'``, ``format_version=1``)::

    {'format': str, 'format_version': int,
     'qcfg': JSON str,        # the quantization config
     'meta': JSON str,        # config name, checkpoint sha256, versions ...
     'state_dict': {name: Tensor}}

Only strings, ints and tensors: it loads with ``torch.load(weights_only=True)``
and holds no pickled code. Writes are atomic (temporary file in the same
folder, then ``os.replace``): a crash mid-write leaves any previous file intact.
"""
import json
import os.path as osp

import torch

from .conversion import convert
from .modes import set_quant_mode
from .utils.io import atomic_torch_save

FORMAT = 'mmvq-quantized'
FORMAT_VERSION = 1


def save_quantized(model, path, qcfg, meta=None):
    """Save a converted, calibrated model (see module docstring)."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = dict(format=FORMAT, format_version=FORMAT_VERSION,
                   qcfg=json.dumps(qcfg, sort_keys=True, default=str),
                   meta=json.dumps(meta or {}, sort_keys=True, default=str),
                   state_dict=state)
    atomic_torch_save(payload, path)


def read_quantized(path):
    """Load and validate a quantized checkpoint; returns ``(qcfg, meta, state_dict)``."""
    if not osp.isfile(path):
        raise FileNotFoundError(f'quantized checkpoint {path} does not exist')
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f'{path} is not a readable mmvq quantized checkpoint '
                         f'({type(exc).__name__}); re-create it with --save-quantized') from None
    if not isinstance(payload, dict) or payload.get('format') != FORMAT:
        raise ValueError(f'{path} is not an mmvq quantized checkpoint; '
                         'create one with tools/ptq.py --save-quantized')
    version = payload.get('format_version')
    if version != FORMAT_VERSION:
        raise ValueError(f'{path} has format version {version}, this mmvq reads version '
                         f'{FORMAT_VERSION}: re-run calibration with --save-quantized')
    return json.loads(payload['qcfg']), json.loads(payload['meta']), payload['state_dict']


def _add_folded_biases(model, state):
    """Give a bias-free Linear the bias a LayerNorm reparameterization folded
    into it (:mod:`mmvq.calibration.reparam`) when the checkpoint has one."""
    import torch.nn as nn
    for name, module in model.named_modules():
        key = f'{name}.bias' if name else 'bias'
        if isinstance(module, nn.Linear) and module.bias is None and key in state:
            module.bias = nn.Parameter(torch.zeros(module.out_features,
                                                   device=module.weight.device,
                                                   dtype=module.weight.dtype))


def load_quantized(model, path, qcfg=None):
    """Convert ``model`` with the checkpoint's config and load its state.

    Args:
        model (nn.Module): the float model (built from the same config).
        path (str): checkpoint written by :func:`save_quantized`.
        qcfg (dict | None): if given, must equal the saved quantization config.

    Returns:
        dict: the checkpoint's ``meta``.
    """
    saved_qcfg, meta, state = read_quantized(path)
    if qcfg is not None and json.loads(json.dumps(qcfg, sort_keys=True, default=str)) != saved_qcfg:
        raise ValueError(f'{path} was made with a different quantization config; '
                         're-calibrate or use the config it was made with')
    convert(model, saved_qcfg)
    _add_folded_biases(model, state)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f'{path} does not match this model: {len(result.missing_keys)} missing '
                         f'and {len(result.unexpected_keys)} unexpected keys (e.g. '
                         f'{(result.missing_keys + result.unexpected_keys)[:2]}); '
                         'use the config it was made with')
    set_quant_mode(model, 'quant')
    return meta

"""Search budgets by device: the papers' settings on accelerators, bounded on CPU.

Each search stage (FPCS, IGQ allocation) declares two presets: ``cpu`` (the
documented deviations that keep a calibration within minutes on a few CPU
cores) and ``accelerator`` (the reference settings: every calibration token
and window, the reference's survivor counts). An argument given explicitly
in the quantization block wins over both. The preset is chosen from the
device of the model when the stage is attached, unless the stage is given
``budget_preset='accelerator'`` (the papers' budgets on any device, e.g. a
small model on a CPU: ``--cfg-options "quant.searches.0.budget_preset=accelerator"``)
or ``'cpu'``; the values actually used are recorded (``results.json`` ->
``calibration.search_budgets``).
"""
import torch

from ..modules.base import module_device as model_device  # noqa: F401 (the searches' helper)


PRESET_CHOICES = ('auto', 'cpu', 'accelerator')


def resolve_budget(explicit, presets, device, choice='auto'):
    """Merge the preset for ``device`` with the explicitly given values.

    Args:
        explicit (dict): argument name -> value given by the user (``None``
            entries mean "not given").
        presets (dict): ``{'cpu': {...}, 'accelerator': {...}}``.
        device (torch.device): where the search runs.
        choice (str): ``'auto'`` (the preset of ``device``), ``'cpu'`` or
            ``'accelerator'`` (that preset on any device).

    Returns:
        dict: the values to use, plus ``device``, ``preset`` (or
        ``'explicit'`` when every value was given) and
        ``differs_from_reference``: the names whose value is not the
        reference's (the ``accelerator`` preset), so a report says when a
        search ran with less than the paper's budget.
    """
    if choice not in PRESET_CHOICES:
        raise ValueError(f'budget_preset must be one of {", ".join(PRESET_CHOICES)}, got {choice!r}')
    preset = choice if choice != 'auto' else (
        'cpu' if torch.device(device).type == 'cpu' else 'accelerator')
    values = dict(presets[preset])
    given = {k: v for k, v in explicit.items() if v is not None}
    values.update(given)
    reference = presets['accelerator']
    return dict(values, device=str(device),
                preset='explicit' if set(given) >= set(presets[preset]) else preset,
                differs_from_reference=sorted(k for k in reference if values[k] != reference[k]))


def describe_deviations(name, budget, presets):
    """One line naming the values of ``budget`` that differ from the reference."""
    ref = presets['accelerator']
    keys = budget.get('differs_from_reference') or []
    if not keys:
        return None
    parts = ', '.join(f'{k}={budget[k]} (paper: {"all" if ref[k] is None else ref[k]})'
                      for k in keys)
    return f'[mmvq] {name} ran with budgets below the paper\'s on {budget["device"]}: {parts}'


class DeviceBudget:
    """Mixin of search stages with per-device presets (:data:`PRESETS`).

    The stage stores the explicitly given values in ``_explicit`` and its
    ``budget_preset`` choice in ``_preset`` (default ``'auto'``);
    :meth:`set_device` (called from ``attach`` with the model's device)
    resolves them against the preset and sets each as an attribute.
    """

    PRESETS = dict(cpu={}, accelerator={})
    _preset = 'auto'
    _explicit = {}

    def set_device(self, device):
        """Choose the budget preset for ``device`` (explicit arguments win)."""
        self.budget = resolve_budget(self._explicit, self.PRESETS, torch.device(device),
                                     self._preset)
        for key in self.PRESETS['cpu']:
            setattr(self, key, self.budget[key])

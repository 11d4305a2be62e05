"""Search stages of calibration (``quant.searches``), registered in ``SEARCHES``.

A search refines quantization parameters after the observers have given the
initial ones, on float layer inputs it cached during the calibration
forwards. :func:`mmvq.calibration.run_calibration` drives every stage
through the same steps:

1. :meth:`BaseSearch.attach` (before the forwards): choose the budget for
   the model's device and attach input caches to the layers searched;
2. the calibration forwards fill the caches;
3. :meth:`BaseSearch.bind` (after the initial parameters): the calibration
   samples and forward, for a stage that runs forwards of its own (block
   reconstruction); then :meth:`BaseSearch.run`: the search;
4. :meth:`BaseSearch.detach` (always): drop the caches.

Every step but :meth:`~BaseSearch.run` has a default that is right for a
stage without that need (no cached layers: :meth:`~BaseSearch.targets`
yields nothing, attach only sets the device budget, detach has nothing to drop).

What the stage chose is in :attr:`BaseSearch.report`, the budget it ran with
in :attr:`BaseSearch.budget`; both go to ``results.json``. A new search is a
subclass registered with ``@SEARCHES.register_module(name='my_search')``,
built from ``dict(type='my_search', ...)``.
"""
from ..registry import SEARCHES
from .budget import DeviceBudget, describe_deviations, model_device
from .cache import detach_search_cache


class BaseSearch(DeviceBudget):
    """Base class of search stages (see the module docstring).

    Subclasses set :attr:`name` and :attr:`PRESETS` and implement :meth:`run`;
    a stage that caches layer inputs also :meth:`targets` and :meth:`attach`.
    """

    name = None
    report = None

    def targets(self, model):
        """Yield ``(name, module, kind, ...)`` of every layer whose inputs this
        stage caches (none by default)."""
        return iter(())

    def attach(self, model):
        """Set the device budget (and attach input caches to :meth:`targets`)."""
        self.set_device(model_device(model))

    def wanted_images(self, task):
        """Images this stage wants to run its own forwards on for a model of
        ``task`` (``None``: the calibration images). The PTQ session draws that
        many from the calibration split and hands them to :meth:`use_samples`."""
        return None

    def use_samples(self, samples):
        """Run on ``samples`` (indexable) instead of the calibration images."""

    def bind(self, samples, forward_fn):
        """Receive the calibration samples and forward (unused by default)."""

    def run(self, model, log):
        """Search on the cached inputs; ``log`` takes one line at a time."""
        raise NotImplementedError

    def detach(self, model):
        """Drop the input caches of every target (idempotent)."""
        for target in self.targets(model):
            detach_search_cache(target[1])

    def __call__(self, model, log=print):
        """:meth:`run`, then :meth:`detach` (for hand-driven calibration)."""
        try:
            self.run(model, log)
        finally:
            self.detach(model)

    def deviations(self):
        """One line naming the budgets below the paper's, or None."""
        return describe_deviations(self.name, getattr(self, 'budget', None) or {}, self.PRESETS)


def build_search(cfg):
    """A search stage from ``dict(type='fpcs', ...)`` (or the stage itself)."""
    if isinstance(cfg, BaseSearch):
        return cfg
    cfg = dict(cfg)
    kind = cfg.get('type')
    if SEARCHES.get(kind) is None:
        raise KeyError(f'unknown search {kind!r}; use one of {sorted(SEARCHES.module_dict)}')
    return SEARCHES.build(cfg)

"""Calibration driver: keyed forward passes, cross-rank merge, searches.

Flow (:func:`run_calibration`):

1. every quantizer in ``calib`` mode; the calibration samples are sharded
   over ranks (position ``p`` on rank ``p % world_size``) and each forward
   runs inside :func:`~mmvq.quantizers.observers.calibration_step` ``(p)``, so
   every observer record carries its global position;
2. :func:`sync_observers` all-gathers the records of every quantizer (and
   every search cache) so each rank holds exactly what one process seeing all
   samples would hold, reduced in position order — hence identical
   quantization parameters on every rank and for any world size;
3. observers -> initial parameters (:func:`finish_calibration` without
   leaving calib state), then the configured searches
   (:mod:`mmvq.calibration.search`: FPCS, IGQ group allocation) on the
   cached layer inputs, all deterministic;
4. AdaLog shift folding and ``quant`` mode; every observer record and search
   cache is dropped and the freed memory handed back (``gc``, the CUDA
   caching allocator, glibc's ``malloc_trim``), so the quantized evaluation
   starts from the memory the float one had plus the quantizers.

Observer records live where :func:`~mmvq.quantizers.observers.store_policy`
puts them: the host by default (``calib=dict(store_device='cpu',
store_mb=64)`` in the quantization block; ``store_device='same'`` keeps them
on the model's device). Records are moved to the host before they are
gathered across ranks, whatever the device.
"""
import time

import torch

from ..modes import iter_quantizers, set_quant_mode
from ..conversion import quant_state
from ..quantizers.observers import KeyedObserver, calibration_step, store_policy
from ..schema import CalibSettings
from ..utils.dist import gather_to_all, rank_world
from ..utils.memory import release_memory
from .cache import iter_search_caches
from .reparam import fold_adalog_shifts
from .search import build_search


def _observers(obj):
    return {k: v for k, v in vars(obj).items() if isinstance(v, KeyedObserver)}


def sync_observers(model):
    """Merge every observer's and search cache's records across ranks."""
    rank, world = rank_world()
    if world == 1:
        return
    local = {}
    for name, q in iter_quantizers(model):
        for attr, obs in _observers(q).items():
            local[f'{name}:{attr}'] = obs.records
    for name, cache in iter_search_caches(model):
        local[f'{name}:cache'] = cache.records
    gathered = gather_to_all(local)
    merged = {}
    for key in local:
        merged[key] = [g[key] for r, g in enumerate(gathered) if r != rank]
    for name, q in iter_quantizers(model):
        for attr, obs in _observers(q).items():
            obs.merge(merged[f'{name}:{attr}'])
    for name, cache in iter_search_caches(model):
        cache.merge(merged[f'{name}:cache'])


def observe(model, samples, forward_fn, progress=None):
    """Run the calibration forwards (sharded over ranks, keyed by position)."""
    rank, world = rank_world()
    n = len(samples)
    model.eval()
    set_quant_mode(model, 'calib')
    positions = range(rank, n, world)
    for pos in positions:
        with calibration_step(pos, expected=n), torch.no_grad():
            forward_fn(model, samples[pos])
        if progress is not None:
            progress(pos)


def initialise_parameters(model):
    """Observers -> quantization parameters (quantizers stay in calib mode)."""
    for name, q in iter_quantizers(model):
        if q.enabled and q.mode == 'calib':
            try:
                q.calibrate()
            except Exception as exc:
                raise type(exc)(f'{name}: {exc}') from exc


def store_settings(qcfg):
    """Observer store policy from a quantization block's ``calib`` dict."""
    return CalibSettings.from_dict((qcfg or {}).get('calib')).store()


def run_calibration(model, samples, forward_fn, searches=(), logger=None, progress=None,
                    store=None):
    """Calibrate ``model`` (converted) on ``samples``.

    Args:
        model (nn.Module): converted model.
        samples (Sequence): calibration samples, indexable.
        forward_fn (callable): ``forward_fn(model, sample)``.
        searches (Sequence[BaseSearch | dict]): search stages (or their
            configs) run after the observers, each timed.
        logger: object with ``.info`` (mmengine logger) or ``None``.
        progress (callable | None): called with each processed position.
        store (dict | None): observer store policy ``dict(device, max_bytes)``
            (default: the model's quantization block, else host and 64 MB).

    Returns:
        dict: wall time per stage in seconds.
    """
    log = logger.info if logger is not None else (lambda msg: None)
    searches = [build_search(s) for s in searches]
    times = {}
    try:
        for search in searches:
            search.attach(model)
        state = quant_state(model)
        store = store or (state.calib if state is not None else CalibSettings()).store()
        t0 = time.perf_counter()
        with store_policy(**store):
            observe(model, samples, forward_fn, progress)
        sync_observers(model)
        times['observe'] = time.perf_counter() - t0
        log(f'[mmvq] calibration forwards: {len(samples)} samples in {times["observe"]:.2f} s')
        t0 = time.perf_counter()
        initialise_parameters(model)
        times['init_params'] = time.perf_counter() - t0
        log(f'[mmvq] initial quantization parameters in {times["init_params"]:.2f} s')
        for search in searches:
            t0 = time.perf_counter()
            search.bind(samples, forward_fn)
            try:
                search.run(model, log)
            finally:
                search.detach(model)
            times[search.name] = time.perf_counter() - t0
            log(f'[mmvq] search {search.name} in {times[search.name]:.2f} s')
    finally:
        for search in searches:
            search.detach(model)
    finalize(model)
    return times


def finalize(model):
    """Drop calibration data, switch to quant mode, fold AdaLog shifts, release memory."""
    for _, q in iter_quantizers(model):
        q.reset_observer()
    for _, cache in iter_search_caches(model):
        cache.clear()
    set_quant_mode(model, 'quant')
    fold_adalog_shifts(model)
    set_quant_mode(model, 'quant')          # re-read the folded flags on the host
    release_memory()


def finish_calibration(model):
    """Observers -> parameters, then quant mode (for hand-driven calib passes).

    Use after running forwards yourself with ``set_quant_mode(model, 'calib')``;
    merges observers across ranks, fits every quantizer, folds AdaLog shifts.
    """
    sync_observers(model)
    initialise_parameters(model)
    finalize(model)
    return model

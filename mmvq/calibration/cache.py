"""Search caches: keyed samples of a layer's float inputs for the searches.

Attached as forward hooks while calibrating; records are keyed like observer
records (:mod:`mmvq.quantizers.observers`), so they merge across ranks and
reduce in calibration-step order.

* Linear: ``(I, T, C)`` inputs (instances x tokens x channels); under a
  token budget at most ``max_instances`` instances and ``max_tokens`` tokens
  (evenly strided) per call, scaled down by the number of calibration steps;
  without one, everything (so the batch size of the calibration data does
  not change what a search sees).
* Conv2d: the input unfolded into the rows a convolution multiplies by its
  weight (``(I, L, C_in k_h k_w)``), then kept as a Linear's.
* MatMul (attention): operand pairs ``(a, b)`` of shape ``(W, H, N, M)`` /
  ``(W, H, M, D)``; at most ``max_windows`` windows per call.

A limit of ``None`` keeps everything (the papers' setting, used on
accelerators). Records live where the observer policy puts them
(:func:`mmvq.quantizers.observers.store_policy`, the host by default);
:meth:`SearchCache.data` moves them to the device the search runs on.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quantizers.observers import KeyedObserver, expected_steps, to_store


def _stride(n, cap):
    if cap is None:
        return 1
    return max(1, -(-n // max(1, cap)))


def _share(limit, parts):
    return None if limit is None else max(1, limit // max(1, parts))


class SearchCache(KeyedObserver):
    """Keyed samples of one module's inputs.

    Args:
        kind (str): ``'linear'``, ``'conv'`` or ``'matmul'``.
        max_tokens (int | None): tokens kept per Linear call (all steps together).
        max_instances (int | None): instances kept per Linear call.
        max_windows (int | None): attention windows/images kept per MatMul call.
        conv (nn.Conv2d | None): the convolution whose inputs are unfolded
            (``kind='conv'``).
    """

    def __init__(self, kind, max_tokens=2048, max_instances=16, max_windows=64, conv=None):
        super().__init__()
        self.kind = kind
        self.unfold = None if conv is None else dict(
            kernel_size=conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
            stride=conv.stride)
        self.max_tokens = max_tokens
        self.max_instances = max_instances
        self.max_windows = max_windows

    def record(self, inputs):
        exp = expected_steps()
        if self.kind in ('linear', 'conv'):
            x = inputs[0].detach().float()
            if self.kind == 'conv':
                x = F.unfold(x, **self.unfold).transpose(1, 2)     # (B, L, C k k)
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])
            ntok = x3.shape[0] * x3.shape[1]
            if x.dim() == 2:
                # rows are instances of one token (IGQ's view of a head or an
                # RoI FC input): thin them by the token budget
                x3 = x3[::_stride(x3.shape[0], _share(self.max_tokens, exp))]
            else:
                # the instance cap belongs to a token budget: without one (the
                # papers' setting) a batch of 32 images keeps all 32, exactly as
                # 32 batches of one do
                cap = None if self.max_tokens is None else self.max_instances
                x3 = x3[::_stride(x3.shape[0], cap)]
                x3 = x3[:, ::_stride(x3.shape[1],
                                     _share(_share(self.max_tokens, exp), x3.shape[0]))]
            return to_store(x3.clone()), ntok
        a, b = (t.detach().float() for t in inputs)
        a4 = a.reshape(-1, *a.shape[-3:]) if a.dim() >= 4 else a.reshape(-1, 1, *a.shape[-2:])
        b4 = b.reshape(-1, *b.shape[-3:]) if b.dim() >= 4 else b.reshape(-1, 1, *b.shape[-2:])
        step = _stride(a4.shape[0], _share(self.max_windows, exp))
        return to_store(a4[::step].clone()), to_store(b4[::step].clone()), a4.shape[0]

    def data(self, device=None):
        """Linear: list of ``(I, T, C)`` tensors (calls differ in T); MatMul:
        concatenated ``(a, b)``; on ``device`` (default: where stored)."""
        recs = self.ordered()

        def move(t):
            return t if device is None else t.to(device)
        if self.kind in ('linear', 'conv'):
            return [move(r[0]) for r in recs]
        return move(torch.cat([r[0] for r in recs])), move(torch.cat([r[1] for r in recs]))

    def units_per_step(self):
        """Average tokens (Linear) or windows (MatMul) per calibration step."""
        if self.empty:
            return 0
        steps = len({k[0] for k in self.records})
        return sum(r[-1] for r in self.records.values()) / steps

    def clear(self):
        self.records = {}


def attach_search_cache(module, kind, **kwargs):
    """Cache ``module``'s inputs during calibration (forward pre-hook)."""
    cache = SearchCache(kind, **kwargs)

    def hook(mod, inputs):
        if getattr(mod, '_mmvq_caching', False):
            cache.update(inputs)

    module._mmvq_cache = cache
    module._mmvq_caching = True
    module._mmvq_cache_handle = module.register_forward_pre_hook(hook)
    return cache


def detach_search_cache(module):
    handle = getattr(module, '_mmvq_cache_handle', None)
    if handle is not None:
        handle.remove()
    for attr in ('_mmvq_cache', '_mmvq_caching', '_mmvq_cache_handle'):
        if hasattr(module, attr):
            delattr(module, attr)


def iter_search_caches(model):
    for name, module in model.named_modules():
        cache = getattr(module, '_mmvq_cache', None)
        if isinstance(cache, SearchCache):
            yield name, cache


def is_linear(module):
    return isinstance(module, nn.Linear)

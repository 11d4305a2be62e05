"""IGQ-ViT group-size allocation under a bit-operation (BOP) budget.

The paper (Sec. 3.3) chooses each layer's group count "to minimize the
discrepancies between predictions from quantized and full-precision models
under a BOP constraint". Its exact measure and solver are not public; ours:

* **Candidates** ``G in {4, 8, 12, 16}`` by default (only ``G <= channels``
  for channel grouping).
* **Sensitivity** of layer ``l`` at ``G``: the relative output error of that
  layer alone, ``||f(Q_G(X)) - f(X)||^2 / ||f(X)||^2`` on its cached float
  inputs (the Linear with its quantized weight, or ``attn @ V`` with V
  quantized), the group quantizer re-fitted with ``G`` groups on the same
  calibration statistics. A per-layer proxy for the prediction discrepancy
  (deliberate difference: the paper measures at the model output, which costs
  one forward per layer and candidate).
* **BOP** of layer ``l``: ``MACs * b_w * b_a + G * outputs * b_acc`` — the
  integer MACs plus one ``b_acc``-bit (32) accumulation/rescale per group and
  output element for the per-group partial sums (channel groups) or the
  per-row group selection (softmax rows); MACs from the tokens actually seen
  per calibration image.
* **Budget**: the BOPs of every layer at ``budget_groups`` (8 or 12, the
  papers' averages). **Solver**: exact multiple-choice knapsack by dynamic
  programming over the budget discretised into ``resolution`` units
  (minimise the summed sensitivity subject to the budget).

The chosen counts and the achieved BOPs vs the budget are logged and kept in
:attr:`IGQAllocation.report`. Cached inputs: every calibration token and
window on an accelerator; on CPU (documented deviation) 1024 tokens per
Linear and 32 windows per MatMul (:mod:`mmvq.calibration.budget`).
"""
import numpy as np
import torch
import torch.nn.functional as F

from ...modules.base import module_device
from ...modules.linear import QuantLinear
from ...modules.matmul import QuantMatMul
from ...registry import SEARCHES
from ...utils.progress import progress_iter
from ..budget import model_device
from ..cache import attach_search_cache
from ..search import BaseSearch


def _allocatable(q):
    """An enabled quantizer whose group count the allocation may choose (IGQ)."""
    return getattr(q, 'allocates_groups', False) and q.enabled


def _fixed_grid(q):
    """An enabled quantizer with one (scale, zero point) grid: its operand is
    quantized as the layer will see it and counts ``q.bits`` in the BOPs."""
    return getattr(q, 'affine', False) and q.enabled


def solve_mckp(costs, losses, budget, resolution=2000):
    """Exact multiple-choice knapsack on discretised costs.

    Args:
        costs (list[list[float]]): per layer, cost of each option.
        losses (list[list[float]]): per layer, loss of each option.
        budget (float): total cost allowed.
        resolution (int): budget units.

    Returns:
        list[int]: chosen option index per layer (cheapest options if the
        budget cannot be met).
    """
    unit = budget / resolution
    inf = float('inf')
    dp = np.zeros(resolution + 1)
    choice = []
    for c_opts, l_opts in zip(costs, losses):
        new = np.full(resolution + 1, inf)
        arg = np.full(resolution + 1, -1, dtype=np.int64)
        for k, (c, loss) in enumerate(zip(c_opts, l_opts)):
            w = int(np.ceil(c / unit - 1e-9))
            if w > resolution:
                continue
            cand = np.full(resolution + 1, inf)
            cand[w:] = dp[:resolution + 1 - w] + loss
            better = cand < new
            new[better], arg[better] = cand[better], k
        dp = new
        choice.append(arg)
    if not np.isfinite(dp[-1]):
        return [int(np.argmin(c)) for c in costs]
    picks, b = [], resolution
    for layer in range(len(costs) - 1, -1, -1):
        k = int(choice[layer][b])
        picks.append(k)
        b -= int(np.ceil(costs[layer][k] / unit - 1e-9))
    return picks[::-1]


@SEARCHES.register_module(name='igq_allocation')
class IGQAllocation(BaseSearch):
    """Allocate IGQ group counts per layer (search stage).

    Args:
        candidates (Sequence[int]): group counts to choose from.
        budget_groups (int): the average group count whose BOPs are the budget.
        acc_bits (int): accumulator bits in the group overhead term.
        max_tokens (int | None): cached tokens per Linear (accelerator
            preset: all; CPU: 1024).
        max_windows (int | None): cached attention windows per MatMul
            (accelerator: all; CPU: 32).
        resolution (int): budget discretisation of the solver.
        budget_preset (str): ``'auto'``, ``'accelerator'`` (the reference's
            budgets on any device) or ``'cpu'``.
    """

    name = 'igq_allocation'
    PRESETS = dict(cpu=dict(max_tokens=1024, max_windows=32),
                   accelerator=dict(max_tokens=None, max_windows=None))

    def __init__(self, candidates=(4, 8, 12, 16), budget_groups=8, acc_bits=32, max_tokens=None,
                 max_windows=None, resolution=2000, budget_preset='auto'):
        self.candidates = tuple(sorted(candidates))
        self.budget_groups = budget_groups
        self.acc_bits = acc_bits
        self._explicit = dict(max_tokens=max_tokens, max_windows=max_windows)
        self._preset = budget_preset
        self.resolution = resolution
        self.report = {}
        self.set_device('cpu')


    def targets(self, model):
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear) and _allocatable(m.input_quantizer):
                yield name, m, 'linear'
            elif isinstance(m, QuantMatMul) and _allocatable(m.a_quantizer):
                yield name, m, 'matmul'

    def attach(self, model):
        self.set_device(model_device(model))
        for _, m, kind in self.targets(model):
            if kind == 'matmul':
                attach_search_cache(m, 'matmul', max_windows=self.max_windows)
            else:
                attach_search_cache(m, 'linear', max_tokens=self.max_tokens)

    @staticmethod
    def _refit(q, groups):
        return q.regrouped(groups)

    def _layer_options(self, m, q, cache):
        opts = []
        dev = module_device(m)
        if isinstance(m, QuantLinear):
            xs = cache.data(dev)
            wq = m.weight_quantizer
            w = wq.fake_quant(m.weight) if _fixed_grid(wq) else m.weight
            refs = [F.linear(x, m.weight, m.bias) for x in xs]
            energy = sum(r.pow(2).sum() for r in refs)
            units = m.in_features
            macs = cache.units_per_step() * m.in_features * m.out_features
            outputs = cache.units_per_step() * m.out_features
            b_w = wq.bits if _fixed_grid(wq) else 32

            def err(g):
                return sum((F.linear(g.fake_quant(x), w, m.bias) - r).pow(2).sum()
                           for x, r in zip(xs, refs)) / energy
        else:
            a, b = cache.data(dev)
            bq = m.b_quantizer
            b_hat = bq.fake_quant(b) if _fixed_grid(bq) else b
            ref = a @ b
            energy = ref.pow(2).sum()
            units = None
            win = cache.units_per_step()
            heads, n, mdim, d = a.shape[1], a.shape[2], a.shape[3], b.shape[3]
            macs = win * heads * n * mdim * d
            outputs = win * heads * n * d
            b_w = bq.bits if _fixed_grid(bq) else 32

            def err(g):
                return (g.fake_quant(a) @ b_hat - ref).pow(2).sum() / energy
        for groups in self.candidates:
            if units is not None and groups > units:
                continue
            bop = macs * b_w * q.bits + groups * outputs * self.acc_bits
            opts.append((groups, float(bop), float(err(self._refit(q, groups)))))
        return opts

    def run(self, model, log):
        layers = []
        with torch.no_grad():
            for name, m, kind in progress_iter(list(self.targets(model)), 'IGQ allocation'):
                cache = getattr(m, '_mmvq_cache', None)
                if cache is None or cache.empty:
                    continue
                q = m.a_quantizer if kind == 'matmul' else m.input_quantizer
                layers.append((name, m, q, self._layer_options(m, q, cache)))
        self.detach(model)                    # the caches' memory before the solver
        if not layers:
            return
        budget = 0.0
        for _, _, _, opts in layers:
            at = [o for o in opts if o[0] <= self.budget_groups] or opts[:1]
            budget += at[-1][1]
        picks = solve_mckp([[o[1] for o in opts] for *_, opts in layers],
                           [[o[2] for o in opts] for *_, opts in layers], budget, self.resolution)
        used = 0.0
        chosen = {}
        for (name, m, q, opts), k in zip(layers, picks):
            groups, bop, _ = opts[k]
            fitted = self._refit(q, groups)
            q.num_groups = groups
            for buf in ('centres', 'scale', 'zero_point'):
                q._set_buffer(buf, getattr(fitted, buf))
            q.calibrated.fill_(True)
            chosen[name] = groups
            used += bop
        mean_g = float(np.mean(list(chosen.values())))
        self.report = dict(groups=chosen, bops=used, budget=budget, mean_groups=mean_g)
        log(f'[mmvq] IGQ allocation: {len(chosen)} layers, mean G={mean_g:.2f}, '
            f'BOPs {used:.4g} / budget {budget:.4g} ({100 * used / budget:.1f}%)')

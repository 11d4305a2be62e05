"""Block reconstruction: AdaRound weight rounding (+ LSQ activation scales,
QDrop) learned block by block on the block-output error (``block_recon``).

The last search stage of the 4- and 3-bit recipes, after the observers and
the other searches have set every quantization parameter. References:

* **AdaLog "Retrain"** (GoatWu/AdaLog ``utils/block_recon.py::BlockReconstructor``,
  ``quantizers/adaround.py``), the classification default: units are the
  patch embedding, every ViT/Swin block, every PatchMerging and the
  classifier head; each unit's **float inputs** (the reference's ``raw``
  mode) and float outputs are recorded on 1,024 images; 20,000 Adam steps
  per unit on batches of 32 drawn at random; loss
  ``||f_q(x) - f(x)||_2^2`` summed over dim 1, averaged over the rest, / 10
  (KL divergence of the softmaxes for the head) plus the AdaRound
  regulariser ``lambda * sum(1 - |2 h(V) - 1|^beta)`` with ``lambda = 0.01``,
  ``beta`` from 20 to 2 linearly after a warm-up of 20 % of the steps, during
  which the regulariser is off; ``h(V) = clamp(sigmoid(V) (zeta - gamma) +
  gamma, 0, 1)``, ``zeta = 1.1``, ``gamma = -0.1``, ``V`` initialised so
  ``h(V)`` equals the fractional part of ``w / s`` (so the hard rounding
  starts as round-to-nearest). ``V`` learns with Adam at PyTorch's default
  rate (1e-3); activation scales (``learn_act_scale``) with Adam at 4e-5 and
  a cosine schedule to 0. After the last step the rounding is hard
  (``V >= 0``).
* **APHQ-ViT detection** (QDrop mode, 256 COCO images), the detection
  default: the same, with QDrop (Wei et al., ICLR'22): during reconstruction
  each activation quantizer's output is replaced, element by element with
  probability ``drop_prob = 0.5``, by its float input.

What is learned: the rounding of every **uniform weight quantizer** inside a
unit (Linear / Conv2d weights) and, with ``learn_act_scale``, the scale of
every **uniform activation quantizer** inside it (the zero point stays).
Log quantizers (AdaLog, LIS), PTF and IGQ groups keep their calibrated
parameters; during reconstruction their outputs pass gradients straight
through (``y = q(x) + x - sg(x)``: identity gradient, where the reference's
``round_ste`` also passes zero outside the clipping range); a learned uniform
quantizer uses the reference's form ``(clamp(round_ste(x / s) + z) - z) s``.

The result is folded: each weight becomes ``(clamp(floor(w/s) + [V >= 0] +
z, qmin, qmax) - z) s``, whose codes under the unchanged weight quantizer
are exactly the learned integers (``round`` of an integer times ``s`` divided
by ``s`` is that integer), so the quantized forward, ``--save-quantized`` /
``--load-quantized`` and the deploy exports need nothing new; learned
activation scales are written into the quantizers' ``scale`` buffers.

Deliberate differences (also in ``results.json`` -> ``calibration.searches``):

* The CPU preset runs ``iters=300`` steps per unit instead of 20,000
  (``budget_preset='accelerator'`` or ``iters=20000`` restores it), and
  without QDrop unless ``drop_prob`` is given (at 300 steps a rounding
  learned on half-float blocks lost 0.5 box AP on the tiny detector against
  none); images stay the reference's (1,024 / 256, capped at the split's
  size).
* APHQ ranks blocks by a Hessian-guided loss (``optim_metric=
  'hessian_perturb'``); here every unit uses the plain output MSE above.
* A model without a known unit type (a custom backbone) gets none: the stage
  reports that and changes nothing.

Devices and ranks: unit inputs/outputs are recorded with the model in float
mode, kept on the host (``store_device='cpu'``, default) or on the model's
device (``'same'``), and moved a batch at a time to the model's device; units
are recorded in as few passes over the images as fit in ``store_mb``. Under
a distributed launcher every rank records its share of the images, the
records are gathered in image order, and every rank runs the same seeded
optimisation on the same data: identical results on every rank and for any
world size.
"""
import fnmatch
import math
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from ..adapters import model_task
from ..modes import set_quant_mode
from ..modules.base import module_device
from ..modules.layernorm import QuantLayerNorm
from ..modules.softmax import QuantSoftmax
from ..quantizers.base import BaseQuantizer
from ..quantizers.uniform import UniformQuantizer
from ..registry import SEARCHES
from ..utils.progress import progress_bar
from .driver import _to_host, _world
from .search import BaseSearch

ZETA, GAMMA = 1.1, -0.1
# classification: AdaLog's BlockReconstructor (1,024 images, batches of 32);
# detection: APHQ-ViT (256 COCO images, QDrop); its batch size is not in our
# reference notes: 2 images a step (a 1333x800 Swin stage-1 block holds
# ~17k tokens an image; 32 would not fit an accelerator's memory with autograd)
TASK_DEFAULTS = dict(classification=dict(images=1024, drop_prob=0.0, batch_size=32),
                     detection=dict(images=256, drop_prob=0.5, batch_size=2))
OTHER_DEFAULTS = dict(images=None, drop_prob=0.0, batch_size=32)


# --------------------------------------------------------------- learnables
class AdaRoundWeight(nn.Module):
    """Learned rounding of one weight under a uniform weight quantizer.

    Takes the quantizer's place during reconstruction:
    ``(clamp(floor(w/s) + h + z, qmin, qmax) - z) s`` with ``h = h(V)`` (soft)
    or ``[V >= 0]`` (hard).

    Args:
        quantizer (UniformQuantizer): the calibrated weight quantizer.
        weight (Tensor): the float weight.
    """

    mode = 'quant'
    enabled = True

    def __init__(self, quantizer, weight):
        super().__init__()
        self.__dict__['quantizer'] = quantizer          # not a child: no second state_dict entry
        w = weight.detach()
        self.s = quantizer._view(quantizer.scale, w).detach().clone()
        self.z = quantizer._view(quantizer.zero_point, w).detach().clone()
        x = torch.div(w, self.s)
        self.floor = torch.floor(x)
        rest = (x - self.floor).clamp(0, 1)
        self.alpha = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.soft = True

    def h(self):
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def codes(self):
        """The hard integers ``c`` (``w_hat = c s``), float."""
        q = self.quantizer
        up = (self.alpha.detach() >= 0).to(self.floor.dtype)
        return torch.clamp(self.floor + up + self.z, q.qmin, q.qmax) - self.z

    def forward(self, w):
        if not self.soft:
            return self.codes() * self.s
        q = self.quantizer
        return (torch.clamp(self.floor + self.h() + self.z, q.qmin, q.qmax) - self.z) * self.s

    def regulariser(self, beta):
        return (1 - (self.h() - 0.5).abs().mul(2).pow(beta)).sum()


def _round_ste(x):
    return x + (torch.round(x) - x).detach()


class TrainableActivation(nn.Module):
    """An activation quantizer during reconstruction: straight-through
    gradients, an optional learned scale (uniform quantizers) and QDrop.

    Args:
        quantizer (BaseQuantizer): the calibrated quantizer it stands for.
        learn_scale (bool): learn the scale (uniform quantizers only).
        drop_prob (float): QDrop probability of keeping an element float.
        generator (torch.Generator): draws the QDrop masks.
    """

    mode = 'quant'
    enabled = True

    def __init__(self, quantizer, learn_scale, drop_prob, generator):
        super().__init__()
        self.__dict__['quantizer'] = quantizer
        self.learn = bool(learn_scale) and isinstance(quantizer, UniformQuantizer)
        if self.learn:
            self.scale = nn.Parameter(quantizer.scale.detach().clone())
        self.drop_prob = float(drop_prob)
        self.generator = generator
        self.drop = False

    def forward(self, x, inplace=False):
        q = self.quantizer
        if self.learn:
            s, z = q._view(self.scale, x), q._view(q.zero_point, x)
            y = (torch.clamp(_round_ste(x / s) + z, q.qmin, q.qmax) - z) * s
        else:
            with torch.no_grad():
                y = q(x.detach())
            y = y + (x - x.detach()) if x.requires_grad else y
        if self.drop and self.drop_prob > 0:
            keep = torch.rand(x.shape, generator=self.generator, device=x.device) < self.drop_prob
            y = torch.where(keep, x, y)
        return y


def _is_weight_slot(parent, attr):
    return attr == 'weight_quantizer'


def _integer_owner(parent):
    """Modules whose forward reads their quantizers' internals (FQ-ViT's
    integer LayerNorm and Log-Int-Softmax): their quantizers stay in place."""
    return (isinstance(parent, QuantLayerNorm) and getattr(parent, 'integer', False)) or \
        isinstance(parent, QuantSoftmax)


# ------------------------------------------------------------------- units
def _has_uniform_weight(unit):
    return any(isinstance(getattr(m, 'weight_quantizer', None), UniformQuantizer)
               and m.weight_quantizer.enabled for m in unit.modules())


def find_units(model):
    """``(name, module, kind)`` of the backbone's units, in forward order:
    patch embedding, blocks, patch merging (the adapter's
    :meth:`~mmvq.adapters.base.BaseAdapter.blocks`) holding a uniform weight
    quantizer; the units outside the backbone are :func:`outer_units`."""
    from ..adapters import find_adapter
    backbone = getattr(model, 'backbone', None)
    prefix = 'backbone' if isinstance(backbone, nn.Module) else ''
    backbone = backbone if prefix else model
    try:
        adapter = find_adapter(backbone)
    except Exception:  # noqa: BLE001 - a backbone no adapter knows: no units
        return []
    units = [(n, m, k) for n, m, k in adapter.blocks(backbone, prefix) if _has_uniform_weight(m)]
    return units


class _Record:
    """Inputs and outputs of one unit's calls, grouped so calls of equal
    shape (every image of a classifier) are one batch along dim 0."""

    def __init__(self):
        self.calls = {}          # key -> (in_leaves, in_spec, out_leaves)
        self.groups = []

    def add(self, key, args, kwargs, output, store):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        out_leaves, _ = pytree.tree_flatten(output)
        self.calls[key] = ([_store(v, store) for v in leaves], spec,
                           [_store(v, store) for v in out_leaves if torch.is_tensor(v)])

    def nbytes(self):
        return sum(t.numel() * t.element_size() for leaves, _, outs in self.calls.values()
                   for t in list(leaves) + list(outs) if torch.is_tensor(t))

    def build(self):
        """Group the calls (in key order) into concatenated batches."""
        buckets = {}
        for key in sorted(self.calls):
            leaves, spec, outs = self.calls[key]
            tensors = [t for t in leaves if torch.is_tensor(t)] + outs
            rows = tensors[0].shape[0] if tensors and tensors[0].dim() else 0
            batchable = rows > 0 and all(t.dim() and t.shape[0] == rows for t in tensors)
            sig = (str(spec), tuple(_sig(v) for v in leaves), tuple(_sig(t) for t in outs)) \
                if batchable else ('call', key)
            buckets.setdefault(sig, []).append((leaves, spec, outs, rows if batchable else 1,
                                                batchable))
        self.groups = []
        for items in buckets.values():
            leaves0, spec, outs0, _, batchable = items[0]
            if batchable:
                leaves = [torch.cat([it[0][i] for it in items]) if torch.is_tensor(v) else v
                          for i, v in enumerate(leaves0)]
                outs = [torch.cat([it[2][i] for it in items]) for i in range(len(outs0))]
                rows = sum(it[3] for it in items)
            else:
                leaves, outs, rows = leaves0, outs0, 1
            self.groups.append(dict(leaves=leaves, spec=spec, outs=outs, rows=rows,
                                    batchable=batchable))
        self.calls = {}
        return self

    @property
    def rows(self):
        return sum(g['rows'] for g in self.groups)

    def batch(self, index, device):
        """Yield ``(args, kwargs, targets, weight)`` for the global row ``index``."""
        offset = 0
        for g in self.groups:
            sel = index[(index >= offset) & (index < offset + g['rows'])] - offset
            offset += g['rows']
            if sel.numel() == 0:
                continue
            if g['batchable']:
                sel_d = sel.to(g['outs'][0].device) if g['outs'] else sel
                leaves = [v.index_select(0, sel_d).to(device) if torch.is_tensor(v) else v
                          for v in g['leaves']]
                outs = [t.index_select(0, sel_d).to(device) for t in g['outs']]
            else:
                leaves = [v.to(device) if torch.is_tensor(v) else v for v in g['leaves']]
                outs = [t.to(device) for t in g['outs']]
            args, kwargs = pytree.tree_unflatten(leaves, g['spec'])
            yield args, kwargs, outs, sel.numel()


def _sig(v):
    if torch.is_tensor(v):
        return ('T', tuple(v.shape[1:]), str(v.dtype))
    return repr(v)


def _store(v, store):
    if not torch.is_tensor(v):
        return v
    v = v.detach()
    return v.to(store, copy=True) if store is not None else v.clone()


# ---------------------------------------------------------------- the stage
class LinearTempDecay:
    """``beta``: ``start`` until ``warmup * t_max``, then linear to ``end``."""

    def __init__(self, t_max, warmup, start, end):
        self.t_max, self.start_decay = t_max, warmup * t_max
        self.start, self.end = start, end

    def __call__(self, t):
        if t < self.start_decay:
            return self.start
        rel = (t - self.start_decay) / max(1e-12, self.t_max - self.start_decay)
        return self.end + (self.start - self.end) * max(0.0, 1 - rel)


def recon_loss(pred, target, kind='mse', p=2.0):
    """The reference's loss: MSE summed over dim 1, averaged, / 10; or the
    KL divergence of the softmaxes (``'kl'``, the classifier head)."""
    if kind == 'kl':
        return F.kl_div(F.log_softmax(pred, dim=-1), F.softmax(target, dim=-1),
                        reduction='batchmean')
    d = (pred - target).abs().pow(p)
    return (d.sum(1).mean() if d.dim() > 1 else d.mean()) / 10


@SEARCHES.register_module(name='block_recon')
class BlockReconstruction(BaseSearch):
    """Block reconstruction stage (module docstring).

    Args:
        iters (int | None): steps per unit (reference 20,000; CPU preset 300).
        batch_size (int | None): rows (images, for a backbone block) per step
            (default 32 for a classifier, AdaLog's; 2 for a detector).
        images (int | None): images whose unit inputs are recorded (default:
            1,024 for a classifier, 256 for a detector, as the references;
            the PTQ session draws them from the calibration split with the
            calibration seed, so they start with the calibration images;
            hand-driven calibration uses the calibration batches).
        weight (float): regulariser weight ``lambda`` (0.01).
        b_range (tuple): ``beta`` start and end (20, 2).
        warmup (float): share of steps without the regulariser (0.2).
        lr (float): Adam rate of the rounding variables (1e-3).
        act_lr (float): Adam rate of the activation scales (4e-5, cosine).
        learn_act_scale (bool): learn uniform activation scales (True).
        drop_prob (float | None): QDrop probability (default 0 for a
            classifier, AdaLog's; 0.5 for a detector, APHQ's, 0 in the CPU
            preset).
        p (float): norm of the reconstruction loss (2).
        head_loss (str): loss of a classifier head unit, ``'kl'`` or ``'mse'``.
        units (Sequence[str] | None): name patterns (fnmatch) of the units to
            reconstruct (default all).
        seed (int): seed of the batches and QDrop masks.
        store_device (str): ``'cpu'`` (records on the host) or ``'same'``.
        store_mb (int): records kept at once; more units take more passes.
        eval_rows (int): rows the before/after block error is measured on.
        keep_best (bool): keep the calibrated rounding and scales of a unit
            whose block error (hard rounding, first ``eval_rows`` rows) the
            reconstruction raised (too few steps; never on the references'
            20,000 in our runs); recorded as ``reverted``.
        budget_preset (str): ``'auto'``, ``'cpu'`` or ``'accelerator'``.
    """

    name = 'block_recon'
    PRESETS = dict(cpu=dict(iters=300), accelerator=dict(iters=20000))

    def __init__(self, iters=None, batch_size=None, images=None, weight=0.01, b_range=(20, 2),
                 warmup=0.2, lr=1e-3, act_lr=4e-5, learn_act_scale=True, drop_prob=None, p=2.0,
                 head_loss='kl', units=None, seed=0, store_device='cpu', store_mb=4096,
                 eval_rows=256, keep_best=True, budget_preset='auto'):
        if store_device not in ('cpu', 'same'):
            raise ValueError(f"block_recon store_device={store_device!r}: use 'cpu' or 'same'")
        if head_loss not in ('kl', 'mse'):
            raise ValueError(f"block_recon head_loss={head_loss!r}: use 'kl' or 'mse'")
        if drop_prob is not None and not 0 <= drop_prob < 1:
            raise ValueError(f'block_recon drop_prob={drop_prob}: use a value in [0, 1)')
        if iters is not None and (not isinstance(iters, int) or iters < 0):
            raise ValueError(f'block_recon iters={iters!r}: use a non-negative integer')
        if images is not None and (not isinstance(images, int) or images < 1):
            raise ValueError(f'block_recon images={images!r}: use a positive integer')
        self._explicit = dict(iters=iters)
        self._preset = budget_preset
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f'block_recon batch_size={batch_size!r}: use a positive integer')
        self.batch_size = batch_size
        self.keep_best = bool(keep_best)
        self.images = images
        self.weight, self.b_range, self.warmup = float(weight), tuple(b_range), float(warmup)
        self.lr, self.act_lr = float(lr), float(act_lr)
        self.learn_act_scale = bool(learn_act_scale)
        self.drop_prob = drop_prob
        self.p, self.head_loss = float(p), head_loss
        self.unit_patterns = list(units) if units else None
        self.seed = int(seed)
        self.store_device, self.store_mb = store_device, int(store_mb)
        self.eval_rows = int(eval_rows)
        self.samples = None              # own images (drawn by the PTQ session)
        self.forward_fn = None
        self.report = None
        self._float_weights = {}
        self._qdrop_cut = None

    # ---------------------------------------------------------- set-up
    def deviations(self):
        line = super().deviations()
        if getattr(self, '_qdrop_cut', None):
            extra = f'drop_prob=0 (paper: {self._qdrop_cut}, QDrop needs its 20000 steps)'
            line = (f'{line}, {extra}' if line else
                    f"[mmvq] {self.name} ran with budgets below the paper's on "
                    f"{self.budget['device']}: {extra}")
        return line

    def wanted_images(self, task):
        """Images to record unit inputs on for a model of ``task``."""
        if self.images is not None:
            return self.images
        return TASK_DEFAULTS.get(task, {}).get('images')

    def use_samples(self, samples):
        """Record on ``samples`` (indexable) instead of the calibration images."""
        self.samples = samples

    def bind(self, samples, forward_fn):
        """The calibration images and forward (from the calibration driver)."""
        self.forward_fn = forward_fn
        if self.samples is None:
            self.samples = samples

    def targets(self, model):
        return iter(())

    def attach(self, model):
        self.set_device(module_device(model))

    def detach(self, model):
        pass

    def units(self, model):
        """Units to reconstruct: the backbone's, and with a scope beyond the
        backbone the called modules outside it; filtered by ``units``."""
        from ..conversion import resolve_scope
        scope = resolve_scope(model, (getattr(model, '_mmvq_qcfg', None) or {}).get('scope', 'auto'))
        units = find_units(model)
        if scope != 'backbone' and getattr(model, 'backbone', None) is not None:
            units += outer_units(model, self.samples, self.forward_fn)
        if self.unit_patterns:
            units = [u for u in units if any(fnmatch.fnmatch(u[0], p) for p in self.unit_patterns)]
        return units

    # ---------------------------------------------------------- recording
    def _record(self, model, units, log):
        """``{name: _Record}`` of every unit's float calls on the images."""
        rank, world = _world()
        device = module_device(model)
        store = torch.device('cpu') if self.store_device == 'cpu' else None
        n = len(self.samples)
        set_quant_mode(model, 'float')
        records = {}
        try:
            # one image with every unit recorded: the size of a record per image
            probe = {name: _Record() for name, _, _ in units}
            self._pass(model, units, probe, [0], store)
            per_image = {k: r.nbytes() for k, r in probe.items()}
            chunks, cur, size = [], [], 0
            for u in units:
                b = per_image[u[0]] * n
                if cur and size + b > self.store_mb * 2 ** 20:
                    chunks.append(cur)
                    cur, size = [], 0
                cur.append(u)
                size += b
            if cur:
                chunks.append(cur)
            for chunk in chunks:
                part = {name: _Record() for name, _, _ in chunk}
                self._pass(model, chunk, part, range(rank, n, world), store)
                if world > 1:
                    gathered = [None] * world
                    dist.all_gather_object(gathered, {k: _to_host(r.calls) for k, r in part.items()})
                    for k, r in part.items():
                        calls = {}
                        for g in gathered:
                            calls.update(g[k])
                        r.calls = {key: ([v.to(device) if torch.is_tensor(v) and store is None
                                          else v for v in c[0]], c[1],
                                         [t.to(device) if store is None else t for t in c[2]])
                                   for key, c in calls.items()}
                records.update({k: r for k, r in part.items()})
                yield chunk, records
                for name, _, _ in chunk:
                    records.pop(name, None)
        finally:
            set_quant_mode(model, 'calib')
        log(f'[mmvq] block_recon: recorded {len(units)} units on {n} images '
            f'in {len(chunks)} pass(es)')

    def _pass(self, model, units, records, positions, store):
        """Float forwards over ``positions`` recording ``units``' calls; weights
        already folded by this stage are swapped back to their float values
        for the pass (every unit sees the float model's inputs)."""
        handles, counters = [], {}
        set_quant_mode(model, 'float')
        folded = list(self._float_weights.items())
        for m, w in folded:
            m.weight.data, self._float_weights[m] = w, m.weight.data
            m.__dict__.pop('_mmvq_wq_cache', None)

        def make(name):
            def hook(mod, args, kwargs, output):
                c = counters.get(name, 0)
                counters[name] = c + 1
                records[name].add((self._pos, c), args, kwargs, output, store)
            return hook

        for name, module, _ in units:
            handles.append(module.register_forward_hook(make(name), with_kwargs=True))
        try:
            with torch.no_grad():
                for pos in positions:
                    self._pos = pos
                    counters.clear()
                    self.forward_fn(model, self.samples[pos])
        finally:
            for h in handles:
                h.remove()
            for m, _ in folded:
                m.weight.data, self._float_weights[m] = self._float_weights[m], m.weight.data
                m.__dict__.pop('_mmvq_wq_cache', None)

    # ---------------------------------------------------------- optimising
    def run(self, model, log):
        if self.forward_fn is None or self.samples is None:
            raise RuntimeError('block_recon needs the calibration data: run it through '
                               'mmvq.calibrate / run_calibration / PTQLoop')
        task = model_task(model)
        defaults = TASK_DEFAULTS.get(task, OTHER_DEFAULTS)
        drop = defaults['drop_prob'] if self.drop_prob is None else self.drop_prob
        self._qdrop_cut = None
        cpu_preset = self._preset == 'cpu' or (
            self._preset == 'auto' and torch.device(self.budget['device']).type == 'cpu')
        if self.drop_prob is None and drop > 0 and cpu_preset:
            # QDrop trains each block half float; at 300 steps the rounding stays
            # tuned to that block and the evaluated (fully quantized) one loses:
            # measured on the tiny detector, uniform W4A4 box AP 63.9 with QDrop
            # vs 64.4 without (README). The accelerator preset keeps APHQ's 0.5.
            self._qdrop_cut = drop
            drop = 0.0
        batch = defaults['batch_size'] if self.batch_size is None else self.batch_size
        self._batch = batch
        units = self.units(model)
        self.report = dict(images=len(self.samples), iters=self.iters, batch_size=batch,
                           weight=self.weight, b_range=list(self.b_range), warmup=self.warmup,
                           lr=self.lr, act_lr=self.act_lr, learn_act_scale=self.learn_act_scale,
                           drop_prob=drop, qdrop_off_on_cpu=self._qdrop_cut,
                           loss='mse/10 (kl for a classifier head)',
                           inputs='float (AdaLog raw mode)', seed=self.seed, units={})
        if not units:
            log('[mmvq] block_recon: no unit with a uniform weight quantizer: nothing to do')
            return
        t_all = time.perf_counter()
        self._float_weights = {}
        was_training = model.training
        model.eval()
        try:
            for chunk, records in self._record(model, units, log):
                for name, unit, kind in chunk:
                    rec = records[name].build()
                    t0 = time.perf_counter()
                    loss_kind = self.head_loss if (kind == 'head' and task == 'classification') \
                        else 'mse'
                    stats = self.reconstruct(unit, rec, loss_kind, drop, name)
                    stats.update(kind=kind, seconds=round(time.perf_counter() - t0, 3))
                    self.report['units'][name] = stats
                    kept = ' (kept the calibrated parameters)' if stats['reverted'] else ''
                    log(f'[mmvq] block_recon {name}: block error {stats["error_before"]:.4g} '
                        f'-> {stats["error_after"]:.4g}{kept} ({stats["rows"]} rows, '
                        f'{stats["flipped"]:.1%} of roundings changed, {stats["seconds"]:.1f} s)')
        finally:
            model.train(was_training)
            self._float_weights = {}
        self.report['seconds'] = round(time.perf_counter() - t_all, 3)

    def _error(self, unit, rec, loss_kind, device):
        """Mean reconstruction loss of ``unit`` (quant mode) on the first rows."""
        n = min(rec.rows, self.eval_rows)
        index = torch.arange(n, device='cpu')              # host-side row numbers
        total = 0.0
        with torch.no_grad():
            for args, kwargs, outs, k in rec.batch(index, device):
                pred = [t for t in pytree.tree_flatten(unit(*args, **kwargs))[0]
                        if torch.is_tensor(t)]
                total += k * sum(float(recon_loss(a, b, loss_kind, self.p))
                                 for a, b in zip(pred, outs))
        return total / max(1, n)

    @torch.enable_grad()      # also under a caller's no_grad (calibration usually runs in one)
    def reconstruct(self, unit, rec, loss_kind, drop_prob, name=''):
        """Learn one unit's rounding (and activation scales); fold them.

        Args:
            unit (nn.Module): the converted unit (quantizers calibrated).
            rec (_Record): its recorded float inputs/outputs (built).
            loss_kind (str): ``'mse'`` or ``'kl'``.
            drop_prob (float): QDrop probability.

        Returns:
            dict: rows, iterations, block error before/after (hard rounding),
            share of roundings changed from nearest, learned counts.
        """
        device = module_device(unit)
        quantizers = [(m, q) for m in unit.modules()
                      for q in (getattr(m, 'weight_quantizer', None), )
                      if isinstance(q, BaseQuantizer)]
        set_quant_mode(unit, 'quant')
        error_before = self._error(unit, rec, loss_kind, device)
        gen = torch.Generator(device=device).manual_seed(self.seed)
        cpu_gen = torch.Generator(device='cpu').manual_seed(self.seed)
        rounding, acts, swaps = [], [], []
        grads = {p: p.requires_grad for p in unit.parameters()}
        for p in grads:
            p.requires_grad_(False)
        try:
            for m, q in quantizers:
                if isinstance(q, UniformQuantizer) and q.enabled:
                    ada = AdaRoundWeight(q, m.weight)
                    swaps.append((m, 'weight_quantizer', q))
                    setattr(m, 'weight_quantizer', ada)
                    rounding.append(ada)
            for parent in list(unit.modules()):
                if _integer_owner(parent):
                    continue
                for attr, child in list(parent.named_children()):
                    if isinstance(child, BaseQuantizer) and child.enabled and \
                            not _is_weight_slot(parent, attr):
                        act = TrainableActivation(child, self.learn_act_scale, drop_prob, gen)
                        swaps.append((parent, attr, child))
                        setattr(parent, attr, act)
                        acts.append(act)
            act_scales = [a.quantizer.scale.detach().clone() if a.learn else None for a in acts]
            iters = self.iters
            w_opt = torch.optim.Adam([a.alpha for a in rounding], lr=self.lr)
            a_params = [a.scale for a in acts if a.learn]
            a_opt = torch.optim.Adam(a_params, lr=self.act_lr) if a_params else None
            a_sched = (torch.optim.lr_scheduler.CosineAnnealingLR(a_opt, T_max=max(1, iters),
                                                                  eta_min=0.0)
                       if a_opt is not None else None)
            decay = LinearTempDecay(iters, self.warmup, *self.b_range)
            for a in acts:
                a.drop = True
            bar = progress_bar(iters, f'block_recon {name}') if iters else None
            for it in range(1, iters + 1):
                index = torch.randperm(rec.rows, generator=cpu_gen, device='cpu')[:self._batch]
                w_opt.zero_grad(set_to_none=True)
                if a_opt is not None:
                    a_opt.zero_grad(set_to_none=True)
                total_rows = index.numel()
                beta = decay(it)
                for args, kwargs, outs, k in rec.batch(index, device):
                    pred = [t for t in pytree.tree_flatten(unit(*args, **kwargs))[0]
                            if torch.is_tensor(t)]
                    loss = sum(recon_loss(a, b, loss_kind, self.p) for a, b in zip(pred, outs))
                    (loss * (k / total_rows)).backward()
                if it >= decay.start_decay and rounding:
                    reg = self.weight * sum(a.regulariser(beta) for a in rounding)
                    reg.backward()
                w_opt.step()
                if a_opt is not None:
                    a_opt.step()
                    a_sched.step()
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            # fold: weights onto their learned integers, scales into buffers
            flipped, total = 0, 0
            with torch.no_grad():
                for (m, _, q), ada in zip(swaps, rounding):
                    codes = ada.codes()
                    nearest = torch.clamp(torch.round(torch.div(m.weight, ada.s)) + ada.z,
                                          q.qmin, q.qmax) - ada.z
                    flipped += int((codes != nearest).sum())
                    total += codes.numel()
                    self._float_weights[m] = m.weight.detach().clone()
                    m.weight.copy_((codes * ada.s).to(m.weight.dtype))
                for act in acts:
                    if act.learn:
                        act.quantizer.scale.copy_(act.scale.detach().clamp_min(1e-8))
        finally:
            for parent, attr, q in reversed(swaps):
                setattr(parent, attr, q)
            for p, flag in grads.items():
                p.requires_grad_(flag)
        set_quant_mode(unit, 'quant')
        error_after = self._error(unit, rec, loss_kind, device)
        reverted = self.keep_best and error_after > error_before
        if reverted:
            # worse than the calibrated parameters on the data it optimised
            # (too few steps for the annealing): keep the calibration's
            with torch.no_grad():
                for m, _, _ in swaps[:len(rounding)]:
                    m.weight.copy_(self._float_weights.pop(m))
                for act, scale in zip(acts, act_scales):
                    if act.learn:
                        act.quantizer.scale.copy_(scale)
            flipped = 0
        set_quant_mode(unit, 'calib')
        return dict(rows=rec.rows, iters=self.iters, error_before=error_before,
                    error_after=error_after, reverted=bool(reverted),
                    flipped=flipped / max(1, total),
                    weights=total, act_scales_learned=sum(1 for a in acts if a.learn),
                    loss=loss_kind)


def outer_units(model, samples, forward_fn):
    """The outermost modules outside the backbone that a forward calls and
    that hold a uniform weight quantizer (a classifier's head; a detector's
    neck, RPN head, RoI box/mask heads), in call order.

    Found by one float forward on the first image with hooks on every
    candidate; a module reached only through a method other than
    ``__call__`` (mmdet's RoI head) is replaced by its called children.
    """
    if samples is None or forward_fn is None or len(samples) == 0:
        return []
    skip = {'backbone', 'data_preprocessor'}
    cands = [(n, m) for n, m in model.named_modules()
             if n and n.split('.')[0] not in skip and _has_uniform_weight(m)]
    order, handles = [], []
    for n, m in cands:
        handles.append(m.register_forward_pre_hook(
            lambda mod, args, n=n: order.append(n) if n not in order else None))
    set_quant_mode(model, 'float')
    try:
        with torch.no_grad():
            forward_fn(model, samples[0])
    finally:
        for h in handles:
            h.remove()
        set_quant_mode(model, 'calib')
    units = []
    for n in order:
        if any(n.startswith(u + '.') for u, _, _ in units):
            continue
        units.append((n, model.get_submodule(n), 'neck' if n.split('.')[0] == 'neck' else 'head'))
    return units


__all__ = ['BlockReconstruction', 'AdaRoundWeight', 'TrainableActivation', 'recon_loss',
           'find_units', 'outer_units', 'LinearTempDecay']

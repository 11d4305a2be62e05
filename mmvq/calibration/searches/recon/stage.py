"""The ``block_recon`` search stage: record each unit's float calls, learn
its rounding (and activation scales) on the block-output error, fold them."""
import fnmatch
import time

import torch
from torch.utils import _pytree as pytree

from ....adapters import model_task, split_backbone
from ....modes import set_quant_mode
from ....modules.base import module_device
from ....quantizers.base import BaseQuantizer
from ....registry import SEARCHES
from ....utils.dist import gather_to_all, rank_world
from ....utils.progress import progress_bar
from ...search import BaseSearch
from .learn import (LinearTempDecay, TrainableActivation, integer_owner, is_weight_slot,
                    recon_loss, treatment_of)
from .record import UnitRecord
from .units import find_units, outer_units

# classification: AdaLog's BlockReconstructor (1,024 images, batches of 32);
# detection: APHQ-ViT (256 COCO images, QDrop); its batch size is not in our
# reference notes: 2 images a step (a 1333x800 Swin stage-1 block holds
# ~17k tokens an image; 32 would not fit an accelerator's memory with autograd)
TASK_DEFAULTS = dict(classification=dict(images=1024, drop_prob=0.0, batch_size=32),
                     detection=dict(images=256, drop_prob=0.5, batch_size=2))
OTHER_DEFAULTS = dict(images=None, drop_prob=0.0, batch_size=32)


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

    def attach(self, model):
        self.set_device(module_device(model))

    def units(self, model):
        """Units to reconstruct: the backbone's, and with a scope beyond the
        backbone the called modules outside it; filtered by ``units``."""
        from ....conversion import quant_state, resolve_scope
        state = quant_state(model)
        scope = resolve_scope(model, state.scope if state is not None else 'auto')
        units = find_units(model)
        if scope != 'backbone' and split_backbone(model)[0]:
            units += outer_units(model, self.samples, self.forward_fn)
        if self.unit_patterns:
            units = [u for u in units if any(fnmatch.fnmatch(u[0], p) for p in self.unit_patterns)]
        return units

    # ---------------------------------------------------------- recording
    def _record(self, model, units, log):
        """``{name: UnitRecord}`` of every unit's float calls on the images."""
        rank, world = rank_world()
        device = module_device(model)
        store = torch.device('cpu') if self.store_device == 'cpu' else None
        n = len(self.samples)
        set_quant_mode(model, 'float')
        records = {}
        try:
            # one image with every unit recorded: the size of a record per image
            probe = {name: UnitRecord() for name, _, _ in units}
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
                part = {name: UnitRecord() for name, _, _ in chunk}
                self._pass(model, chunk, part, range(rank, n, world), store)
                if world > 1:
                    gathered = gather_to_all({k: r.calls for k, r in part.items()})
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
            rec (UnitRecord): its recorded float inputs/outputs (built).
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
                rounding_cls = treatment_of(q).weight
                if rounding_cls is not None and q.enabled:
                    ada = rounding_cls(q, m.weight)
                    swaps.append((m, 'weight_quantizer', q))
                    setattr(m, 'weight_quantizer', ada)
                    rounding.append(ada)
            for parent in list(unit.modules()):
                if integer_owner(parent):
                    continue
                for attr, child in list(parent.named_children()):
                    if isinstance(child, BaseQuantizer) and child.enabled and \
                            not is_weight_slot(parent, attr):
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


__all__ = ['BlockReconstruction', 'TASK_DEFAULTS']

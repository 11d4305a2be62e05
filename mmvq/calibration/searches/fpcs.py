"""Fast Progressive Combining Search (AdaLog, ECCV'24, Sec. 3.3).

Reference: GoatWu/AdaLog ``quant_layers/linear.py::PostGeluLogBasedBatchingQuantLinear
.activation_fpcs`` and ``quant_layers/matmul.py::PostSoftmaxAsymmetricallyBatchingQuantMatMul``.
Layers are searched one at a time on their **layer-output MSE** against the
float output, with float inputs (the reference's parallel, not sequential,
calibration). All candidates of a stage are evaluated as one batched tensor
(chunked to bound memory), never in a Python loop over candidates.

* **Post-GELU AdaLog (fc2 input)**, as the reference: the scale starts at
  the second-to-last of ``eq_n=128`` points between ``lo`` and ``hi`` (the
  0.9 and 1.0 nearest-rank percentiles of the *positive* inputs, plus the
  shift); rank the bases ``q in 10..137`` (the reference evaluates the first
  ``eq_n`` of its 129) at the current scale and keep the best
  ``base_num=8``; combine them with ``scale_num=16`` scales
  ``linspace(lo, hi)`` (128 candidates), keep ``width=32``; then
  ``steps-1=5`` rounds *replace* every survivor by 4 scales
  ``s + (linspace(0,1,4) - 0.5) * delta`` (``delta`` from the grid step,
  shrinking by 3.5 per round), keeping the best 32 (the best 1 in the last
  round). With ``search_weights`` this alternates with the weights for
  ``rounds`` rounds, each ranking the bases at the previous round's scale.
* **Post-softmax AdaLog (attn @ V)**: scale fixed at 1; V starts at its
  grid's second-to-last candidate (the reference's ``candidates[-2]``);
  ``rounds=3`` times: search ``q`` over ``10..137`` on the matmul output (V
  quantized), then V's per-head range.
* **Uniform Linear inputs (per-tensor)**, as the reference's
  ``AsymmetricallyBatchingQuantLinear``: a (scale, zero point) grid —
  ``min(16, 2^b)`` zero points x ``128 / that`` scales over the 0.9..1.0
  percentile span — searched by FPCS (``uniform_width`` survivors, 6 steps)
  first on the input's own error, then on the Linear's output error (with
  ``search_weights``, alternating with the weights for ``rounds`` rounds).

Budgets by device (:mod:`mmvq.calibration.budget`): on an accelerator the
reference's — every calibration token and attention window, every row in
each candidate's loss, 16 uniform survivors. On CPU (deliberate, recorded
difference): 512 cached tokens per Linear and 32 attention windows per
MatMul (all calibration images together), rows thinned so one candidate
costs about 2^24 MACs (at least 32 rows), and 8 uniform survivors; in the
attention-matmul searches (``q @ k^T`` and attn @ V) the query rows of every
cached map are strided so one candidate costs at most 2^26 MACs
(``matmul_macs_per_candidate``; the candidate grids still come from every
row). The tiny models and Swin's 7x7 windows stay below that bound (nothing
thinned); a ViT-S/14 at 224 px (32 maps x 6 heads x 257 queries) keeps every
13th query row, which takes its AdaLog FPCS from hours to minutes on 2 cores.
* Per-head V ranges use the same grid, scored per head; with
  ``search_attention=True`` (AdaLog's blocks) V, and ``q`` / ``k`` of
  ``q @ k^T``, get the reference's per-head (scale, zero point) grid and
  FPCS instead (``AsymmetricallyBatchingQuantMatMul``), both starting at
  their grid's second-to-last candidate, alternating A and B for ``rounds``
  rounds on the product's error.

* **LayerNorm scale reparameterization** (``reparam_ln=True``; AdaLog's
  and RepQ-ViT's handling of qkv / fc1 / reduction inputs): before the
  uniform search of such an input, per-channel ranges are folded into the
  preceding LayerNorm and the Linear (:mod:`mmvq.calibration.reparam`), and
  the search runs on the reparameterized inputs.

* **Weights** (``search_weights=True``; AdaLog's
  ``AsymmetricallyBatchingQuantLinear.weight_fpcs``): per output channel,
  an asymmetric (scale, zero point) grid — ``min(16, 2^(b-1))`` zero points
  around the middle code x ``128 / that`` scales spanning the 0.9..1.0
  percentile ranges of the channel — ranked first by the channel's own
  weight error, then, alternating with the input search for ``rounds``
  rounds, by the channel's output error with the quantized input; FPCS
  keeps 16 per channel and expands each into 8 scales around it, the step
  shrinking by 7.5 per round. Output channels are independent, so one
  batched evaluation scores every channel's candidates at once.
  Deliberate difference (``weight_minmax_zero_points``, default on): the
  same scales are also tried with the zero points around each channel's
  min-max zero point, which the reference's middle codes cannot reach for a
  one-sided row (:meth:`FPCS._search_weights`).

  A Conv2d's weight (the patch embedding) is searched the same way on its
  unfolded input rows, once, ranked by the output error — the reference's
  convolution with an 8-bit input, which it leaves in float.

Without ``search_weights`` weights keep their per-output-channel min-max
parameters.

**Per quantizer class** (:data:`FPCS_STRATEGIES`): at each site — a Linear's
input, a matmul's left operand, a Conv2d's weight — the stage asks the
:class:`FPCSStrategy` registered for the quantizer there whether and how to
search it: :class:`AffineFPCS` (uniform quantizers: the (scale, zero point)
searches above, which apply to any ``free_affine`` quantizer) and
:class:`AdaLogFPCS` (the base / scale searches). A quantizer class without a
strategy is left as its observers calibrated it.
"""
import torch
import torch.nn.functional as F

from ...modules.base import module_device
from ...modules.linear import QuantConv2d, QuantLinear
from ...modules.matmul import QuantMatMul
from ...quantizers.adalog import AdaLogQuantizer
from ...adapters import model_task
from ...quantizers.uniform import UniformQuantizer, affine_params, fake_quant_affine
from ...registry import SEARCHES
from ...utils.classmap import ClassMap
from ...utils.progress import progress_iter
from ..budget import model_device
from ..cache import attach_search_cache
from ..grid import positive_percentiles, row_fpcs, row_grid, self_losses
from ..reparam import ln_linear_pairs, reparameterize
from ..search import BaseSearch

CHUNK_ELEMS = 1 << 25


def minmax_centred_zero_points(w, scales, zps, num_zp, qmax):
    """``(scales, zps)`` of :func:`.grid.row_grid` extended by the same scales
    with the ``num_zp`` zero points around each row's min-max zero point
    ``round(-min / s_mm)`` (shifted to stay in ``[0, qmax]``).

    Args:
        w (Tensor): ``(R, N)`` rows.
        scales, zps (Tensor): ``(K, R)`` reference candidates, ``K`` a
            multiple of ``num_zp`` (``num_zp`` blocks of the same scales).
    """
    lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
    s_mm = ((hi - lo) / qmax).clamp(min=1e-8)
    centre = torch.round(-lo / s_mm).clamp(0, qmax)
    first = (centre - num_zp // 2).clamp(min=0, max=max(0, qmax + 1 - num_zp))
    offs = torch.arange(num_zp, dtype=w.dtype, device=w.device)
    per = scales.shape[0] // num_zp
    extra_zp = (first[None] + offs[:, None]).clamp(max=qmax).repeat_interleave(per, dim=0)
    return torch.cat([scales, scales]), torch.cat([zps, extra_zp])


class FPCSStrategy:
    """What FPCS searches for one quantizer class (register an instance in
    :data:`FPCS_STRATEGIES`). Each site's ``*_kind`` returns ``None`` (not
    searched) or the kind the report counts; ``search(fpcs, module, kind,
    data)`` then sets the quantizer's parameters and returns its report entry
    (a dict). Both get the :class:`FPCS` stage (its budgets and settings).

    Sites, each asked of the strategy of the quantizer that sits there: a
    Linear's **input** quantizer (``linear_input_kind(fpcs, q)``; ``search``
    gets ``x``, the cached ``(R, C)`` float inputs, reparameterized and
    row-thinned by the stage), the left operand of a quantized **matmul**
    (``matmul_kind(fpcs, matmul)``; ``search`` gets ``(a, b)``) and a Conv2d's
    **weight** (``conv_weight_kind(fpcs, conv)``; ``search`` gets the cached
    unfolded input rows). The (scale, zero point) searches of FPCS itself
    apply to any ``free_affine`` quantizer; a strategy chooses which of them
    (or its own search) runs at its sites.
    """

    def linear_input_kind(self, fpcs, q):
        return None

    def matmul_kind(self, fpcs, m):
        return None

    def conv_weight_kind(self, fpcs, m):
        return None

    def search(self, fpcs, m, kind, data):
        """Search module ``m``'s quantizer(s) of ``kind``; returns the report entry."""
        raise NotImplementedError(f'{type(self).__name__}.search')


#: per quantizer class (subclasses inherit): its FPCS search
FPCS_STRATEGIES = ClassMap('FPCS strategy',
                           'register one with mmvq.calibration.FPCS_STRATEGIES.register('
                           '<class>, <FPCSStrategy>)')


def strategy_of(q):
    """The :class:`FPCSStrategy` of ``q`` (``None`` for a quantizer FPCS does not search)."""
    return FPCS_STRATEGIES.get(q) if q is not None else None


LINEAR_KINDS = ('adalog_linear', 'uniform_linear')
LOGGED_KINDS = LINEAR_KINDS + ('adalog_matmul', 'uniform_matmul', 'conv_weight', 'reparam', 'weights')


def _site(m):
    if isinstance(m, QuantLinear):
        return 'linear_input'
    return 'matmul' if isinstance(m, QuantMatMul) else 'conv_weight'


def _active(q):
    """An enabled quantizer FPCS knows (its operand is quantized as the layer sees it)."""
    return strategy_of(q) is not None and q.enabled


def _weight(module):
    wq = module.weight_quantizer
    if _active(wq) and wq.is_calibrated():
        return wq.fake_quant(module.weight)
    return module.weight


def _quantile(x, qs, cap=1 << 20):
    flat = x.reshape(-1)
    if flat.numel() > cap:
        flat = flat[::-(-flat.numel() // cap)]
    return torch.quantile(flat, torch.as_tensor(qs, dtype=flat.dtype, device=flat.device))


def _batched_losses(make, n, per_cand_elems, loss):
    """Evaluate ``loss(make(lo, hi))`` for candidates ``lo:hi`` in chunks."""
    chunk = max(1, CHUNK_ELEMS // max(1, per_cand_elems))
    return torch.cat([loss(make(i, min(n, i + chunk))) for i in range(0, n, chunk)])


@SEARCHES.register_module(name='fpcs')
class FPCS(BaseSearch):
    """FPCS search stage for :func:`mmvq.calibration.run_calibration`.

    Args:
        steps (int): progressive rounds (reference: 6).
        rounds (int): alternations of the post-softmax base / V search (3).
        base_num (int): bases kept after ranking (8).
        scale_num (int): scales per base (16).
        width (int): survivors per round for AdaLog (32).
        uniform_width (int | None): survivors for uniform inputs (reference
            16; CPU preset 8).
        max_tokens (int | None): cached tokens per Linear (``None`` in the
            accelerator preset: all; CPU preset 512).
        max_windows (int | None): cached attention windows per MatMul
            (accelerator: all; CPU: 32).
        search_uniform (bool): also search uniform per-tensor Linear inputs.
        macs_per_candidate (int | None): row budget of one Linear candidate
            evaluation (accelerator: every row; CPU: 2^24 MACs).
        matmul_macs_per_candidate (int | None): query-row budget of one
            attention-matmul candidate evaluation (accelerator: every row;
            CPU: 2^26 MACs).
        min_rows (int): fewest rows kept per Linear.
        search_weights (bool): FPCS over every searched Linear's per-channel
            weight parameters, alternating with its input search (AdaLog).
        weight_candidates (int): weight candidates per channel (``eq_n``, 128).
        weight_width (int): weight survivors per channel and round (16).
        weight_minmax_zero_points (bool): add to the reference's weight grid
            the same scales with the ``min(16, 2^(b-1))`` zero points around
            each channel's own min-max zero point (deliberate difference, see
            :meth:`_search_weights`); ``False``: the reference grid alone.
        search_attention (bool): per-head FPCS of the uniform attention
            operands — ``q`` and ``k`` of ``q @ k^T`` and V after an AdaLog
            softmax — on the matmul output, alternating (AdaLog).
        reparam_ln (bool): fold per-channel scales of post-LayerNorm Linear
            inputs into the LayerNorm first (RepQ-ViT / AdaLog).
        include_padded (bool | None): also a Swin ``qkv`` behind window
            padding (changes padded tokens; exact only without padding).
            ``None``: for classifiers (the reference, whose maps are
            multiples of the window), not for detectors.
        budget_preset (str): ``'auto'`` (the preset of the model's device),
            ``'accelerator'`` (the reference's budgets on any device) or
            ``'cpu'``.

    Arguments left ``None`` take the preset of the model's device
    (:data:`PRESETS`); the values used are in :attr:`budget`.
    """

    name = 'fpcs'
    PRESETS = dict(cpu=dict(max_tokens=512, max_windows=32, uniform_width=8,
                            macs_per_candidate=1 << 24, matmul_macs_per_candidate=1 << 26),
                   accelerator=dict(max_tokens=None, max_windows=None, uniform_width=16,
                                    macs_per_candidate=None, matmul_macs_per_candidate=None))

    def __init__(self, steps=6, rounds=3, base_num=8, scale_num=16, width=32, uniform_width=None,
                 max_tokens=None, max_windows=None, search_uniform=True, macs_per_candidate=None,
                 matmul_macs_per_candidate=None,
                 min_rows=32, reparam_ln=False, include_padded=None, search_weights=False,
                 weight_candidates=128, weight_width=16, search_attention=False,
                 weight_minmax_zero_points=True, budget_preset='auto'):
        self.steps = steps
        self.rounds = rounds
        self.base_num = base_num
        self.scale_num = scale_num
        self.width = width
        self._explicit = dict(uniform_width=uniform_width, max_tokens=max_tokens,
                              max_windows=max_windows, macs_per_candidate=macs_per_candidate,
                              matmul_macs_per_candidate=matmul_macs_per_candidate)
        self._preset = budget_preset
        self.search_uniform = search_uniform
        self.min_rows = min_rows
        self.reparam_ln = reparam_ln
        self.search_weights = search_weights
        self.weight_candidates = weight_candidates
        self.weight_width = weight_width
        self.weight_minmax_zero_points = weight_minmax_zero_points
        self.search_attention = search_attention
        self.include_padded = include_padded
        self.report = {}
        self.set_device('cpu')


    # ------------------------------------------------------------ targets
    def targets(self, model):
        """``(name, module, kind, strategy)`` of every site a registered
        :class:`FPCSStrategy` searches, in module order."""
        for name, m in model.named_modules():
            kind, q = None, None
            if isinstance(m, QuantLinear):
                q = m.input_quantizer
                if _active(q):
                    kind = strategy_of(q).linear_input_kind(self, q)
            elif isinstance(m, QuantMatMul):
                q = m.a_quantizer
                if _active(q):
                    kind = strategy_of(q).matmul_kind(self, m)
            elif isinstance(m, QuantConv2d) and self.search_weights:
                q = m.weight_quantizer
                if _active(q):
                    kind = strategy_of(q).conv_weight_kind(self, m)
            if kind:
                yield name, m, kind, strategy_of(q)

    def attach(self, model):
        self.set_device(model_device(model))
        for _, m, kind, _ in self.targets(model):
            site = _site(m)
            if site == 'matmul':
                attach_search_cache(m, 'matmul', max_windows=self.max_windows)
            elif site == 'conv_weight':
                attach_search_cache(m, 'conv', max_tokens=self.max_tokens, conv=m)
            else:
                attach_search_cache(m, 'linear', max_tokens=self.max_tokens)

    def run(self, model, log):
        n = {'adalog_linear': 0, 'uniform_linear': 0, 'adalog_matmul': 0, 'reparam': 0,
             'conv_weight': 0, 'uniform_matmul': 0}
        lns = {}
        if self.reparam_ln:
            padded = self.include_padded
            if padded is None:        # exact only where windows are never padded
                padded = model_task(model) == 'classification'
            lns = {lin: ln for _, ln, lin, _ in ln_linear_pairs(model, padded)}
        for name, m, kind, strategy in progress_iter(list(self.targets(model)), 'FPCS'):
            cache = getattr(m, '_mmvq_cache', None)
            if cache is None or cache.empty:
                continue
            dev = module_device(m)
            with torch.no_grad():
                if _site(m) == 'linear_input':
                    data = torch.cat([t.reshape(-1, t.shape[-1]) for t in cache.data(dev)])
                    if name in lns:
                        r, b = reparameterize(lns[name], m, data)
                        data = data.div_(r).sub_(b)
                        n['reparam'] += 1
                    data = self._rows(m, data)
                    if kind in LINEAR_KINDS and self.search_weights and self._weight_searchable(m):
                        n['weights'] = n.get('weights', 0) + 1
                else:
                    data = cache.data(dev)
                self.report[name] = strategy.search(self, m, kind, data)
            n[kind] = n.get(kind, 0) + 1
        other = sum(v for k, v in n.items() if k not in LOGGED_KINDS)
        log(f'[mmvq] FPCS: {n["adalog_linear"]} post-GELU AdaLog, {n["adalog_matmul"]} '
            f'post-softmax AdaLog, {n["uniform_linear"]} uniform Linear inputs'
            + (f', {n["uniform_matmul"]} q @ k^T' if self.search_attention else '')
            + (f', {other} by registered strategies' if other else '')
            + (f' ({n["reparam"]} reparameterized into their LayerNorm)' if self.reparam_ln else '')
            + (f', weights of {n.get("weights", 0)} Linears and {n["conv_weight"]} Conv2ds'
               if self.search_weights else ''))

    def _search_linear(self, m, x, kind):
        """The built-in searches of a Linear's input (``kind`` in
        :data:`LINEAR_KINDS`), alternating with its weight where both apply."""
        if self.search_weights and self._weight_searchable(m):
            return self._search_linear_alternating(m, x, kind)
        if kind == 'adalog_linear':
            return self._search_adalog_linear(m, x)
        self._search_uniform_linear(m, x, own=True)
        return self._search_uniform_linear(m, x)

    # ------------------------------------------------------------ linear
    def _rows(self, m, x):
        """Evenly strided rows so one candidate costs about ``macs_per_candidate``."""
        if self.macs_per_candidate is None:
            return x
        cap = max(self.min_rows, self.macs_per_candidate // m.weight.numel())
        return x[::max(1, -(-x.shape[0] // cap))]

    def _query_rows(self, a, b):
        """Evenly strided query rows (dim -2) of the left operand ``a`` so that
        one candidate of ``a @ b`` costs at most ``matmul_macs_per_candidate``."""
        budget = self.matmul_macs_per_candidate
        macs = a.numel() * b.shape[-1]
        if budget is None or macs <= budget:
            return a
        return a[..., ::-(-macs // budget), :]

    def _linear_objective(self, m, x):
        w = _weight(m)
        ref = F.linear(x, m.weight, m.bias)
        rows, cout = ref.shape

        def loss(fq):                        # fq: (K, R, C)
            return (F.linear(fq, w, m.bias) - ref).pow(2).mean(dim=(1, 2))
        return loss, rows * max(x.shape[1], cout)

    def _search_adalog_linear(self, m, x, init=True):
        """Post-GELU AdaLog input of a Linear: the reference's
        ``PostGeluLogBasedBatchingQuantLinear.activation_fpcs``.

        ``(lo, hi)``: the 0.9 and 1.0 nearest-rank percentiles of the
        *positive* inputs, plus the shift. ``init`` first sets the scale the
        bases are ranked at to the reference's start, the second-to-last of
        ``eq_n`` scales from ``lo`` to ``hi`` (later rounds rank at the
        previous round's scale). Bases ``q`` in ``10 .. 10 + eq_n - 1`` are
        ranked on the output error and the best ``base_num`` kept; each is
        paired with ``scale_num`` scales ``linspace(lo, hi)``, the best
        ``width`` kept; ``steps - 1`` rounds then *replace* every survivor by
        ``eq_n / width`` scales ``s + (linspace(0, 1, n) - 0.5) d`` (``d``
        from the grid step, shrinking by ``n - 0.5`` per round), keeping the
        best ``width`` (the best one in the last round).
        """
        q = m.input_quantizer
        loss_fn, elems = self._linear_objective(m, x)

        def evaluate(qs, scales):
            return _batched_losses(lambda i, j: q.fake_quant_candidates(x, qs[i:j], scales[i:j]),
                                   len(qs), elems, loss_fn)

        def best(qs, scales, k):
            keep = evaluate(qs, scales).topk(min(k, len(qs)), largest=False).indices
            return qs[keep], scales[keep]

        dev, n = x.device, self.weight_candidates
        lo, hi = positive_percentiles(x, (0.9, 1.0)) + q.shift
        if init:
            q.set_params(scale=lo + (hi - lo) * (n - 2) / (n - 1))
        qs = torch.arange(q.q_candidates[0], min(q.q_candidates[1] + 1, q.q_candidates[0] + n),
                          dtype=torch.float32, device=dev)
        bases, _ = best(qs, q.scale.expand_as(qs), self.base_num)
        grid = lo + (hi - lo) * torch.linspace(0, 1, self.scale_num, device=dev)
        cq, cs = best(bases.repeat_interleave(self.scale_num), grid.repeat(len(bases)), self.width)
        delta, new_cnt = (hi - lo) / (self.scale_num - 1), max(1, n // self.width)
        for r in range(self.steps - 1):
            offs = (torch.linspace(0, 1, new_cnt, device=dev) - 0.5) * delta
            delta = delta / (new_cnt - 0.5)
            cq, cs = best(cq.repeat_interleave(new_cnt), (cs[:, None] + offs).reshape(-1),
                          1 if r == self.steps - 2 else self.width)
        q.set_params(q=int(cq[0]), scale=cs[0])
        return dict(kind='adalog', q=int(cq[0]), scale=float(cs[0]))

    # ----------------------------------------------------------- weights
    @staticmethod
    def _weight_searchable(m):
        wq = m.weight_quantizer
        return (getattr(wq, 'free_affine', False) and wq.enabled and wq.ch_axis == 0
                and not wq.symmetric)

    def _search_weights(self, m, x_hat, ref):
        """Per-channel weight (scale, zero point) by FPCS (:mod:`.grid`):
        ranked by each channel's own error (``x_hat=None``), else by its
        output error with the (quantized) input rows ``x_hat`` (a
        convolution's weight as the ``(C_out, C_in k k)`` matrix of its
        unfolded input).

        Deliberate difference (``weight_minmax_zero_points``): the
        reference's zero points are the middle ``min(16, 2^(b-1))`` codes,
        which cannot represent a channel whose range is one-sided — e.g. a
        ``qkv`` / ``fc1`` row after the LayerNorm reparameterization has
        moved a DINOv2 outlier channel (``r`` up to 25) into one column.
        Its min-max zero point is then near code 0 or ``2^b - 1`` and every
        candidate clips the outlier (DINOv2-S block 0 ``fc1`` at W6A6, input
        quantized: output SQNR 11.1 dB searched vs 26.5 dB min-max). The
        same scales are therefore also tried with the zero points around
        each channel's min-max zero point; on rows the reference grid fits,
        its candidates are among them and the search can only do better.
        """
        wq = m.weight_quantizer
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        qmax = 2 ** wq.bits - 1
        num_zp = min(16, 2 ** (wq.bits - 1))
        scales, zps, delta = row_grid(w, wq.bits, num_zp, self.weight_candidates)
        if self.weight_minmax_zero_points:
            scales, zps = minmax_centred_zero_points(w, scales, zps, num_zp, qmax)
        if x_hat is None:
            losses = self_losses(w, wq.bits)
        else:
            def losses(sc, zp):                                          # (K, Cout)
                per = max(1, CHUNK_ELEMS // max(1, w.numel() + x_hat.shape[0] * w.shape[0]))
                out = []
                for i in range(0, len(sc), per):
                    wh = fake_quant_affine(w[None], sc[i:i + per, :, None], zp[i:i + per, :, None],
                                           0, qmax)                        # (k, Cout, Cin)
                    y = torch.matmul(x_hat[None], wh.transpose(1, 2))
                    if m.bias is not None:
                        y = y + m.bias
                    out.append((y - ref[None]).pow(2).mean(dim=1))
                return torch.cat(out)
        sc, zp = row_fpcs(scales, zps, delta, losses, self.weight_candidates, self.weight_width,
                          self.steps)
        wq.set_params(sc, zp)

    def _search_conv_weights(self, m, recs):
        """AdaLog's ``AsymmetricallyBatchingQuantConv2d.hyperparameter_searching``
        with an input of 8 bits or more (the patch embedding: ``qconv_a_bit=8``
        leaves it float): one weight FPCS ranked by the output error, the
        input as the layer sees it."""
        x = self._rows(m, torch.cat([t.reshape(-1, t.shape[-1]) for t in recs]))
        w = m.weight.reshape(m.weight.shape[0], -1)
        ref = F.linear(x, w, m.bias)
        iq = m.input_quantizer
        x_hat = iq.fake_quant(x) if _active(iq) and iq.ch_axis is None and iq.is_calibrated() \
            else x
        self._search_weights(m, x_hat, ref)
        return dict(kind='conv-weight', rows=int(x.shape[0]),
                    weight_scale_mean=float(m.weight_quantizer.scale.mean()))

    def _search_linear_alternating(self, m, x, kind):
        """AdaLog's ``hyperparameter_searching``: weights on their own error,
        then for a uniform input (``AsymmetricallyBatchingQuantLinear``) the
        input on its own error and ``rounds`` x (weights, input) on the
        output; for a post-GELU AdaLog input
        (``PostGeluLogBasedBatchingQuantLinear``) ``rounds`` x (input,
        weights) on the output."""
        ref = F.linear(x, m.weight, m.bias)
        iq = m.input_quantizer
        self._search_weights(m, None, ref)
        if kind == 'uniform_linear':
            report = self._search_uniform_linear(m, x, own=True)
            for _ in range(self.rounds):
                self._search_weights(m, iq.fake_quant(x), ref)
                report = self._search_uniform_linear(m, x)
        else:
            for r in range(self.rounds):
                report = self._search_adalog_linear(m, x, init=r == 0)
                self._search_weights(m, iq.fake_quant(x), ref)
        wq = m.weight_quantizer
        return dict(report, weight_scale_mean=float(wq.scale.mean()))

    def _uniform_grid(self, x, n_lo=16, n_hi=8):
        ps = torch.linspace(0.9, 1.0, max(n_lo, n_hi), device=x.device)
        his = _quantile(x, ps[-n_hi:])
        los = _quantile(x, 1 - ps[-n_lo:])
        return torch.cartesian_prod(los, his)

    def _search_uniform_linear(self, m, x, own=False):
        """Per-tensor asymmetric (scale, zero point) of a Linear's input by
        AdaLog's grid and FPCS (``calculate_percentile_activation_candidates``
        / ``activation_fpcs``: ``min(16, 2^b)`` zero points x ``eq_n / that``
        scales over the input's 0.9..1.0 percentile span, scales at least
        1e-4), ranked by the input's own error (``own``) or by the output
        error with the (quantized) weight."""
        q = m.input_quantizer
        t = x.reshape(1, -1)
        if t.shape[1] > 1 << 24:                     # torch.quantile's size limit
            t = t[:, ::-(-t.shape[1] // (1 << 24))]
        scales, zps, delta = row_grid(t, q.bits, min(16, 2 ** q.bits), self.weight_candidates)
        scales = scales.clamp(min=1e-4)
        if own:
            losses = self_losses(t, q.bits)
        else:
            loss_fn, elems = self._linear_objective(m, x)

            def losses(sc, zp):                                          # (K, 1)
                def make(i, j):
                    return fake_quant_affine(x[None], sc[i:j, :, None], zp[i:j, :, None],
                                             q.qmin, q.qmax)
                return _batched_losses(make, len(sc), elems, loss_fn)[:, None]
        sc, zp = row_fpcs(scales, zps, delta, losses, self.weight_candidates,
                          self.uniform_width, self.steps)
        q.set_params(sc, zp)
        return dict(kind='uniform', scale=float(sc[0]), zero_point=float(zp[0]))

    # ----------------------------------------------------------- softmax
    def _search_softmax(self, m, a, b):
        aq, bq = m.a_quantizer, m.b_quantizer
        a = self._query_rows(a, b)         # attention rows are independent
        ref = a @ b
        elems = ref.numel() + a.numel()
        qs = torch.arange(aq.q_candidates[0],
                          min(aq.q_candidates[1] + 1, aq.q_candidates[0] + self.weight_candidates),
                          dtype=torch.float32, device=a.device)
        b_grid = None
        if self.search_attention and self._head_searchable(bq):
            b_grid = self._head_grid(b, bq)            # depends on V only: once
            self._head_init(bq, b_grid)
        for _ in range(self.rounds):
            b_hat = bq.fake_quant(b) if _active(bq) and bq.is_calibrated() else b

            def make(i, j):
                return aq.fake_quant_candidates(a, qs[i:j], aq.scale.expand(j - i))

            losses = _batched_losses(make, len(qs), elems,
                                     lambda fa: (fa @ b_hat - ref).pow(2).mean(dim=tuple(range(1, fa.dim()))))
            aq.set_params(q=int(qs[losses.argmin()]))
            if self.search_attention and self._head_searchable(bq):
                a_hat = aq.fake_quant(a)
                self._head_fpcs(b, bq, b_grid, lambda fb: a_hat[None] @ fb, ref)
            elif getattr(bq, 'free_affine', False) and bq.enabled:
                self._search_v(aq.fake_quant(a), b, ref, bq)
        return dict(kind='adalog-softmax', q=int(aq.q))

    # ------------------------------------------------------ attention matmuls
    @staticmethod
    def _head_searchable(q):
        return (getattr(q, 'free_affine', False) and q.enabled and q.ch_axis == 1
                and not q.symmetric)

    def _head_grid(self, x, q):
        """AdaLog's per-head (scale, zero point) grid of operand ``x``
        (``(W, H, ., .)``; ``AsymmetricallyBatchingQuantMatMul
        .calculate_percentile_candidates``): ``min(16, 2^(b-1))`` zero points
        x ``eq_n / that`` scales over each head's 0.9..1.0 percentile span."""
        heads = x.shape[1]
        t = x.transpose(0, 1).reshape(heads, -1)
        if t.shape[1] > 1 << 20:                     # torch.quantile's size limit
            t = t[:, ::-(-t.shape[1] // (1 << 20))]
        return row_grid(t, q.bits, min(16, 2 ** (q.bits - 1)), self.weight_candidates)

    @staticmethod
    def _head_init(q, grid):
        """The reference's start before its alternating search: the
        second-to-last candidate of the grid (``candidates[-2]``)."""
        scales, zps, _ = grid
        q.set_params(scales[-2], zps[-2])

    def _head_fpcs(self, x, q, grid, product, ref):
        """Per-head (scale, zero point) of operand ``x`` by FPCS on its
        :meth:`_head_grid` ``grid`` (``AsymmetricallyBatchingQuantMatMul._fpcs``:
        16 kept, 6 steps), each head ranked by the error of its part of
        ``product(x_hat)`` against ``ref``."""
        heads = x.shape[1]
        scales, zps, delta = grid
        qmax = 2 ** q.bits - 1
        per = max(1, CHUNK_ELEMS // max(1, ref.numel() + x.numel()))

        def losses(sc, zp):                                              # (K, H)
            out = []
            for i in range(0, len(sc), per):
                shape = (-1, 1, heads) + (1, ) * (x.dim() - 2)
                fx = fake_quant_affine(x[None], sc[i:i + per].reshape(shape),
                                       zp[i:i + per].reshape(shape), 0, qmax)
                err = (product(fx) - ref[None]).pow(2)
                out.append(err.mean(dim=(1, ) + tuple(range(3, err.dim()))))
            return torch.cat(out)

        sc, zp = row_fpcs(scales, zps, delta, losses, self.weight_candidates,
                          self.weight_width, self.steps)
        q.set_params(sc, zp)

    def _search_matmul(self, m, a, b):
        """AdaLog's ``AsymmetricallyBatchingQuantMatMul.hyperparameter_searching``
        (``q @ k^T``): ``rounds`` times, A's per-head parameters with B
        quantized, then B's with A quantized, on the product's error."""
        aq, bq = m.a_quantizer, m.b_quantizer
        a_grid, b_grid = self._head_grid(a, aq), self._head_grid(b, bq)   # once per operand
        a = self._query_rows(a, b)         # the losses on strided query rows (CPU budget)
        ref = a @ b
        self._head_init(aq, a_grid)
        self._head_init(bq, b_grid)
        for _ in range(self.rounds):
            b_hat = bq.fake_quant(b)
            self._head_fpcs(a, aq, a_grid, lambda fa: fa @ b_hat[None], ref)
            a_hat = aq.fake_quant(a)
            self._head_fpcs(b, bq, b_grid, lambda fb: a_hat[None] @ fb, ref)
        return dict(kind='uniform-matmul', a_scale_mean=float(aq.scale.mean()),
                    b_scale_mean=float(bq.scale.mean()))

    def _search_v(self, a_hat, b, ref, bq):
        """Per-head (or per-tensor) uniform range of V on the attn @ V output."""
        heads = b.shape[1] if bq.ch_axis == 1 else 1
        bh = b.transpose(0, 1).reshape(heads, -1) if heads > 1 else b.reshape(1, -1)
        grids = torch.stack([self._uniform_grid(bh[h]) for h in range(heads)], 1)   # (K, H, 2)

        def per_head_loss(c):                                           # c: (K, H, 2)
            s, z = affine_params(c[..., 0], c[..., 1], bq.bits, bq.symmetric)
            shape = (len(c), 1, heads if heads > 1 else 1, 1, 1)
            fb = fake_quant_affine(b[None], s.reshape(shape), z.reshape(shape), bq.qmin, bq.qmax)
            err = (a_hat[None] @ fb - ref[None]).pow(2)
            return err.mean(dim=(1, 3, 4)) if heads > 1 else err.mean(dim=(1, 2, 3, 4))[:, None]

        chunk = max(1, CHUNK_ELEMS // max(1, ref.numel() + b.numel()))
        losses = torch.cat([per_head_loss(grids[i:i + chunk]) for i in range(0, len(grids), chunk)])
        best = grids.gather(0, losses.argmin(0)[None, :, None].expand(1, heads, 2))[0]
        bq.set_range(best[:, 0], best[:, 1])


class AffineFPCS(FPCSStrategy):
    """Uniform quantizers: AdaLog's (scale, zero point) searches — a
    per-tensor Linear input, per-head ``q @ k^T`` operands
    (``search_attention``), per-channel Conv2d weights (``search_weights``)."""

    def linear_input_kind(self, fpcs, q):
        return 'uniform_linear' if fpcs.search_uniform and q.ch_axis is None else None

    def matmul_kind(self, fpcs, m):
        if fpcs.search_attention and fpcs._head_searchable(m.a_quantizer) \
                and fpcs._head_searchable(m.b_quantizer):
            return 'uniform_matmul'
        return None

    def conv_weight_kind(self, fpcs, m):
        return 'conv_weight' if fpcs._weight_searchable(m) else None

    def search(self, fpcs, m, kind, data):
        if kind == 'uniform_matmul':
            return fpcs._search_matmul(m, *data)
        if kind == 'conv_weight':
            return fpcs._search_conv_weights(m, data)
        return fpcs._search_linear(m, data, kind)


class AdaLogFPCS(FPCSStrategy):
    """AdaLog quantizers: the base and scale of a post-GELU Linear input, the
    base of a post-softmax attn @ V operand (with V's range)."""

    def linear_input_kind(self, fpcs, q):
        return 'adalog_linear'

    def matmul_kind(self, fpcs, m):
        return 'adalog_matmul'

    def search(self, fpcs, m, kind, data):
        if kind == 'adalog_matmul':
            return fpcs._search_softmax(m, *data)
        return fpcs._search_linear(m, data, kind)


FPCS_STRATEGIES.register(UniformQuantizer, AffineFPCS())
FPCS_STRATEGIES.register(AdaLogQuantizer, AdaLogFPCS())

__all__ = ['FPCS', 'FPCSStrategy', 'FPCS_STRATEGIES', 'strategy_of']

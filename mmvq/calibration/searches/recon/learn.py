"""What block reconstruction learns: AdaRound weight rounding, trainable
(LSQ / QDrop) activation quantizers, the per-quantizer-class treatment
(:data:`RECON_TREATMENTS`), the regulariser's temperature and the loss
(see :mod:`mmvq.calibration.searches.recon`)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ....modules.layernorm import QuantLayerNorm
from ....modules.softmax import QuantSoftmax
from ....quantizers.uniform import UniformQuantizer
from ....utils.classmap import ClassMap

ZETA, GAMMA = 1.1, -0.1


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


class ReconTreatment:
    """What block reconstruction does with one quantizer class.

    Args:
        weight (type | None): in a weight slot, the module that stands for
            the quantizer while the rounding is learned —
            ``weight(quantizer, float_weight)`` with ``forward(w)``, a learnable
            ``alpha``, ``regulariser(beta)``, ``codes()`` and ``soft`` (see
            :class:`AdaRoundWeight`); ``None``: the weight stays as calibrated.
        learn_scale (bool): as an activation quantizer, its ``scale`` is learned
            with ``learn_act_scale`` (LSQ; needs ``affine``); otherwise its
            output passes gradients straight through.
    """

    def __init__(self, weight=None, learn_scale=False):
        self.weight = weight
        self.learn_scale = bool(learn_scale)


#: per quantizer class (subclasses inherit): what reconstruction learns for it;
#: classes without an entry are kept as calibrated (straight-through gradients)
RECON_TREATMENTS = ClassMap('reconstruction treatment',
                            'register one with mmvq.calibration.RECON_TREATMENTS.register('
                            '<class>, ReconTreatment(...))')
RECON_TREATMENTS.register(UniformQuantizer, ReconTreatment(weight=AdaRoundWeight,
                                                           learn_scale=True))
_KEEP = ReconTreatment()


def treatment_of(quantizer):
    """The :class:`ReconTreatment` of ``quantizer`` (keep as calibrated if none)."""
    return RECON_TREATMENTS.get(quantizer, _KEEP)


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
        self.learn = bool(learn_scale) and treatment_of(quantizer).learn_scale
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


def is_weight_slot(parent, attr):
    return attr == 'weight_quantizer'


def integer_owner(parent):
    """Modules whose forward reads their quantizers' internals (FQ-ViT's
    integer LayerNorm and Log-Int-Softmax): their quantizers stay in place."""
    return (isinstance(parent, QuantLayerNorm) and getattr(parent, 'integer', False)) or \
        isinstance(parent, QuantSoftmax)


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


__all__ = ['AdaRoundWeight', 'TrainableActivation', 'ReconTreatment', 'RECON_TREATMENTS',
           'treatment_of', 'LinearTempDecay', 'recon_loss', 'ZETA', 'GAMMA']

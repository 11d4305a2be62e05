"""Block reconstruction (``block_recon``): AdaRound weight rounding (+ LSQ activation scales,
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
from .learn import (GAMMA, RECON_TREATMENTS, ZETA, AdaRoundWeight, LinearTempDecay, ReconTreatment,
                    TrainableActivation, recon_loss, treatment_of)
from .stage import BlockReconstruction
from .units import find_units, has_learnable_weight, outer_units

__all__ = ['BlockReconstruction', 'AdaRoundWeight', 'TrainableActivation', 'ReconTreatment',
           'RECON_TREATMENTS', 'treatment_of', 'recon_loss', 'find_units', 'outer_units',
           'has_learnable_weight', 'LinearTempDecay', 'ZETA', 'GAMMA']

"""Calibration search stages (``quant.searches``, registered in ``SEARCHES``).

One module (or package) per stage, each a :class:`~mmvq.calibration.search.BaseSearch`:

* :mod:`.fpcs` — AdaLog's Fast Progressive Combining Search, dispatched per
  quantizer class through :data:`~.fpcs.FPCS_STRATEGIES`;
* :mod:`.igq_alloc` — IGQ-ViT's group-count allocation under a BOP budget
  (for quantizers that declare ``allocates_groups``);
* :mod:`.recon` — block reconstruction (AdaRound + LSQ / QDrop): unit
  discovery, recording, the learned parts (per quantizer class:
  :data:`~.recon.RECON_TREATMENTS`) and the stage.
"""
from .fpcs import FPCS, FPCS_STRATEGIES, FPCSStrategy, strategy_of
from .igq_alloc import IGQAllocation, solve_mckp
from .recon import RECON_TREATMENTS, BlockReconstruction, ReconTreatment

__all__ = ['FPCS', 'FPCS_STRATEGIES', 'FPCSStrategy', 'strategy_of', 'IGQAllocation',
           'solve_mckp', 'BlockReconstruction', 'RECON_TREATMENTS', 'ReconTreatment']

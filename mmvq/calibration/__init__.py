"""Calibration: the driver, its search stages (``SEARCHES``: FPCS, IGQ
allocation, block reconstruction; :mod:`.searches`), LayerNorm/bias
reparameterization and calibration samples.

Extension points: a new stage subclasses :class:`BaseSearch` and registers in
``mmvq.SEARCHES``; a new quantizer class tells FPCS what to search
(:data:`FPCS_STRATEGIES`) and reconstruction what to learn
(:data:`RECON_TREATMENTS`)."""
from .data import CalibrationSamples
from .driver import (finish_calibration, initialise_parameters, observe, run_calibration,
                     sync_observers)
from .reparam import fold_adalog_shifts
from .search import BaseSearch, build_search
from .searches import (FPCS, FPCS_STRATEGIES, RECON_TREATMENTS, BlockReconstruction, FPCSStrategy,
                       IGQAllocation, ReconTreatment, solve_mckp)

__all__ = ['run_calibration', 'observe', 'sync_observers', 'initialise_parameters',
           'finish_calibration', 'fold_adalog_shifts', 'BaseSearch', 'build_search', 'FPCS',
           'IGQAllocation', 'solve_mckp', 'CalibrationSamples', 'BlockReconstruction',
           'FPCS_STRATEGIES', 'FPCSStrategy', 'RECON_TREATMENTS', 'ReconTreatment']

"""Calibration: the driver, its search stages (``SEARCHES``: FPCS, IGQ
allocation), LayerNorm/bias reparameterization and calibration samples."""
from .data import CalibrationSamples
from .driver import (finish_calibration, initialise_parameters, observe, run_calibration,
                     sync_observers)
from .fpcs import FPCS
from .igq_alloc import IGQAllocation, solve_mckp
from .recon import BlockReconstruction
from .reparam import fold_adalog_shifts
from .search import BaseSearch, build_search

__all__ = ['run_calibration', 'observe', 'sync_observers', 'initialise_parameters',
           'finish_calibration', 'fold_adalog_shifts', 'BaseSearch', 'build_search', 'FPCS',
           'IGQAllocation', 'solve_mckp', 'CalibrationSamples', 'BlockReconstruction']

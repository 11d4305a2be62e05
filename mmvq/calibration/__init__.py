"""Calibration: driver, search stages (FPCS, IGQ allocation), PTQ loop."""
from .driver import initialise_parameters, observe, run_calibration, sync_observers
from .fpcs import FPCS, make_search
from .igq_alloc import IGQAllocation, solve_mckp

__all__ = ['run_calibration', 'observe', 'sync_observers', 'initialise_parameters', 'FPCS',
           'IGQAllocation', 'make_search', 'solve_mckp']

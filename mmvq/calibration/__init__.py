"""Calibration: driver, search stages (FPCS, IGQ allocation), PTQ loop."""
from .driver import initialise_parameters, observe, run_calibration, sync_observers
from .fpcs import FPCS, make_search
from .igq_alloc import IGQAllocation, solve_mckp

__all__ = ['run_calibration', 'observe', 'sync_observers', 'initialise_parameters', 'FPCS',
           'IGQAllocation', 'make_search', 'solve_mckp']
from .data import CalibrationSamples  # noqa: E402
from .loop import PTQLoop, validate_qcfg  # noqa: E402

__all__ += ['CalibrationSamples', 'PTQLoop', 'validate_qcfg']
from .wrapper import InferenceOnlyWrapper  # noqa: E402

__all__ += ['InferenceOnlyWrapper']

"""Quantizers: pure tensor math with buffers, registered in ``QUANTIZERS``."""
from .adalog import AdaLogQuantizer
from .base import BaseQuantizer, check_bits
from .igq import IGQQuantizer
from .lis import LogIntSoftmax
from .ptf import PTFQuantizer
from .uniform import UniformQuantizer

__all__ = ['BaseQuantizer', 'check_bits', 'UniformQuantizer', 'PTFQuantizer',
           'LogIntSoftmax', 'AdaLogQuantizer', 'IGQQuantizer']

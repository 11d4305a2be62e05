"""Runner integration: ``mmvq.PTQLoop`` (``tools/ptq.py``), ``mmvq.PTQHook``
(a user's own ``tools/test.py``), the session they share, and reports."""
from .hook import PTQHook
from .loop import PTQLoop
from .report import PhaseMeter, build_results, write_results
from .session import PTQSession
from .wrapper import InferenceOnlyWrapper

__all__ = ['PTQLoop', 'PTQHook', 'PTQSession', 'PhaseMeter', 'build_results', 'write_results',
           'InferenceOnlyWrapper']

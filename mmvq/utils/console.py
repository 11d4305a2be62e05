"""A console for what a user acts on; everything else goes to the log file.

mmengine's Runner logs the environment (with PyTorch's whole build
configuration), the full config and the hook order at INFO level, to the
console and to ``<work_dir>/<timestamp>/<timestamp>.log``. ``tools/ptq.py``
and ``tools/analyze.py`` keep all of it in the log file and show on the
console only mmvq's own lines, metric lines, warnings and errors
(``--verbose`` shows everything, as mmdet's ``tools/test.py`` does).
"""
import logging

from mmengine.runner import Runner

CONSOLE_KEEP = ('[mmvq]', 'Epoch(test)')


class ConsoleFilter(logging.Filter):
    """Let warnings, errors and lines containing one of ``keep`` through."""

    def __init__(self, keep=CONSOLE_KEEP):
        super().__init__()
        self.keep = tuple(keep)

    def filter(self, record):
        if record.levelno >= logging.WARNING:
            return True
        msg = record.msg if isinstance(record.msg, str) else str(record.msg)
        return any(k in msg for k in self.keep)


def quiet_console(logger, keep=CONSOLE_KEEP):
    """Filter the console handlers of ``logger`` (file handlers keep all)."""
    for handler in logger.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler,
                                                                         logging.FileHandler):
            if not any(isinstance(f, ConsoleFilter) for f in handler.filters):
                handler.addFilter(ConsoleFilter(keep))
    return logger


class QuietConsoleRunner(Runner):
    """mmengine's Runner whose console shows only :data:`CONSOLE_KEEP` lines,
    warnings and errors; its log file keeps everything."""

    def build_logger(self, log_level='INFO', log_file=None, **kwargs):
        return quiet_console(super().build_logger(log_level, log_file, **kwargs))

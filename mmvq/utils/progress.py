"""Progress bars for long work: rank 0 only, and only on a terminal.

A tqdm bar redraws itself with carriage returns; written to a log file or a
CI transcript it becomes one long line per bar, so bars are shown only when
stderr is a terminal (``MMVQ_PROGRESS=1`` forces them, ``0`` hides them).
"""
import os
import sys


def _show():
    forced = os.environ.get('MMVQ_PROGRESS')
    if forced is not None:
        return forced not in ('0', '', 'false', 'False')
    from mmengine.dist import is_main_process
    return is_main_process() and sys.stderr.isatty()


def progress_bar(total, desc):
    """A tqdm bar of ``total`` steps, or None where none should be drawn."""
    if not _show():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def progress_iter(items, desc):
    """``items`` wrapped in a tqdm bar where one should be drawn."""
    if len(items) < 2 or not _show():
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, leave=False, dynamic_ncols=True)

"""Console entry points ``mmvq-ptq``, ``mmvq-export`` and ``mmvq-analyze``.

Each runs the matching user tool (``tools/ptq.py``, ``tools/export.py``,
``tools/analyze.py``) with the same arguments, from the installed package's
``mmvq/.mim/tools`` (a wheel install) or the checkout's ``tools/`` (editable), so
that the command line is the same as ``python tools/ptq.py ...`` in a checkout::

    mmvq-ptq my_cfg.py model.pth --work-dir work_dirs/x --calib-images 32
"""
import importlib.util
import os.path as osp
import sys

from .utils.config import mim_root


def _run(tool):
    """Load ``tools/<tool>.py`` as a module (its folder on ``sys.path``: the tools
    import each other) and call its ``main()``; usage and errors name the command."""
    folder = osp.join(mim_root(), 'tools')
    spec = importlib.util.spec_from_file_location(tool, osp.join(folder, tool + '.py'))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, folder)
    sys.modules[tool] = module
    sys.argv[0] = f'mmvq-{tool}'
    spec.loader.exec_module(module)
    return module.main()


def ptq():
    """``mmvq-ptq``: ``tools/ptq.py`` (FP vs quantized evaluation)."""
    return _run('ptq')


def export():
    """``mmvq-export``: ``tools/export.py`` (ONNX QDQ export + onnxruntime check)."""
    return _run('export')


def analyze():
    """``mmvq-analyze``: ``tools/analyze.py`` (per-layer error report)."""
    return _run('analyze')

"""Optional dependencies: one clear line naming the extra to install."""
import importlib.util

EXTRAS = {'onnx': 'deploy', 'onnxruntime': 'deploy'}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the tools print it as one line."""


def require(*modules, purpose='mmvq.deploy'):
    """Raise :class:`MissingExtraError` unless every module in ``modules`` can be imported.

    Args:
        *modules (str): top-level module names, e.g. ``'onnx'``.
        purpose (str): what needs them, for the message.

    Raises:
        MissingExtraError: ``"<purpose> needs onnx, which is not installed:
            pip install 'mmvq[deploy]'"``.
    """
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extras = sorted({EXTRAS.get(m, m) for m in missing})
        raise MissingExtraError(
            f'{purpose} needs {" and ".join(missing)}, which {"is" if len(missing) == 1 else "are"} '
            f'not installed: pip install \'mmvq[{",".join(extras)}]\'')

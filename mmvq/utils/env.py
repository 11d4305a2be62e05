"""Environment report: versions of the OpenMMLab stack and whether mmcv ops load."""
import platform
import sys
from collections import OrderedDict


def _version(module_name):
    try:
        module = __import__(module_name)
    except Exception as exc:  # noqa: BLE001 - report, never raise
        return f'not importable ({type(exc).__name__}: {exc})'
    version = getattr(module, '__version__', None)
    if version is None:
        from importlib.metadata import PackageNotFoundError, version as dist_version
        try:
            version = dist_version(module_name)
        except PackageNotFoundError:
            version = 'unknown'
    return version


def collect_env():
    """Collect the versions that matter for mmvq.

    Returns:
        OrderedDict: ``Python``, ``PyTorch``, ``mmengine``, ``mmcv``,
        ``mmcv ops`` (``'ok'`` when ``mmcv._ext`` loads and a RoIAlign runs),
        ``mmdet``, ``mmpretrain``, ``mmvq``, ``setuptools`` and whether
        ``pkg_resources`` (needed by mmengine's ``mmdet::`` lookup) imports.
    """
    env = OrderedDict()
    env['Python'] = sys.version.split()[0]
    env['Platform'] = platform.platform()
    env['PyTorch'] = _version('torch')
    for name in ('mmengine', 'mmcv', 'mmdet', 'mmpretrain', 'mmvq',
                 'setuptools', 'numpy', 'pycocotools'):
        env[name] = _version(name)
    try:
        import torch
        from mmcv.ops import roi_align
        feat = torch.arange(16, dtype=torch.float32, device='cpu').view(1, 1, 4, 4)
        rois = torch.tensor([[0., 0., 0., 3., 3.]], device='cpu')
        roi_align(feat, rois, (2, 2), 1.0, 0, 'avg', True)
        env['mmcv ops'] = 'ok'
    except Exception as exc:  # noqa: BLE001
        env['mmcv ops'] = f'unavailable ({type(exc).__name__}: {exc})'
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            import pkg_resources  # noqa: F401
        env['pkg_resources'] = 'ok'
    except ImportError:
        env['pkg_resources'] = 'missing (install "setuptools<82")'
    return env


def print_env():
    """Print :func:`collect_env` as an aligned two-column table."""
    env = collect_env()
    width = max(len(k) for k in env)
    for key, value in env.items():
        print(f'{key:<{width}} : {value}')


def device_report(device):
    """What ran the model: device string, its name and the thread count."""
    import torch
    device = torch.device(device)
    out = dict(device=str(device), type=device.type)
    if device.type == 'cuda':
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        out.update(name=props.name, capability=f'{props.major}.{props.minor}',
                   memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        out.update(name=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return out

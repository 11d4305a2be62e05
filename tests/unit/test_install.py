"""Installing mmvq into a user's existing OpenMMLab environment.

The wheel is built from the sources (``helpers.build_wheel``); pip's resolver is
then asked (``--dry-run --no-index``) what installing it into an environment that
already holds another torch / mmcv / mmdet would change. The environment is a
fresh venv whose packages are *recorded* as installed (``*.dist-info`` with
their metadata only), the way pip sees a user's CUDA torch build or prebuilt
mmcv; nothing is downloaded.
"""
import ast
import json
import os
import os.path as osp
import subprocess
import sys
import zipfile

import pytest

from helpers import ROOT, build_wheel, make_venv

# a user's GPU environment: none of these is the version make setup pins
USER_ENV = {'torch': '2.5.1+cu121', 'torchvision': '0.20.1+cu121', 'mmcv': '2.1.0',
            'mmengine': '0.10.4', 'mmdet': '3.2.0', 'mmpretrain': '1.1.0', 'numpy': '1.24.4',
            'tqdm': '4.66.1', 'setuptools': '69.5.1'}


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
    return build_wheel(tmp_path_factory.mktemp('wheel'))


def metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith('.dist-info/METADATA'))
        entry = next(n for n in names if n.endswith('.dist-info/entry_points.txt'))
        return names, z.read(meta).decode(), z.read(entry).decode()


def test_wheel_declares_ranges_extras_data_and_entry_points(wheel):
    names, meta, entry = metadata(wheel)
    requires = [line.split(':', 1)[1].strip() for line in meta.splitlines()
                if line.startswith('Requires-Dist:')]
    assert not [r for r in requires if '==' in r.split(';')[0]], requires   # no pins
    by_name = {r.split(';')[0].split('>')[0].split('<')[0].strip(): r for r in requires}
    assert by_name['torch'] == 'torch>=2.3'
    assert by_name['mmcv'] == 'mmcv<2.2.0,>=2.0.0'
    assert by_name['mmdet'] == 'mmdet<3.4.0,>=3.0.0'
    # onnx / onnxruntime only with the deploy extra
    assert 'extra == "deploy"' in by_name['onnx'] and 'extra == "deploy"' in by_name['onnxruntime']
    assert 'Requires-Python: >=3.8' in meta
    # configs and the user tools inside the package, as mmdet's .mim
    assert 'mmvq/.mim/configs/_base_/quant/fqvit_w8a8_attn4.py' in names
    assert 'mmvq/.mim/model-index.yml' in names          # mmengine reads it first
    assert {'mmvq/.mim/tools/ptq.py', 'mmvq/.mim/tools/export.py',
            'mmvq/.mim/tools/analyze.py'} <= set(names)
    assert 'mmvq/quantizers/fused_cpu.c' in names
    assert not [n for n in names if n.startswith(('tests/', 'benchmarks/', 'configs/', 'tools/'))]
    for script in ('mmvq-ptq = mmvq.cli:ptq', 'mmvq-export = mmvq.cli:export',
                   'mmvq-analyze = mmvq.cli:analyze'):
        assert script in entry


def user_env(tmp_path, packages):
    """A venv holding ``packages`` ({name: version}) as recorded installs."""
    py, site = make_venv(tmp_path / 'venv')
    for name, version in packages.items():
        info = osp.join(site, f'{name}-{version}.dist-info')
        os.makedirs(info)
        with open(osp.join(info, 'METADATA'), 'w') as f:
            f.write(f'Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n')
        with open(osp.join(info, 'INSTALLER'), 'w') as f:
            f.write('pip\n')
        open(osp.join(info, 'RECORD'), 'w').close()
    return py


def dry_run(py, wheel, tmp_path, *reqs):
    report = tmp_path / 'report.json'
    proc = subprocess.run(
        [sys.executable, '-m', 'pip', '--disable-pip-version-check', '--python', py, 'install',
         '--dry-run', '--no-index', '--find-links', osp.dirname(wheel), '--report', str(report),
         *reqs], capture_output=True, text=True)
    installs = None
    if proc.returncode == 0:
        installs = {i['metadata']['name']: i['metadata']['version']
                    for i in json.loads(report.read_text())['install']}
    return proc, installs


def test_pip_keeps_the_users_torch_and_mmcv(wheel, tmp_path):
    py = user_env(tmp_path, USER_ENV)
    proc, installs = dry_run(py, wheel, tmp_path, 'mmvq')
    assert proc.returncode == 0, proc.stderr
    # only mmvq itself: torch 2.5.1+cu121, mmcv 2.1.0, mmdet 3.2.0 ... stay
    assert installs == {'mmvq': '0.1.0'}, installs


def test_pip_deploy_extra_adds_only_onnx(wheel, tmp_path):
    # a user who already has onnxruntime: the extra asks for onnx and nothing of torch/mmcv
    py = user_env(tmp_path, dict(USER_ENV, onnx='1.16.0', onnxruntime='1.18.1'))
    proc, installs = dry_run(py, wheel, tmp_path, 'mmvq[deploy]')
    assert proc.returncode == 0, proc.stderr
    assert installs == {'mmvq': '0.1.0'}, installs
    proc, _ = dry_run(user_env(tmp_path / 'no_onnx', USER_ENV), wheel, tmp_path, 'mmvq[deploy]')
    assert proc.returncode != 0 and 'onnx' in proc.stderr   # would have to install onnx


def test_pip_refuses_mmcv_outside_the_tested_range(wheel, tmp_path):
    # mmcv 2.2 breaks mmdet 3.x (its own check refuses it): the range must make pip
    # look for another mmcv instead of accepting the installed one
    py = user_env(tmp_path, dict(USER_ENV, mmcv='2.2.0'))
    proc, _ = dry_run(py, wheel, tmp_path, 'mmvq')
    assert proc.returncode != 0
    assert 'mmcv<2.2.0,>=2.0.0' in proc.stderr


SHIPPED = ('mmvq', osp.join('tools', 'ptq.py'), osp.join('tools', 'export.py'),
           osp.join('tools', 'analyze.py'), osp.join('tools', 'convert_swin_det_ckpt.py'))


def shipped_sources():
    for entry in SHIPPED:
        path = osp.join(ROOT, entry)
        if path.endswith('.py'):
            yield path
            continue
        for folder, _, files in os.walk(path):
            yield from (osp.join(folder, f) for f in files if f.endswith('.py'))


def test_shipped_sources_parse_as_python_38():
    # python_requires='>=3.8': the grammar (no match, no parenthesised with-items,
    # no PEP 604 / 585 forms that 3.8 evaluates) ...
    bad = []
    for path in shipped_sources():
        try:
            ast.parse(open(path).read(), path, feature_version=(3, 8))
        except SyntaxError as exc:
            bad.append(f'{osp.relpath(path, ROOT)}:{exc.lineno}: {exc.msg}')
    assert not bad, bad


def test_shipped_sources_need_no_newer_stdlib_than_38():
    # ... and the standard library (vermin: str.removeprefix, functools.cache, ...)
    vermin = pytest.importorskip('vermin')
    del vermin
    proc = subprocess.run([sys.executable, '-c', 'import sys, vermin; sys.exit(vermin.main())',
                           '--no-tips', '--violations',
                           '--eval-annotations', '-t=3.8-', '--exclude', 'long',
                           *shipped_sources()], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_missing_deploy_extra_is_one_line_naming_it(monkeypatch):
    import importlib.util

    from mmvq.deploy.export import export_onnx
    from mmvq.deploy.runtime import ort_session
    from mmvq.utils import optional
    real = importlib.util.find_spec
    monkeypatch.setattr(optional.importlib.util, 'find_spec',
                        lambda name, *a: None if name in ('onnx', 'onnxruntime') else real(name, *a))
    with pytest.raises(optional.MissingExtraError) as exc:
        ort_session(b'', quantized=False)
    assert str(exc.value) == ("mmvq.deploy needs onnx and onnxruntime, which are not installed: "
                              "pip install 'mmvq[deploy]'")
    with pytest.raises(optional.MissingExtraError, match=r"^mmvq.deploy needs onnx, which is not "):
        export_onnx(None, None, None)

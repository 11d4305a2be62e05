"""mmvq: post-training quantization of vision transformers for OpenMMLab.

``install_requires`` holds *ranges*, so that ``pip install mmvq`` into a working
OpenMMLab environment keeps the user's torch (and its CUDA build) and their
prebuilt mmcv; the exact versions this project is tested on live in
``requirements.txt`` + ``constraints.txt`` and are installed only by
``make setup`` (``tools/setup_env.sh``) and CI. Why each bound (see README,
"Supported versions"):

- torch >= 2.3: ``torch.get_default_device`` (2.3) places quantizer state on the
  device the model is built on; ``weights_only=`` (1.13) is passed explicitly.
  ``torch.onnx.export(dynamo=False)`` is passed only where the keyword exists.
- mmcv >= 2.0.0, < 2.2.0, mmengine >= 0.7.1, < 1.0.0, mmdet >= 3.0.0, < 3.4.0:
  the OpenMMLab 2.0 APIs mmvq uses, with mmdet 3.x's own mmcv / mmengine ranges
  (mmdet 3.3 refuses mmcv >= 2.2).
- mmpretrain >= 1.0.0, < 1.3.0: the 1.x ``VisionTransformer`` / ``SwinTransformer``.
- setuptools < 82: mmengine's ``mmdet::`` / ``mmvq::`` config lookup imports
  ``pkg_resources``, which setuptools 82 removed.
- onnx / onnxruntime only for ``mmvq.deploy`` (``pip install 'mmvq[deploy]'``).

The configs and the user tools are shipped inside the package as
``mmvq/.mim/{configs,tools}`` (like mmdet and mmpretrain), so that
``_base_ = ['mmvq::_base_/quant/fqvit_w8a8_attn4.py']`` and the console entry
points ``mmvq-ptq`` / ``mmvq-export`` / ``mmvq-analyze`` work from a wheel.
"""
import os
import os.path as osp
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = osp.dirname(osp.abspath(__file__))

# the tools a user runs (and what they import); demo / setup / benchmark helpers stay out
MIM_TOOLS = ('ptq.py', 'export.py', 'analyze.py', 'dist_ptq.sh', 'convert_swin_det_ckpt.py')

INSTALL_REQUIRES = [
    'torch>=2.3',
    'mmcv>=2.0.0,<2.2.0',
    'mmengine>=0.7.1,<1.0.0',
    'mmdet>=3.0.0,<3.4.0',
    'mmpretrain>=1.0.0,<1.3.0',
    'numpy>=1.21',
    'tqdm>=4.40',
    'setuptools<82',
]
EXTRAS_REQUIRE = {
    'deploy': ['onnx>=1.14', 'onnxruntime>=1.16'],
    'tests': ['pytest>=7', 'vermin>=1.5'],
}


def read_version():
    scope = {}
    with open(osp.join(HERE, 'mmvq', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


class build_py_with_mim(build_py):
    """``build_py`` that also copies ``configs/``, the user tools and the (empty)
    ``model-index.yml`` mmengine reads first into ``<build>/mmvq/.mim/`` (the
    source tree is left untouched)."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            return  # an editable install reads configs/ and tools/ from the checkout
        mim = osp.join(self.build_lib, 'mmvq', '.mim')
        shutil.rmtree(mim, ignore_errors=True)
        shutil.copytree(osp.join(HERE, 'configs'), osp.join(mim, 'configs'),
                        ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
        shutil.copy2(osp.join(HERE, 'model-index.yml'), osp.join(mim, 'model-index.yml'))
        os.makedirs(osp.join(mim, 'tools'))
        for name in MIM_TOOLS:
            shutil.copy2(osp.join(HERE, 'tools', name), osp.join(mim, 'tools', name))


setup(
    name='mmvq',
    version=read_version(),
    description='Post-training quantization of vision transformers '
    '(FQ-ViT, IGQ-ViT, AdaLog) for mmdet and mmpretrain',
    long_description=open(osp.join(HERE, 'README.md')).read(),
    long_description_content_type='text/markdown',
    packages=find_packages(exclude=('tests', 'tests.*', 'configs', 'configs.*', 'tools',
                                    'benchmarks')),
    package_data={'mmvq.quantizers': ['fused_cpu.c'], 'mmvq.deploy': ['ort_ops.c']},
    cmdclass={'build_py': build_py_with_mim},
    entry_points={'console_scripts': ['mmvq-ptq = mmvq.cli:ptq',
                                      'mmvq-export = mmvq.cli:export',
                                      'mmvq-analyze = mmvq.cli:analyze']},
    # the code parses as Python 3.8 (tests/unit/test_install.py); CI runs 3.11
    python_requires='>=3.8',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license='Apache-2.0',
    zip_safe=False,
)

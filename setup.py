"""mmvq: post-training quantization of vision transformers for OpenMMLab."""
import os.path as osp

from setuptools import find_packages, setup

HERE = osp.dirname(osp.abspath(__file__))


def read_requirements(path='requirements.txt'):
    reqs = []
    with open(osp.join(HERE, path)) as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if line:
                reqs.append(line)
    return reqs


def read_version():
    scope = {}
    with open(osp.join(HERE, 'mmvq', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


setup(
    name='mmvq',
    version=read_version(),
    description='Post-training quantization of vision transformers '
    '(FQ-ViT, IGQ-ViT, AdaLog) for mmdet and mmpretrain',
    long_description=open(osp.join(HERE, 'README.md')).read(),
    long_description_content_type='text/markdown',
    packages=find_packages(exclude=('tests', 'configs', 'tools')),
    package_data={'mmvq.quantizers': ['fused_cpu.c']},
    python_requires='>=3.10,<3.12',
    install_requires=[r for r in read_requirements() if not r.startswith('pytest')],
    extras_require={'tests': ['pytest==8.4.2']},
    license='Apache-2.0',
    zip_safe=False,
)

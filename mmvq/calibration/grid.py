"""AdaLog's per-row (scale, zero point) grid and its progressive search.

Reference: GoatWu/AdaLog ``quant_layers/linear.py``:
``calculate_percentile_weight_candidates`` / ``..._activation_candidates``
(the grid) and ``weight_fpcs`` / ``activation_fpcs`` (the search). A *row*
is what gets its own parameters: an output channel of a weight, or an input
channel of an activation searched per channel.

Grid, per row: ``num_zp`` integer zero points centred on the middle code
``2^(b-1)`` (``min(16, 2^(b-1))`` for weights, ``min(16, 2^b)`` for
activations) times ``eq_n / num_zp`` scales spread from the 0.9/0.1 to the
1.0/0.0 percentile range of the row, divided by ``2^b - 1``. Search: keep
the ``width`` best per row, expand each into ``eq_n / width`` scales
``s + (linspace(0, 1, n) - 0.5) * d`` (zero point kept), ``d`` starting at
the grid's scale step and shrinking by ``n - 0.5`` per round; ``steps``
rounds in all, the last keeping one.
"""
import torch

from ..quantizers.uniform import fake_quant_affine

CHUNK_ELEMS = 1 << 25


def row_grid(t, bits, num_zp, eq_n=128):
    """Candidates for every row of ``t`` (``(R, N)``).

    Returns:
        tuple[Tensor, Tensor, Tensor]: scales ``(K, R)``, zero points
        ``(K, R)`` and the initial expansion step ``(R,)``.
    """
    half = 2 ** (bits - 1)
    num_scale = max(1, eq_n // num_zp)
    pct = torch.tensor([0.9, 1.0], dtype=t.dtype, device=t.device)
    up = torch.quantile(t, pct, dim=1)                                  # (2, R)
    lo = torch.quantile(t, 1 - pct, dim=1)
    d_min, d_max = up[0] - lo[0], up[1] - lo[1]
    steps = torch.linspace(0, 1, num_scale, dtype=t.dtype, device=t.device)[:, None]
    scales = ((d_min + steps * (d_max - d_min)) / (2 * half - 1)).repeat(num_zp, 1)
    zps = torch.arange(half - num_zp // 2, half + num_zp // 2, dtype=t.dtype,
                       device=t.device).repeat_interleave(num_scale)[:, None]
    delta = (d_max - d_min) / max(1, num_scale - 1) / (2 * half - 1)
    return scales.clamp(min=1e-8), zps.expand_as(scales).contiguous(), delta


def row_fpcs(scales, zps, delta, losses, eq_n=128, width=16, steps=6):
    """Progressive search of per-row (scale, zero point).

    Args:
        scales, zps (Tensor): ``(K, R)`` initial candidates (:func:`row_grid`).
        delta (Tensor): ``(R,)`` initial expansion step.
        losses (callable): ``(scales, zps) -> (K, R)`` loss of each candidate.

    Returns:
        tuple[Tensor, Tensor]: the best ``(R,)`` scales and zero points.
    """
    def keep(sc, zp, k):
        idx = losses(sc, zp).topk(min(k, len(sc)), dim=0, largest=False).indices
        return sc.gather(0, idx), zp.gather(0, idx)

    new_cnt = max(1, eq_n // width)
    sc, zp = keep(scales, zps, 1 if steps <= 1 else width)
    for r in range(steps - 1):
        offs = torch.linspace(0, 1, new_cnt, dtype=sc.dtype, device=sc.device) - 0.5
        sc = (sc[:, None, :] + offs[None, :, None] * delta).clamp(min=1e-8).reshape(-1, sc.shape[1])
        zp = zp.repeat_interleave(new_cnt, dim=0)
        delta = delta / (new_cnt - 0.5)
        sc, zp = keep(sc, zp, 1 if r == steps - 2 else width)
    return sc[0], zp[0]


def positive_percentiles(x, qs, cap=1 << 24):
    """Nearest-rank percentiles ``qs`` of the positive entries of ``x``.

    The reference's ``PostGeluLogBasedBatchingQuantLinear.positive_percentile``:
    the entry of rank ``ceil(n q)`` (1-based, at least 1) among the ``n``
    positive values, no interpolation; 0 where ``x`` has none. Inputs of
    more than ``cap`` entries are strided evenly first.

    Returns:
        Tensor: ``(len(qs),)`` on the device of ``x``.
    """
    flat = x.reshape(-1)
    if flat.numel() > cap:
        flat = flat[::-(-flat.numel() // cap)]
    pos = flat[flat > 0]
    if pos.numel() == 0:
        return torch.zeros(len(qs), dtype=x.dtype, device=x.device)
    n = torch.tensor(float(pos.numel()), dtype=torch.float32, device='cpu')     # the reference's float32 ranks
    ranks = [min(pos.numel(), max(1, int(torch.ceil(n * torch.tensor(q, dtype=torch.float32, device='cpu')))))
             for q in qs]
    return torch.stack([pos.kthvalue(k).values for k in ranks])


def self_losses(t, bits):
    """``(scales, zps) -> (K, R)``: each row's own mean squared quantization error."""
    qmax = 2 ** bits - 1

    def losses(sc, zp):
        per = max(1, CHUNK_ELEMS // max(1, t.numel()))
        out = []
        for i in range(0, len(sc), per):
            s, z = sc[i:i + per, :, None], zp[i:i + per, :, None]
            out.append((fake_quant_affine(t[None], s, z, 0, qmax) - t[None]).pow(2).mean(dim=2))
        return torch.cat(out)
    return losses

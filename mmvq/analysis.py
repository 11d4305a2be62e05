"""Per-layer sensitivity and activation-distribution plots.

* :func:`layer_sensitivity`: with the model converted and calibrated, enable
  the quantizers of one layer at a time (all others off) and measure the
  output error against the float model: SQNR (dB) and MSE of the logits
  (classifiers) or of the backbone+neck features (detectors), on the given
  inputs. One row per quantized layer, most sensitive first.
* :func:`plot_ln_channel_ranges`: per-channel min/max of LayerNorm inputs —
  the inter-channel variation that motivates FQ-ViT's Power-of-Two Factor.
* :func:`plot_histograms`: histograms of post-softmax and post-GELU values
  (log-scaled counts) with the chosen quantization levels overlaid — what
  motivates log2 / AdaLog quantizers.
"""
import math

import torch

from .modes import enable_quantizers, iter_quantizers
from .modules import QuantAttentionMixin, QuantModuleMixin


def _sqnr(ref, out):
    noise = sum((a - b).pow(2).sum() for a, b in zip(ref, out))
    power = sum(a.pow(2).sum() for a in ref)
    return float(10 * torch.log10(power / noise.clamp(min=1e-30))), float(noise / sum(a.numel() for a in ref))


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flatten(o)]


def quantized_layers(model):
    """``(name, module)`` of every module owning enabled quantizers of its own
    (an attention wrapper's ``matmul1``/``softmax``/``matmul2`` children are
    rows of their own; the wrapper is one where it holds quantizers itself,
    e.g. Swin's q @ k^T scores and bias table)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantModuleMixin):
            if any(q.enabled for _, q in module.own_quantizers()):
                yield name, module


@torch.no_grad()
def layer_sensitivity(model, inputs, output_fn):
    """Quantize one layer at a time; returns rows sorted by SQNR (worst first).

    Args:
        model (nn.Module): converted, calibrated model (quant mode).
        inputs (list): model inputs.
        output_fn (callable): ``output_fn(model, input) -> Tensor | tuple``.
    """
    enabled = {name: q.enabled for name, q in iter_quantizers(model)}
    layers = list(quantized_layers(model))
    try:
        enable_quantizers(model, False)
        ref = [_flatten(output_fn(model, x)) for x in inputs]
        rows = []
        for name, module in layers:
            for _, q in module.quantizers():
                q.enabled = enabled.get(q.site_name, True)
            out = [_flatten(output_fn(model, x)) for x in inputs]
            sq, mse = _sqnr([t for r in ref for t in r], [t for o in out for t in o])
            kinds = sorted({q.kind for _, q in module.quantizers() if q.enabled})
            bits = sorted({q.bits for _, q in module.quantizers() if q.enabled})
            rows.append(dict(layer=name, kinds='+'.join(kinds), bits='/'.join(map(str, bits)),
                             sqnr_db=sq, mse=mse))
            for _, q in module.quantizers():
                q.enabled = False
        enable_quantizers(model, True)
        full = [_flatten(output_fn(model, x)) for x in inputs]
        all_sq, all_mse = _sqnr([t for r in ref for t in r], [t for o in full for t in o])
    finally:
        for name, q in iter_quantizers(model):
            q.enabled = enabled[name]
    rows.sort(key=lambda r: r['sqnr_db'])
    return rows, dict(sqnr_db=all_sq, mse=all_mse)


def sensitivity_markdown(rows, total, title):
    lines = [f'# Per-layer sensitivity: {title}', '',
             f'All quantizers on: output SQNR {total["sqnr_db"]:.2f} dB, MSE {total["mse"]:.3e}. '
             'Each row quantizes only that layer; most sensitive first.', '',
             '| # | layer | quantizers | bits | SQNR (dB) | MSE |', '|---|---|---|---|---|---|']
    for i, r in enumerate(rows, 1):
        lines.append(f'| {i} | `{r["layer"]}` | {r["kinds"]} | {r["bits"]} | {r["sqnr_db"]:.2f} | '
                     f'{r["mse"]:.3e} |')
    return '\n'.join(lines) + '\n'


@torch.no_grad()
def capture(model, inputs, forward_fn, ln_names, softmax_names, gelu_names):
    """Float activations: LN inputs, post-softmax (matmul2 ``a``), post-GELU (fc2 input)."""
    enabled = {name: q.enabled for name, q in iter_quantizers(model)}
    enable_quantizers(model, False)
    mods = dict(model.named_modules())
    attention = [m for m in model.modules() if isinstance(m, QuantAttentionMixin)]
    for m in attention:                 # fused SDPA would skip the matmul hooks
        m.force_explicit = True
    store, handles = {}, []

    def hook(name, arg):
        def fn(_m, args):
            t = args[arg].detach().float().cpu()        # plots are drawn on the host
            store.setdefault(name, []).append(t.reshape(-1, t.shape[-1]) if name in ln_names
                                              else t.reshape(-1))
        return fn

    for name in ln_names + gelu_names:
        handles.append(mods[name].register_forward_pre_hook(hook(name, 0)))
    for name in softmax_names:
        handles.append(mods[name].register_forward_pre_hook(hook(name, 0)))
    try:
        for x in inputs:
            forward_fn(model, x)
    finally:
        for h in handles:
            h.remove()
        for name, q in iter_quantizers(model):
            q.enabled = enabled[name]
        for m in attention:
            m.force_explicit = False
    return {k: torch.cat(v) for k, v in store.items()}


def plot_ln_channel_ranges(acts, path, max_layers=4):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = list(acts)[:max_layers]
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.6 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        x = acts[name]
        ch = torch.arange(x.shape[1], device=x.device)
        ax.fill_between(ch.numpy(), x.amin(0).numpy(), x.amax(0).numpy(), step='mid', alpha=0.6)
        ax.set_title(f'{name}: per-channel range of the LayerNorm input', fontsize=9)
        ax.set_xlabel('channel')
        ax.set_ylabel('value')
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_histograms(acts, quantizers, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    names = list(acts)
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.reshape(-1), names):
        x = acts[name]
        x = x[::max(1, x.numel() // 200000)]
        ax.hist(x.numpy(), bins=200, log=True, color='tab:blue', alpha=0.7)
        levels = quantizers[name].levels() if quantizers.get(name) is not None else None
        if levels:
            for v in levels:
                ax.axvline(v, color='tab:red', lw=0.6, alpha=0.7)
        ax.set_title(f'{name}\n{type(quantizers.get(name)).__name__} levels in red', fontsize=8)
    for ax in axes.reshape(-1)[len(names):]:
        ax.axis('off')
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

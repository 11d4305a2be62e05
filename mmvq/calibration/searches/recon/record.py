"""Recorded unit inputs and outputs, batched by call signature."""
import torch
from torch.utils import _pytree as pytree


class UnitRecord:
    """Inputs and outputs of one unit's calls, grouped so calls of equal
    shape (every image of a classifier) are one batch along dim 0."""

    def __init__(self):
        self.calls = {}          # key -> (in_leaves, in_spec, out_leaves)
        self.groups = []

    def add(self, key, args, kwargs, output, store):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        out_leaves, _ = pytree.tree_flatten(output)
        self.calls[key] = ([_store(v, store) for v in leaves], spec,
                           [_store(v, store) for v in out_leaves if torch.is_tensor(v)])

    def nbytes(self):
        return sum(t.numel() * t.element_size() for leaves, _, outs in self.calls.values()
                   for t in list(leaves) + list(outs) if torch.is_tensor(t))

    def build(self):
        """Group the calls (in key order) into concatenated batches."""
        buckets = {}
        for key in sorted(self.calls):
            leaves, spec, outs = self.calls[key]
            tensors = [t for t in leaves if torch.is_tensor(t)] + outs
            rows = tensors[0].shape[0] if tensors and tensors[0].dim() else 0
            batchable = rows > 0 and all(t.dim() and t.shape[0] == rows for t in tensors)
            sig = (str(spec), tuple(_sig(v) for v in leaves), tuple(_sig(t) for t in outs)) \
                if batchable else ('call', key)
            buckets.setdefault(sig, []).append((leaves, spec, outs, rows if batchable else 1,
                                                batchable))
        self.groups = []
        for items in buckets.values():
            leaves0, spec, outs0, _, batchable = items[0]
            if batchable:
                leaves = [torch.cat([it[0][i] for it in items]) if torch.is_tensor(v) else v
                          for i, v in enumerate(leaves0)]
                outs = [torch.cat([it[2][i] for it in items]) for i in range(len(outs0))]
                rows = sum(it[3] for it in items)
            else:
                leaves, outs, rows = leaves0, outs0, 1
            self.groups.append(dict(leaves=leaves, spec=spec, outs=outs, rows=rows,
                                    batchable=batchable))
        self.calls = {}
        return self

    @property
    def rows(self):
        return sum(g['rows'] for g in self.groups)

    def batch(self, index, device):
        """Yield ``(args, kwargs, targets, weight)`` for the global row ``index``."""
        offset = 0
        for g in self.groups:
            sel = index[(index >= offset) & (index < offset + g['rows'])] - offset
            offset += g['rows']
            if sel.numel() == 0:
                continue
            if g['batchable']:
                sel_d = sel.to(g['outs'][0].device) if g['outs'] else sel
                leaves = [v.index_select(0, sel_d).to(device) if torch.is_tensor(v) else v
                          for v in g['leaves']]
                outs = [t.index_select(0, sel_d).to(device) for t in g['outs']]
            else:
                leaves = [v.to(device) if torch.is_tensor(v) else v for v in g['leaves']]
                outs = [t.to(device) for t in g['outs']]
            args, kwargs = pytree.tree_unflatten(leaves, g['spec'])
            yield args, kwargs, outs, sel.numel()


def _sig(v):
    if torch.is_tensor(v):
        return ('T', tuple(v.shape[1:]), str(v.dtype))
    return repr(v)


def _store(v, store):
    if not torch.is_tensor(v):
        return v
    v = v.detach()
    return v.to(store, copy=True) if store is not None else v.clone()

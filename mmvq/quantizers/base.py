"""Base class of every mmvq quantizer.

A quantizer is an ``nn.Module`` holding only buffers (its quantization
parameters), so that a converted model's ``state_dict`` carries them under
stable names and ``torch.load(weights_only=True)`` can read them back. It runs
in one of three modes:

* ``'float'``: identity, the float model.
* ``'calib'``: identity output; every call feeds the input to the quantizer's
  observer, and :meth:`BaseQuantizer.calibrate` turns the observed statistics
  into quantization parameters.
* ``'quant'``: fake quantization, ``dequantize(quantize(x))``.

``enabled=False`` makes the quantizer the identity in every mode.

**Devices.** Buffers are made where the quantizer is built (``mmvq.convert``
builds every quantizer on the device of the module it wraps) and follow
``model.to(device)``; every tensor a quantizer makes at run time is made on
the device of the data or buffer it meets. **No host synchronisation in quant
mode**: the few values the forward needs on the host (whether the quantizer
is calibrated, AdaLog's folding flag, LIS's logit scale) are read once per
change of the buffer holding them (:func:`host_value`) and primed when the
quantizer enters ``quant`` mode, so a quantized forward never waits for the
device. Checks that read data (NaN/Inf in calibration inputs) run in
``calib`` mode only.
"""
import weakref

import torch
import torch.nn as nn

MODES = ('float', 'calib', 'quant')


def check_bits(bits, name='bits', low=2, high=8):
    """Validate a bit width and raise a one-line error naming the fix."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not low <= bits <= high:
        raise ValueError(f'{name}={bits!r} is outside the supported range: use an '
                         f'integer from {low} to {high}')
    return bits


def along_axis(p, x, ch_axis):
    """``p`` (one value, or one per index of ``ch_axis``) shaped to broadcast
    against ``x``: a 0-d tensor per tensor, ``(1, .., C, .., 1)`` per channel."""
    if ch_axis is None or p.numel() == 1:
        return p.reshape(())
    shape = [1] * x.dim()
    shape[ch_axis % x.dim()] = -1
    return p.reshape(shape)


def host_value(owner, key, tensor, fn):
    """``fn(tensor)`` computed once per version of ``tensor`` and cached on ``owner``.

    The cache entry is keyed by a weak reference to the tensor object and its
    in-place version counter, so replacing the buffer (a new object) or
    writing into it (``fill_``, ``copy_``, ``load_state_dict``) recomputes;
    reading an unchanged buffer costs no device synchronisation.

    Args:
        owner (object): holder of the cache (a module; stored in ``__dict__``,
            never in ``state_dict``).
        key (str): name of the cached value.
        tensor (Tensor): the tensor the value is derived from.
        fn (callable): ``tensor -> host value`` (e.g. ``bool``, ``float``).
    """
    if not isinstance(tensor, torch.Tensor):          # already a host value
        return fn(tensor)
    cache = owner.__dict__.setdefault('_mmvq_host', {})
    hit = cache.get(key)
    if hit is None or hit[0]() is not tensor or hit[1] != tensor._version:
        hit = (weakref.ref(tensor), tensor._version, fn(tensor))
        cache[key] = hit
    return hit[2]


class BaseQuantizer(nn.Module):
    """Common mode handling, state-dict tolerance and summary for quantizers.

    Subclasses implement :meth:`observe`, :meth:`calibrate` and
    :meth:`fake_quant`, and may override :meth:`summary`.

    Args:
        bits (int): bit width of the integer code (2 to 8).
        enabled (bool): ``False`` makes the quantizer the identity.
    """

    kind = 'base'
    # run the fused CPU kernel where one applies (mmvq.quantizers.fused);
    # set per model from the quantization block's ``fused`` key by convert()
    fused = True

    # ----------------------------------------------------------- capabilities
    # What the rest of mmvq may ask of a quantizer. Code outside
    # ``mmvq.quantizers`` reads these (and the per-class registries:
    # mmvq.deploy.EXPORT_FORMS, mmvq.calibration.FPCS_STRATEGIES /
    # RECON_TREATMENTS), never the concrete class (tests/unit/test_capabilities.py).
    #: may sit in a Linear / Conv2d weight slot: ``observe(weight)`` + ``calibrate()``
    #: set its parameters from the weight alone (``mmvq.convert`` refuses others there)
    quantizes_weights = False
    #: its codes are ``clamp(round(x / s) + z, qmin, qmax)`` with buffers ``scale`` and
    #: ``zero_point`` (one value, or one per index of ``ch_axis``), attributes ``qmin``,
    #: ``qmax``, ``ch_axis`` and methods ``codes(x)`` (an integer tensor),
    #: ``dequantize(codes, dtype)`` (``(c - z) s``, equal to ``fake_quant``) and
    #: ``_view(param, x)``: cached integer weight codes, integer weight codes in ONNX, the
    #: integer LayerNorm's output grid, BOP counts of IGQ allocation, AdaRound
    affine = False
    #: ``affine`` and ``set_params(scale, zero_point)`` accepts any positive scale and any
    #: zero point in ``[qmin, qmax]`` (``symmetric`` says whether it is fixed at the
    #: middle): the LayerNorm reparameterization moves its range
    free_affine = False
    #: a power-of-two-factor quantizer (FQ-ViT PTF): per-channel factors ``alpha`` on one
    #: ``scale`` / ``zero_point``; ``channel_scale()``; the integer LayerNorm reads its codes
    power_of_two_factors = False
    #: a softmax quantizer taking logits (FQ-ViT Log-Int-Softmax): the quantized softmax
    #: wrapper hands it the logits and its input quantizer's scale
    integer_softmax = False
    #: instance-aware groups whose count an allocation may choose:
    #: ``regrouped(num_groups)`` returns a calibrated copy with that many groups
    allocates_groups = False
    #: a shift added before quantization that a reparameterization may fold into the
    #: preceding Linear's bias (AdaLog post-GELU): ``fold_shift_into(linear)``
    shifted = False

    def __init__(self, bits=8, enabled=True):
        super().__init__()
        self.bits = check_bits(bits)
        self.enabled = enabled
        self.mode = 'float'
        self.register_buffer('calibrated', torch.tensor(False))

    # ------------------------------------------------------------------ modes
    def set_mode(self, mode):
        if mode not in MODES:
            raise ValueError(f'unknown quantizer mode {mode!r}; use one of {MODES}')
        self.mode = mode
        if mode == 'quant':
            self.prime()
        return self

    def is_calibrated(self):
        """Whether parameters were set (host copy, one sync per change)."""
        return host_value(self, 'calibrated', self.calibrated, bool)

    def mark_calibrated(self):
        self.calibrated.fill_(True)

    def prime(self):
        """Read the host values the quantized forward needs (before evaluation).

        Subclasses add theirs; called by :meth:`set_mode` ``('quant')`` so that
        the first quantized forward is as sync-free as every later one.
        """
        self.is_calibrated()

    def forward(self, x, inplace=False):
        """Quantize ``x`` as the mode says; ``inplace=True`` lets a fused
        kernel write the result into ``x`` (only for a tensor nothing else
        reads, e.g. a layer's fresh output; the eager code ignores it)."""
        if not self.enabled or self.mode == 'float':
            return self.passthrough(x)
        if self.mode == 'calib':
            x_det = x.detach()
            if not bool(torch.isfinite(x_det).all()):
                where = getattr(self, 'site_name', type(self).__name__)
                raise ValueError(f'calibration values at {where} contain NaN/Inf: check the '
                                 'checkpoint weights and the input normalisation (data_preprocessor)')
            self.observe(x_det)
            return self.passthrough(x)
        if not self.is_calibrated():
            raise RuntimeError(f'{type(self).__name__} is used in quant mode before '
                               'calibration: run mmvq.calibrate / PTQLoop first')
        if inplace and self.inplace_ok:
            return self.fake_quant(x, inplace=True)
        return self.fake_quant(x)

    # whether fake_quant takes ``inplace`` (uniform, PTF)
    inplace_ok = False

    def passthrough(self, x):
        """The float value a disabled (or ``float`` / ``calib`` mode) quantizer
        returns: ``x``, unless a reparameterization moved part of the
        quantizer's arithmetic into a neighbour (AdaLog's folded shift)."""
        return x

    # ------------------------------------------------------- to be overridden
    def observe(self, x):
        raise NotImplementedError

    def calibrate(self):
        """Turn observed statistics into quantization parameters."""
        raise NotImplementedError

    def fake_quant(self, x):
        raise NotImplementedError

    def reset_observer(self):
        """Forget observed statistics (parameters stay)."""

    def levels(self):
        """The dequantized values a code can take (for plots), or ``None``."""
        return None

    def summary(self):
        """One-line description: kind, bits, granularity."""
        return dict(kind=self.kind, bits=self.bits, granularity='tensor')

    def extra_repr(self):
        s = self.summary()
        extra = ', '.join(f'{k}={v}' for k, v in s.items() if k != 'kind')
        return f'{extra}, enabled={self.enabled}, mode={self.mode}'

    def _set_buffer(self, name, value):
        """Replace a buffer (its shape may change after calibration)."""
        value = value.detach().to(getattr(self, name).device)
        setattr(self, name, value.clone())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # Quantization parameters are absent from a float checkpoint: keep the
        # module's own values instead of reporting them missing, so a float
        # checkpoint loads into a converted model. Present entries may have a
        # calibrated shape (per-channel/per-group) different from the initial
        # placeholder: adopt it.
        own = dict(self.named_buffers(recurse=False))
        present = [k for k in own if prefix + k in state_dict]
        if not present:
            return
        for name in present:
            incoming = state_dict[prefix + name]
            if incoming.shape != own[name].shape:
                setattr(self, name, torch.empty_like(incoming, device=own[name].device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

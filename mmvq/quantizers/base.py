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
"""
import torch
import torch.nn as nn

MODES = ('float', 'calib', 'quant')


def check_bits(bits, name='bits', low=2, high=8):
    """Validate a bit width and raise a one-line error naming the fix."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not low <= bits <= high:
        raise ValueError(f'{name}={bits!r} is outside the supported range: use an '
                         f'integer from {low} to {high}')
    return bits


class BaseQuantizer(nn.Module):
    """Common mode handling, state-dict tolerance and summary for quantizers.

    Subclasses implement :meth:`observe`, :meth:`calibrate` and
    :meth:`fake_quant`, and may override :meth:`summary`.

    Args:
        bits (int): bit width of the integer code (2 to 8).
        enabled (bool): ``False`` makes the quantizer the identity.
    """

    kind = 'base'

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
        return self

    def forward(self, x):
        if not self.enabled or self.mode == 'float':
            return x
        if self.mode == 'calib':
            x_det = x.detach()
            if not bool(torch.isfinite(x_det).all()):
                where = getattr(self, 'site_name', type(self).__name__)
                raise ValueError(f'calibration values at {where} contain NaN/Inf: check the '
                                 'checkpoint weights and the input normalisation (data_preprocessor)')
            self.observe(x_det)
            return x
        if not bool(self.calibrated):
            raise RuntimeError(f'{type(self).__name__} is used in quant mode before '
                               'calibration: run mmvq.calibrate / PTQLoop first')
        return self.fake_quant(x)

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

"""mmvq's front door: ``convert``, ``calibrate``, ``quantize`` and the summary.

::

    import mmvq
    mmvq.quantize(model, qcfg, calib_batches)      # convert + calibrate
    print(mmvq.format_summary(model))

The quantization block ``qcfg`` is described in :mod:`mmvq.schema`; the
conversion in :mod:`mmvq.conversion`, quantizer modes in :mod:`mmvq.modes`,
calibration and its searches in :mod:`mmvq.calibration`.
"""
from .calibration import build_search, finish_calibration, run_calibration
from .conversion import convert, plan, quant_state
from .modes import enable_quantizers, iter_quantizers, set_quant_mode
from .summary import format_summary, quant_summary

__all__ = ['convert', 'calibrate', 'quantize', 'plan', 'quant_state', 'finish_calibration',
           'set_quant_mode',
           'enable_quantizers', 'iter_quantizers', 'quant_summary', 'format_summary']


def calibrate(model, batches, forward_fn=None, searches=None, logger=None):
    """Calibrate a converted model on ``batches`` (a sequence) and switch to quant mode.

    Runs :func:`mmvq.calibration.run_calibration`: observers over every
    batch, the searches of the quantization config (``qcfg['searches']``,
    e.g. FPCS, IGQ allocation) unless ``searches`` is given, AdaLog folding.

    Args:
        model (nn.Module): converted model.
        batches (Sequence): calibration inputs.
        forward_fn (callable | None): ``forward_fn(model, batch)``; default
            ``model(batch)``.
        searches (list | None): search stages or their config dicts.
        logger: optional logger with ``.info``.
    """
    forward_fn = forward_fn or (lambda m, b: m(b))
    if searches is None:
        state = quant_state(model)
        searches = list(state.searches) if state is not None else []
    searches = [build_search(s) if isinstance(s, dict) else s for s in searches]
    was_training = model.training
    run_calibration(model, list(batches), forward_fn, searches, logger)
    model.train(was_training)
    return model


def quantize(model, qcfg, calib_data, forward_fn=None):
    """One call for notebooks: convert ``model`` in place with ``qcfg`` and
    calibrate it on ``calib_data``; returns the quantized model."""
    convert(model, qcfg)
    return calibrate(model, calib_data, forward_fn)

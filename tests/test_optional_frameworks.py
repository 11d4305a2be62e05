"""mmdet and mmpretrain are each optional: mmvq imports, converts, calibrates and
runs a classifier with mmdet unimportable, and a detector with mmpretrain
unimportable (each in a subprocess where ``sys.modules[name] = None`` makes
``import name`` raise ImportError, as in an environment without it)."""
import json
import subprocess
import sys

import pytest

from helpers import ROOT

SCRIPT = r"""
import json, sys
sys.modules[{blocked!r}] = None          # `import {blocked}` now raises ImportError
sys.path.insert(0, {tests!r})
import torch
import mmvq
from helpers import quant_block, {case}
model, data, forward = {case}()
mmvq.quantize(model, quant_block('uniform_w8a8'), data, forward)
with torch.no_grad():
    out = forward(model, data[0])
out = out if isinstance(out, torch.Tensor) else out[0] if isinstance(out, (list, tuple)) else None
print(json.dumps(dict(
    quantizers=sum(1 for _ in mmvq.iter_quantizers(model)),
    finite=bool(out is None or torch.isfinite(out).all()),
    leaked=[m for m in sys.modules if m == {blocked!r} or m.startswith({blocked!r} + '.')
            if sys.modules[m] is not None])))
"""


@pytest.mark.parametrize('blocked, case', [('mmdet', 'tiny_vit_case'),
                                           ('mmpretrain', 'tiny_detector_case')])
def test_mmvq_works_without_the_other_framework(blocked, case):
    code = SCRIPT.format(blocked=blocked, case=case, tests=ROOT + '/tests')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res['quantizers'] > 10 and res['finite'] and res['leaked'] == []

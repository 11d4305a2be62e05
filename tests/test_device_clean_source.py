"""Static check: no tensor factory in mmvq/ relies on the default device.

Every call of a torch tensor factory (``torch.zeros``, ``arange``, ``tensor``
...) in the package must name ``device=``, except in ``__init__`` methods,
where a module registers its buffers and PyTorch's convention applies (the
default device, which ``mmvq.convert`` sets to the wrapped module's device
with ``with torch.device(...)``; buffers then follow ``model.to``). The
runtime check of the same rule is :func:`mmvq.utils.strict.device_strict`
(tests/test_device_strict.py); this one also covers paths no test runs.
"""
import ast
import glob
import os.path as osp

from helpers import ROOT

FACTORIES = {'zeros', 'ones', 'empty', 'full', 'arange', 'range', 'linspace', 'logspace', 'tensor',
             'as_tensor', 'scalar_tensor', 'eye', 'rand', 'randn', 'randint', 'randperm', 'normal',
             'empty_strided', 'from_numpy', 'tril_indices', 'triu_indices'}


def implicit_factories(path):
    tree = ast.parse(open(path).read(), path)
    found = []

    def visit(node, func_name):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func_name
            if (isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute)
                    and isinstance(child.func.value, ast.Name) and child.func.value.id == 'torch'
                    and child.func.attr in FACTORIES and name != '__init__'):
                kws = {k.arg for k in child.keywords}
                if 'device' not in kws:
                    found.append(f'{osp.relpath(path, ROOT)}:{child.lineno} torch.{child.func.attr}')
            visit(child, name)

    visit(tree, None)
    return found


def test_every_factory_names_a_device():
    files = glob.glob(osp.join(ROOT, 'mmvq', '**', '*.py'), recursive=True)
    assert len(files) > 30
    bad = [f for path in files for f in implicit_factories(path)]
    assert not bad, 'tensor factories without device=: ' + ', '.join(bad)


def test_the_check_finds_an_implicit_factory(tmp_path):
    src = tmp_path / 'probe.py'
    src.write_text('import torch\n\n\ndef f(x):\n    return torch.arange(3) + x\n\n\n'
                   'class Q:\n    def __init__(self):\n        self.b = torch.ones(1)\n')
    assert [f.split(' ')[1] for f in implicit_factories(str(src))] == ['torch.arange']

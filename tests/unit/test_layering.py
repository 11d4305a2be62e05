"""The package's import graph, function-level imports included, built from
the source with ``ast``: no cycle, and imports flow one way through the layers
quantizers -> modules -> adapters -> conversion -> calibration -> deploy -> runner -> api."""
import ast
import os
import os.path as osp

from helpers import ROOT

PKG = osp.join(ROOT, 'mmvq')
# rank of each part of the package; a module may import only parts of lower
# or equal rank (equal: its own part)
LAYERS = {
    'mmvq.utils': 0, 'mmvq.version': 0, 'mmvq.registry': 0, 'mmvq.schema': 0,
    'mmvq.quantizers': 1,
    'mmvq.modules': 2, 'mmvq.modes': 2.5, 'mmvq.summary': 2.5,
    'mmvq.adapters': 3,
    'mmvq.conversion': 4, 'mmvq.checkpoint': 5,
    'mmvq.calibration': 6,
    'mmvq.deploy': 6.5,
    'mmvq.runner': 7, 'mmvq.analysis': 7,
    'mmvq.api': 8, 'mmvq': 9, 'mmvq.cli': 9,
}


def modules():
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith('.py'):
                rel = osp.relpath(osp.join(folder, f), ROOT)[:-3].replace(os.sep, '.')
                out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = \
                    osp.join(folder, f)
    return out


def imports(name, path, known):
    """mmvq modules ``name`` imports anywhere in its file."""
    is_pkg = path.endswith('__init__.py')
    base = name.split('.') if is_pkg else name.split('.')[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ''
            if node.level:
                mod = '.'.join(base[:len(base) - node.level + 1] + ([mod] if mod else []))
            targets = [f'{mod}.{a.name}' if f'{mod}.{a.name}' in known else mod
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def graph():
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def layer(name):
    parts = name.split('.')
    for k in range(len(parts), 0, -1):
        key = '.'.join(parts[:k])
        if key in LAYERS:
            return key
    raise AssertionError(f'{name} is in no layer of LAYERS: add it')


def find_cycle(g):
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(g[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                cycle = visit(m)
                if cycle:
                    return cycle
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state:
            cycle = visit(n)
            if cycle:
                return cycle
    return None


def test_the_graph_is_read_from_every_file():
    g = graph()
    assert len(g) > 50
    # a function-level import counts as much as a top-level one
    assert 'mmvq.runner.loop' in g['mmvq.runner.hook']
    assert 'mmvq.calibration.search' in g['mmvq.calibration.driver']


def test_import_graph_has_no_cycle():
    g = graph()
    # the checker finds a cycle when there is one
    assert find_cycle(dict(g, **{'mmvq.schema': g['mmvq.schema'] | {'mmvq.api'}})) is not None
    cycle = find_cycle(g)
    assert cycle is None, ' -> '.join(cycle)


def test_imports_flow_one_way_through_the_layers():
    bad = []
    for name, targets in graph().items():
        for t in targets:
            a, b = layer(name), layer(t)
            if a != b and not (name == 'mmvq' or LAYERS[a] > LAYERS[b]):
                bad.append(f'{name} ({a}) imports {t} ({b})')
    assert not bad, '\n'.join(bad)


def test_utils_import_no_domain_module():
    bad = {n: sorted(t for t in ts if not t.startswith('mmvq.utils'))
           for n, ts in graph().items() if n.startswith('mmvq.utils')}
    assert not any(bad.values()), bad


def test_no_test_file_imports_another():
    """Shared helpers live in tests/helpers.py (fixtures in conftest.py)."""
    bad = []
    for folder, _, files in os.walk(osp.join(ROOT, 'tests')):
        for f in files:
            if not f.endswith('.py'):
                continue
            path = osp.join(folder, f)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ''] if isinstance(node, ast.ImportFrom) else [])
                bad += [f'{osp.relpath(path, ROOT)}:{node.lineno} imports {n}' for n in names
                        if n.split('.')[0].startswith('test_') or n == 'conftest']
    assert not bad, '\n'.join(bad)

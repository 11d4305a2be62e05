"""Outside ``mmvq/quantizers/`` nothing asks a quantizer's class: code reads the
capabilities a quantizer declares (``BaseQuantizer.quantizes_weights``,
``affine``, ...) and the per-class registries (export forms, FPCS strategies,
reconstruction treatments). Checked on the source with ``ast``, like
``test_layering.py`` checks the imports."""
import ast
import os
import os.path as osp

import pytest

import mmvq
from helpers import ROOT
from mmvq.quantizers.base import BaseQuantizer
from mmvq.utils.classmap import ClassMap

SCANNED = ('mmvq', 'tools')
EXEMPT = osp.join('mmvq', 'quantizers')


def concrete_quantizer_names():
    names = {cls.__name__ for cls in mmvq.QUANTIZERS.module_dict.values()
             if issubclass(cls, BaseQuantizer) and cls is not BaseQuantizer}

    def walk(cls):
        for sub in cls.__subclasses__():
            if sub.__module__.startswith('mmvq.'):
                names.add(sub.__name__)
            walk(sub)
    walk(BaseQuantizer)
    return names


def _named(node, names):
    """The concrete class ``node`` names (``X``, ``mod.X``, ``'X'``,
    ``QUANTIZERS.get('X')``), or None."""
    if isinstance(node, ast.Name) and node.id in names:
        return node.id
    if isinstance(node, ast.Attribute) and node.attr in names:
        return node.attr
    if isinstance(node, ast.Constant) and node.value in names:
        return node.value
    if isinstance(node, ast.Call) and node.args and isinstance(node.func, ast.Attribute) \
            and node.func.attr == 'get':
        return _named(node.args[0], names)
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        for elt in node.elts:
            hit = _named(elt, names)
            if hit:
                return hit
    return None


def class_checks(source, names, path='<src>'):
    """``(line, what)`` of every test of an object against a concrete quantizer class:
    ``isinstance`` / ``issubclass``, ``type(q) is X``, ``is``/``==``/``in``
    comparisons with the class, its name or its registry entry, and module-level
    tuples of class names (an allow-list by name)."""
    tree = ast.parse(source, path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ('isinstance', 'issubclass') and len(node.args) == 2:
            hit = _named(node.args[1], names)
            if hit:
                found.append((node.lineno, f'{node.func.id}(..., {hit})'))
        elif isinstance(node, ast.Compare):
            for operand in [node.left] + node.comparators:
                hit = _named(operand, names)
                if hit:
                    found.append((node.lineno, f'comparison with {hit}'))
                    break
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List, ast.Set)) \
                and node.value.elts and all(_named(e, names) for e in node.value.elts) \
                and all(isinstance(e, ast.Constant) for e in node.value.elts):
            found.append((node.lineno, 'module-level list of quantizer class names'))
    return found


def test_no_concrete_quantizer_class_checks_outside_quantizers():
    names = concrete_quantizer_names()
    assert {'UniformQuantizer', 'PTFQuantizer', 'LogIntSoftmax', 'AdaLogQuantizer',
            'IGQQuantizer'} <= names
    bad = []
    for top in SCANNED:
        for folder, _, files in os.walk(osp.join(ROOT, top)):
            rel_folder = osp.relpath(folder, ROOT)
            if rel_folder == EXEMPT or rel_folder.startswith(EXEMPT + os.sep):
                continue
            for f in files:
                if f.endswith('.py'):
                    path = osp.join(folder, f)
                    with open(path) as fh:
                        for line, what in class_checks(fh.read(), names, path):
                            bad.append(f'{osp.relpath(path, ROOT)}:{line}: {what}')
    assert not bad, ('ask a capability or a registry (mmvq/quantizers/base.py) instead of the '
                     'class:\n' + '\n'.join(bad))


@pytest.mark.parametrize('src, hits', [
    ('isinstance(q, UniformQuantizer)', 1),
    ('isinstance(q, (UniformQuantizer, AdaLogQuantizer)) and q.enabled', 1),
    ('isinstance(q, quantizers.IGQQuantizer)', 1),
    ("QUANTIZERS.get(t) is QUANTIZERS.get('PTFQuantizer')", 1),
    ("qcls.__name__ not in ('UniformQuantizer', )", 1),
    ("WEIGHT = ('UniformQuantizer', )", 1),
    ('type(q) is LogIntSoftmax', 1),
    ('isinstance(q, BaseQuantizer) and q.affine', 0),
    ("cfg = dict(type='UniformQuantizer', bits=8)", 0),
])
def test_the_checker_finds_each_form_of_class_test(src, hits):
    assert len(class_checks(src, concrete_quantizer_names())) == hits


def test_capabilities_of_the_builtin_quantizers():
    from mmvq.quantizers import (AdaLogQuantizer, IGQQuantizer, LogIntSoftmax, PTFQuantizer,
                                 UniformQuantizer)
    caps = ('quantizes_weights', 'affine', 'free_affine', 'power_of_two_factors',
            'integer_softmax', 'allocates_groups')
    table = {cls.__name__: {c for c in caps if getattr(cls, c)}
             for cls in (UniformQuantizer, PTFQuantizer, LogIntSoftmax, AdaLogQuantizer,
                         IGQQuantizer)}
    assert table == dict(UniformQuantizer={'quantizes_weights', 'affine', 'free_affine'},
                         PTFQuantizer={'power_of_two_factors'},
                         LogIntSoftmax={'integer_softmax'}, AdaLogQuantizer=set(),
                         IGQQuantizer={'allocates_groups'})
    assert AdaLogQuantizer(bits=4, shift=0.17).shifted and not AdaLogQuantizer(bits=4).shifted
    assert not UniformQuantizer().shifted


def test_registries_of_the_builtin_quantizers():
    from mmvq.calibration import FPCS_STRATEGIES, RECON_TREATMENTS
    from mmvq.deploy import EXPORT_FORMS
    from mmvq.quantizers import (AdaLogQuantizer, IGQQuantizer, LogIntSoftmax, PTFQuantizer,
                                 UniformQuantizer)

    def builtin(registry):      # other test modules register classes of their own
        return [c.__name__ for c in registry.classes() if c.__module__.startswith('mmvq.')]
    assert builtin(EXPORT_FORMS) == [
        'AdaLogQuantizer', 'IGQQuantizer', 'LogIntSoftmax', 'PTFQuantizer', 'UniformQuantizer']
    assert EXPORT_FORMS.get(UniformQuantizer()).weight is not None
    assert all(EXPORT_FORMS.get(c).weight is None
               for c in (PTFQuantizer, AdaLogQuantizer, IGQQuantizer, LogIntSoftmax))
    assert builtin(FPCS_STRATEGIES) == ['AdaLogQuantizer', 'UniformQuantizer']
    assert builtin(RECON_TREATMENTS) == ['UniformQuantizer']


def test_classmap_follows_the_mro_and_names_the_fix():
    m = ClassMap('thing', 'register one with m.register(<class>, value)')

    class A:
        pass

    class B(A):
        pass

    m.register(A, 'a')
    assert m.get(B()) == 'a' and m.get(B) == 'a' and B() in m
    m.register(B, 'b')
    assert m.get(B()) == 'b' and m.get(A()) == 'a'
    with pytest.raises(KeyError, match='already registered'):
        m.register(A, 'again')
    m.register(A, 'again', force=True)
    assert m.get(A) == 'again'
    with pytest.raises(LookupError) as err:
        m.require(object(), 'layer.q')
    assert str(err.value) == ('layer.q: object has no thing: register one with '
                              'm.register(<class>, value)')

"""Values registered per class and found along an object's method resolution order.

The per-method parts of mmvq that depend on a quantizer's class — its ONNX
export form (:data:`mmvq.deploy.EXPORT_FORMS`), its FPCS search strategy
(:data:`mmvq.calibration.FPCS_STRATEGIES`), its treatment during block
reconstruction (:data:`mmvq.calibration.RECON_TREATMENTS`) — are
:class:`ClassMap` s: a quantizer class registers its entry once, next to its
definition or in a plugin module, and the code that needs it looks it up by
the object it holds. A subclass inherits its base's entry unless it registers
its own.
"""


class ClassMap:
    """``{class: value}`` looked up along ``type(obj).__mro__``.

    Args:
        what (str): what a value is ("ONNX export form"), for messages.
        how (str): how to register one, the fix a missing entry's error names.
    """

    def __init__(self, what, how):
        self.what = what
        self.how = how
        self._map = {}

    def register(self, cls, value=None, force=False):
        """Register ``value`` for ``cls``; without ``value`` a decorator.

        Args:
            cls (type): the class (its subclasses inherit the entry).
            value (object | None): the entry.
            force (bool): replace an existing entry of ``cls``.
        """
        if not isinstance(cls, type):
            raise TypeError(f'{self.what}: register a class, not {cls!r}')

        def add(v):
            if cls in self._map and not force:
                raise KeyError(f'{self.what} of {cls.__name__} is already registered '
                               '(pass force=True to replace it)')
            self._map[cls] = v
            return v
        return add if value is None else add(value)

    def unregister(self, cls):
        self._map.pop(cls, None)

    def get(self, obj, default=None):
        """The entry of ``obj`` (an instance or a class), or ``default``."""
        cls = obj if isinstance(obj, type) else type(obj)
        for c in cls.__mro__:
            if c in self._map:
                return self._map[c]
        return default

    def require(self, obj, where=''):
        """The entry of ``obj``; a one-line :class:`LookupError` naming the fix if none."""
        value = self.get(obj)
        if value is None:
            cls = obj if isinstance(obj, type) else type(obj)
            at = f'{where}: ' if where else ''
            raise LookupError(f'{at}{cls.__name__} has no {self.what}: {self.how}')
        return value

    def __contains__(self, obj):
        return self.get(obj) is not None

    def classes(self):
        """Registered classes, by name."""
        return sorted(self._map, key=lambda c: c.__name__)

    def __repr__(self):
        names = ', '.join(c.__name__ for c in self.classes())
        return f'ClassMap({self.what}: {names})'


__all__ = ['ClassMap']

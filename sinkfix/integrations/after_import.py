"""Run a function as soon as a module has been imported, without importing it ourselves.

``import sinkfix`` promises that ``from_pretrained(..., attn_implementation="sinkfix")`` works. The
registries that name lives in are defined in ``transformers.modeling_utils`` and
``transformers.masking_utils``, whose import costs several seconds (``modeling_utils`` pulls in the
cache classes, which import ``hqq`` when it is installed): ``sinkfix --help`` took 8.6-9.7 s on an
idle 2-core CPU while ``import sinkfix`` registered eagerly, 2.0-2.7 s since. So registration waits
for those modules: a finder at the front of ``sys.meta_path`` recognises their names, lets the other
finders locate them as usual and wraps the loader so that the waiting functions run right after the
module's code has run, before the import statement that asked for it returns. A module that is
already imported gets its functions called at once.

The functions must only use the module they are handed and what is already imported: they run in
the middle of someone else's import, where importing more of the same package could meet a module
that is still half-initialised.
"""

from __future__ import annotations

import sys
import threading
import warnings
from types import ModuleType
from typing import Any, Callable

AfterImport = Callable[[ModuleType], None]

_lock = threading.Lock()
_waiting: dict[str, list[AfterImport]] = {}


def call_after_import(module_name: str, function: AfterImport) -> None:
    """Call ``function(module)`` once ``module_name`` is imported: now if it already is, otherwise
    right after its code has run. A failure inside ``function`` becomes a warning, never a failed
    import of somebody else's module."""
    module = sys.modules.get(module_name)
    if module is not None:
        _call(module_name, function, module)
        return
    with _lock:
        _waiting.setdefault(module_name, []).append(function)
        if not any(isinstance(finder, _WaitingFinder) for finder in sys.meta_path):
            sys.meta_path.insert(0, _WaitingFinder())


def waiting_modules() -> tuple[str, ...]:
    """Names of modules whose import is still awaited."""
    with _lock:
        return tuple(_waiting)


def _call(module_name: str, function: AfterImport, module: ModuleType) -> None:
    try:
        function(module)
    except Exception as exc:  # the importer of module_name must not fail because of us
        warnings.warn(f"sinkfix: {getattr(function, '__qualname__', function)!s} after importing {module_name} "
                      f"failed: {type(exc).__name__}: {exc}", RuntimeWarning, stacklevel=2)


def _module_ran(module_name: str, module: ModuleType) -> None:
    with _lock:
        functions = _waiting.pop(module_name, [])
        if not _waiting:
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _WaitingFinder)]
    for function in functions:
        _call(module_name, function, module)


class _RunAfterExec:
    """The real loader, with the waiting functions run after ``exec_module``. Everything else
    (``get_source``, resource readers, ``is_package``...) is the real loader's."""

    def __init__(self, loader: Any, module_name: str) -> None:
        self._loader = loader
        self._module_name = module_name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _module_ran(self._module_name, module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _WaitingFinder:
    """Finds nothing itself: asks the finders behind it and wraps the loader of an awaited module."""

    def find_spec(self, fullname: str, path=None, target=None):
        with _lock:
            if fullname not in _waiting:
                return None
        for finder in list(sys.meta_path):
            if isinstance(finder, _WaitingFinder):
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RunAfterExec(spec.loader, fullname)
        return spec

"""Stage lookup: job specs name stages; this finds each name's class. There is no central
list: a :class:`~pairsift.stages.base.Stage` subclass registers itself under its ``name`` when
its module is imported (see ARCHITECTURE.md, "The stage contract").

A name is looked up in this order: stages already registered; pairsift's own stage modules
(every module of this package, imported on first lookup: they import their heavy
dependencies in ``setup()``, so this is cheap); stages other packages declare in the
``pairsift.stages`` entry-point group (``myname = "mypkg.module:MyStage"``); and an import
path written in the job spec itself (``mypkg.module:MyStage``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil

_DISCOVERED = False
ENTRY_POINT_GROUP = "pairsift.stages"
#: Stage modules that failed to import: module -> the error (shown with an unknown stage name).
IMPORT_ERRORS: dict[str, str] = {}


def _discover() -> None:
    """Import pairsift's own stage modules once, so that their stages register."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    for info in pkgutil.iter_modules(__path__, __name__ + "."):
        try:
            importlib.import_module(info.name)
        except Exception as e:  # noqa: BLE001 - a broken module must not hide the others
            IMPORT_ERRORS[info.name] = f"{type(e).__name__}: {e}"


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    try:
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:
        return {}


def stage_names() -> list[str]:
    """Names of every stage available: pairsift's own and those other packages declare."""
    from pairsift.stages.base import REGISTERED

    _discover()
    return sorted(set(REGISTERED) | set(_entry_points()))


def get_stage_class(name: str):
    """The stage class registered as ``name``, declared by another package under that name,
    or named by an import path (``package.module:Class``); KeyError if none."""
    from pairsift.stages.base import REGISTERED, Stage

    if name not in REGISTERED:
        _discover()
    cls = REGISTERED.get(name)
    if cls is None:
        ep = _entry_points().get(name)
        target = ep.value if ep is not None else (name if ":" in name else None)
        if target is None:
            broken = "; ".join(f"{m} failed to import ({err})" for m, err in sorted(IMPORT_ERRORS.items()))
            raise KeyError(f"{name} ({broken})" if broken else name)
        module, _, attr = target.partition(":")
        try:
            cls = importlib.import_module(module)
            for part in attr.split("."):
                cls = getattr(cls, part)
        except (ImportError, AttributeError) as e:
            raise KeyError(f"{name} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise KeyError(f"{name} is not a pairsift Stage")
    return cls

"""Task references: ``MODULE:FACTORY``, ``path/to/file.py:FACTORY`` or a built-in task's name.

Kept free of torch so that a reference that names nothing fails at once (the CLI checks it
before starting any process); gradwire.task.load_task calls the factory.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradwire.catalog import DATASETS


class TaskError(ValueError):
    """A task reference that cannot be resolved, or a task that breaks the interface; one line."""


def is_builtin(ref: str) -> bool:
    return ref.strip() in DATASETS


def _import_module(module_ref: str):
    if module_ref.endswith(".py"):
        path = Path(module_ref)
        if not path.is_file():
            raise TaskError(f"task file {module_ref} does not exist")
        name = f"gradwire_user_task_{path.stem}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise TaskError(f"task file {module_ref} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        return module
    # The console script does not put the current folder on sys.path (python -m does): a task
    # module next to where the user runs `gradwire` should be found either way.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(module_ref)
    except ModuleNotFoundError as exc:
        if exc.name and module_ref.startswith(exc.name):
            raise TaskError(f"task module {module_ref!r} not found (is its folder on PYTHONPATH?)") from None
        raise TaskError(f"task module {module_ref!r} failed to import: {exc}") from None


def resolve_factory(ref: str) -> Callable[..., Any]:
    """The factory a task reference names; TaskError with the reason when there is none."""
    ref = ref.strip()
    if is_builtin(ref):
        from gradwire.tasks import BUILTIN_TASKS  # imports torch: only for a task that exists

        return BUILTIN_TASKS[ref]
    if ":" not in ref:
        raise TaskError(f"unknown task {ref!r}: give MODULE:FACTORY (or file.py:FACTORY) or one of "
                        f"{', '.join(DATASETS)}")
    module_ref, _, attr = ref.rpartition(":")
    if not module_ref or not attr:
        raise TaskError(f"task reference {ref!r} must be MODULE:FACTORY")
    try:
        module = _import_module(module_ref)
    except TaskError:
        raise
    except Exception as exc:  # the user's module raised while importing: say which and what
        raise TaskError(f"task module {module_ref!r} failed to import: {type(exc).__name__}: {exc}") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise TaskError(f"task module {module_ref!r} has no callable {attr!r}")
    return factory

"""gradwire: a gRPC parameter server for communication-efficient distributed training.

The user-facing API, imported lazily so that `gradwire` commands start without torch:

- :class:`gradwire.Task`: bring your own model and data (gradwire/task.py, docs/tasks.md),
- :class:`gradwire.DistributedOptimizer`: keep your own training loop (gradwire/optimizer.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Task", "TaskError", "DistributedOptimizer"]

if TYPE_CHECKING:
    from gradwire.optimizer import DistributedOptimizer
    from gradwire.task import Task
    from gradwire.taskref import TaskError


def __getattr__(name: str) -> Any:
    if name == "Task":
        from gradwire.task import Task

        return Task
    if name == "TaskError":
        from gradwire.taskref import TaskError

        return TaskError
    if name == "DistributedOptimizer":
        from gradwire.optimizer import DistributedOptimizer

        return DistributedOptimizer
    raise AttributeError(f"module 'gradwire' has no attribute {name!r}")

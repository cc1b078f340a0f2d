"""The workbench's own exceptions: short messages that say what was wrong and what to do.

Every error a user can cause derives from `WorkbenchError`, so a notebook can catch them all at once. The ones about
bad arguments also derive from `ValueError`, the ones about missing things from `LookupError`, as Python users expect.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Base of every error the workbench raises on purpose."""


class UnknownEngineError(WorkbenchError, LookupError):
    """The engine name is not one the workbench knows."""


class EngineNotInstalledError(WorkbenchError, ImportError):
    """The engine is known but its package is not installed here."""


class ModelNotFoundError(WorkbenchError, LookupError):
    """The model is neither an alias, a local folder, nor reachable on the hub."""


class InvalidRequestError(WorkbenchError, ValueError):
    """A generation argument or a prompt is not acceptable."""


class UnsupportedOptionError(WorkbenchError, ValueError):
    """An engine option this engine or this machine cannot honour (for example bfloat16 on a CPU without it)."""


class EngineCrashedError(WorkbenchError):
    """An engine's worker process ended while serving (a signal, the out-of-memory killer, a native crash)."""

"""Errors a user can act on.

Every error the engine raises for bad input derives from :class:`NbtunerError`, so the CLI can
print one readable line (exit 2) and the notebook layer can show it without a traceback dump.
"""
from __future__ import annotations


class NbtunerError(Exception):
    """Base class: the message alone must tell the user what to fix."""

    def _render_traceback_(self) -> list[str]:
        """IPython shows this instead of a traceback: one readable line (no IPython import here)."""
        return [f"{type(self).__name__}: {self}"]


class ConfigError(NbtunerError):
    """A setting is unknown, has the wrong type or an impossible value."""


class DataError(NbtunerError):
    """A dataset file or record is unusable; names the file, the record and the field."""

    def __init__(self, message: str, *, file: str | None = None, record: int | None = None,
                 field: str | None = None) -> None:
        self.file, self.record, self.field, self.reason = file, record, field, message
        where = []
        if file is not None:
            where.append(str(file))
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class ModelError(NbtunerError):
    """A model spec cannot be resolved or loaded (missing folder, offline without a cache...)."""


class OutputExistsError(NbtunerError):
    """Refuses to overwrite an existing output unless the caller asked for it with force."""


class MissingDependencyError(NbtunerError):
    """An optional library is needed for what was asked; the message says what to install."""

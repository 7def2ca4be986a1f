"""How the data adapters refuse input.

Every refusal in ``data_adapters`` raises :class:`DataError`, which names the
offending path and says what is wrong in one line, so a command-line front end
can print ``str(error)`` and exit without a traceback.  Cases that a site-level
run skips instead of refusing are recorded as :class:`SkippedCase`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class DataError(Exception):
    """Input data that the adapters refuse.

    Parameters
    ----------
    path
        The file or folder at fault (or the closest one known).
    reason
        What is wrong with it, in words a site operator can act on.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        # One line, whatever the reason text carried (library messages are multi-line).
        self.reason = " ".join(str(reason).split())
        super().__init__(self.path, self.reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class SkippedCase:
    """A case left out of a harmonised site, with the file at fault and why."""

    case_id: str
    file: str
    reason: str

    @classmethod
    def from_error(cls, case_id: str, error: DataError) -> SkippedCase:
        """Record ``error`` as the reason ``case_id`` was skipped."""
        return cls(case_id=case_id, file=str(error.path), reason=error.reason)


def itk_message(err: RuntimeError) -> str:
    """Keep the informative last line of an ITK exception message (the rest is C++ context)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"

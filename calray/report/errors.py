"""The report's own error: a missing or corrupt sweep/run directory, or an unreadable paper file."""

from __future__ import annotations

from calray.errors import CalrayError


class ReportError(CalrayError):
    """A missing or corrupt sweep/run directory; names the path at fault."""

"""Error types that map onto the tool's exit codes.

* :class:`InputError` -- bad input or usage (exit code 2).
* :class:`GateFailed` -- a validation gate failed (exit code 1).

Library code raises these; only the CLI turns them into exit codes.
"""

from __future__ import annotations


class RewriterError(Exception):
    """Base class for every error the tool reports to a user."""

    exit_code = 2


class InputError(RewriterError):
    """The model, a file or an option given by the user cannot be used."""

    exit_code = 2


class GateFailed(RewriterError):
    """A numerics, metric or latency gate failed."""

    exit_code = 1

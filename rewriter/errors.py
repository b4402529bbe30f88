"""Error types that map onto the tool's exit codes.

* :class:`InputError` -- bad input or usage (exit code 2); :class:`UnresolvedShape` is the kind a model
  without its input shapes raises.
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


class UnresolvedShape(InputError):
    """An input's shape cannot be resolved from the model alone (not a tensor, no declared shape, a dynamic dim
    other than the batch): needed only once feeds have to be made, and fixed by ``--input-shape``."""


class GateFailed(RewriterError):
    """A numerics, metric or latency gate failed."""

    exit_code = 1

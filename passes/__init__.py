"""The built-in passes. ``ALL_PASSES`` is the registry: an explicit tuple, in the order the default
pipeline runs them. One module per pass; the module, the class's ``name`` and the CLI name match.
"""

from passes.fuse_1x1_chain import Fuse1x1Chain

ALL_PASSES = (Fuse1x1Chain,)

__all__ = ["ALL_PASSES", "Fuse1x1Chain"]

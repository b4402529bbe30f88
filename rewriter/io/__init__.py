"""Safe model I/O: load (:mod:`.load`), normalizing export quirks (:mod:`.normalize`), structural checks
(:mod:`.check`), atomic save (:mod:`.save`).

:func:`load_model` trusts nothing in the file and refuses anything unsafe or malformed with a one-line
:class:`~rewriter.errors.InputError`; :func:`save_model` and :func:`write_atomically` never leave a partial
file at the destination. Walking and copying protobuf messages is in :mod:`.proto`, one-line message text in
:mod:`.text`. Every public name is re-exported here, so ``from rewriter.io import X`` is the import to use.
"""

from rewriter.io.check import check_model_structure
from rewriter.io.load import LoadedModel, check_output_path, input_files, load_model, read_model, sha256_file
from rewriter.io.normalize import normalize_model
from rewriter.io.proto import MAX_SUBGRAPH_DEPTH, PROTOBUF_LIMIT, copy_fields, copy_model, iter_tensors
from rewriter.io.save import EXTERNAL_THRESHOLD, check_destination, save_model, write_atomically
from rewriter.io.text import one_line

__all__ = [
    "EXTERNAL_THRESHOLD",
    "MAX_SUBGRAPH_DEPTH",
    "PROTOBUF_LIMIT",
    "LoadedModel",
    "check_destination",
    "check_model_structure",
    "check_output_path",
    "copy_fields",
    "copy_model",
    "input_files",
    "iter_tensors",
    "load_model",
    "normalize_model",
    "one_line",
    "read_model",
    "save_model",
    "sha256_file",
    "write_atomically",
]

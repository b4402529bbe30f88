"""Safe model I/O.

Loading resolves external data only from inside the model's own folder (no absolute paths, no ``..``,
no symlinks leading out, no ranges past the end of a data file). Saving is atomic: data file first, then
the model, each written to a temporary file in the destination folder and moved into place with
``os.replace``; an existing data file is never appended to. Neither function modifies its input.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from rewriter.errors import InputError

log = logging.getLogger(__name__)

#: Protobuf cannot serialize a message of 2 GiB or more.
PROTOBUF_LIMIT = 2**31 - 1
#: Tensors at least this large go to the data file when saving with external data.
EXTERNAL_THRESHOLD = 1024
_ALIGN = 4096


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of a graph: initializers, sparse values and node attributes, subgraphs too."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from iter_tensors(attr.g)
            for sub in attr.graphs:
                yield from iter_tensors(sub)


def _model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from iter_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _resolve_external_location(base: Path, tensor: onnx.TensorProto) -> tuple[Path, int, int | None]:
    """Check one external-data reference and return (file, offset, length)."""
    info = _external_info(tensor)
    location = info.get("location", "")
    name = tensor.name or "<unnamed>"
    if not location:
        raise InputError(f"tensor {name!r} is marked external but names no data file")
    loc = Path(location)
    if loc.is_absolute() or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise InputError(f"tensor {name!r}: external data location {location!r} is an absolute path")
    if any(part == ".." for part in Path(location.replace("\\", "/")).parts):
        raise InputError(f"tensor {name!r}: external data location {location!r} leaves the model's folder")
    target = base / loc
    real_base = base.resolve()
    try:
        real_target = target.resolve(strict=True)
    except (FileNotFoundError, RuntimeError, OSError):
        raise InputError(f"tensor {name!r}: external data file {location!r} not found") from None
    if real_base not in real_target.parents:
        raise InputError(f"tensor {name!r}: external data location {location!r} resolves outside the model's folder")
    if not real_target.is_file():
        raise InputError(f"tensor {name!r}: external data location {location!r} is not a regular file")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise InputError(f"tensor {name!r}: external data offset/length are not integers") from None
    size = real_target.stat().st_size
    if offset < 0 or (length is not None and length < 0):
        raise InputError(f"tensor {name!r}: negative external data offset or length")
    end = offset + (length if length is not None else 0)
    if offset > size or end > size:
        raise InputError(
            f"tensor {name!r}: external data range [{offset}, {end}) lies beyond the end of {location!r} ({size} bytes)"
        )
    return real_target, offset, length


def _load_external(model: onnx.ModelProto, base: Path) -> None:
    """Read every external tensor's bytes into ``raw_data`` after checking its location."""
    for tensor in _model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        target, offset, length = _resolve_external_location(base, tensor)
        with open(target, "rb") as fh:
            fh.seek(offset)
            data = fh.read() if length is None else fh.read(length)
        tensor.raw_data = data
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def load_model(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> onnx.ModelProto:
    """Load an ONNX model with its external data, refusing anything unsafe or malformed.

    Raises :class:`InputError` (one line, no traceback needed) for a missing file, a directory, an
    unparsable or structurally invalid model, or external data outside the model's folder.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not an ONNX model file")
    if not p.is_file():
        raise InputError(f"{p}: not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise InputError(f"{p}: empty file")
    if max_bytes is not None and size > max_bytes:
        raise InputError(f"{p}: {size} bytes exceeds the limit of {max_bytes} bytes (--max-model-bytes)")
    try:
        with open(p, "rb") as fh:
            model = onnx.ModelProto.FromString(fh.read())
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InputError(f"{p}: not an ONNX model (protobuf parse failed: {_first_line(exc)})") from None
    if not model.HasField("graph") or not model.graph.node:
        raise InputError(f"{p}: not an ONNX model (no graph or no nodes)")
    _load_external(model, p.parent)
    check_model_structure(model, str(p))
    return model


def check_model_structure(model: onnx.ModelProto, what: str = "model") -> None:
    """Run the ONNX checker (structure, opsets, topological order) and raise InputError on failure."""
    try:
        if model.ByteSize() < PROTOBUF_LIMIT:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise InputError(f"{what}: invalid ONNX model: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _fsync_write(fh, data: bytes) -> None:  # type: ignore[no-untyped-def]
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def _tensor_nbytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in _model_tensors(model))


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically; return the path.

    ``external_data=None`` stores weights in a side file ``<name>.data`` only when the model would
    exceed protobuf's 2 GiB limit. The data file is written fresh (never appended to) and moved into
    place before the model file, so a reader never sees a model that points at missing data.
    """
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{out}: output folder {folder} does not exist")
    if out.is_dir():
        raise InputError(f"{out}: is a directory")
    if out.is_symlink():
        log.warning("%s is a symbolic link; it is replaced by a regular file, its target is left alone", out)
    if external_data is None:
        external_data = _tensor_nbytes(model) + 64 * 1024 * 1024 >= PROTOBUF_LIMIT
    to_write = model
    data_name = out.name + ".data"
    data_tmp: str | None = None
    try:
        if external_data:
            to_write = onnx.ModelProto()
            to_write.CopyFrom(model)
            fd, data_tmp = tempfile.mkstemp(prefix=f".{data_name}.", suffix=".tmp", dir=folder)
            with os.fdopen(fd, "wb") as fh:
                offset = 0
                for tensor in _model_tensors(to_write):
                    if not tensor.HasField("raw_data") or len(tensor.raw_data) < EXTERNAL_THRESHOLD:
                        continue
                    pad = (-offset) % _ALIGN
                    fh.write(b"\0" * pad)
                    offset += pad
                    blob = tensor.raw_data
                    fh.write(blob)
                    tensor.ClearField("raw_data")
                    tensor.data_location = onnx.TensorProto.EXTERNAL
                    del tensor.external_data[:]
                    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(len(blob)))):
                        entry = tensor.external_data.add()
                        entry.key, entry.value = key, value
                    offset += len(blob)
                fh.flush()
                os.fsync(fh.fileno())
        payload = to_write.SerializeToString()
        fd, model_tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                _fsync_write(fh, payload)
            if data_tmp is not None:
                os.replace(data_tmp, folder / data_name)
                data_tmp = None
            os.replace(model_tmp, out)
        except BaseException:
            if os.path.exists(model_tmp):
                os.unlink(model_tmp)
            raise
    finally:
        if data_tmp is not None and os.path.exists(data_tmp):
            os.unlink(data_tmp)
    return out


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy, so that callers' in-memory models are never modified."""
    clone = onnx.ModelProto()
    clone.CopyFrom(model)
    return clone

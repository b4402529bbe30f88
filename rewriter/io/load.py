"""Safe model loading.

:func:`load_model` trusts nothing in the file, and refuses with a one-line :class:`InputError` naming the
problem:

* the model file and every data file must be regular files; they are opened without blocking and checked
  on the open descriptor, so a named pipe or a device is refused, never read;
* external data is read only from inside the model's own folder: no absolute path, no ``..``, no NUL
  byte, no symlink (of the file or of a folder on the way) resolving outside, no byte range past the end
  of the file -- all checked before anything is read or allocated;
* a data file with more than one hard link is refused. A hard link inside the folder to a file outside
  it cannot be told apart from a private file by its path; its link count is the only evidence, so the
  policy is to refuse every shared inode (copy the file to break the link);
* ``max_bytes`` bounds the model file plus every external byte range, checked before reading them;
* every string field must be valid UTF-8; protobuf's own recursion limit (about 30 levels of nested
  messages) is reported as such;
* then the structural checks of :mod:`rewriter.io.check` (opsets and nesting before external data is
  read, the rest after) -- once the harmless export quirks onnxruntime accepts (an opset imported twice,
  an IR-3 model whose initializers are not graph inputs, nodes out of topological order) are normalized
  in memory by :mod:`rewriter.io.normalize`. :func:`read_model` also says what was normalized.

Nothing here modifies a file.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import DecodeError

from rewriter.errors import InputError
from rewriter.io.check import check_declared, check_limits, check_model_structure, check_opsets, expected_bytes, size_message
from rewriter.io.normalize import normalize_model
from rewriter.io.proto import PROTOBUF_LIMIT, model_tensors
from rewriter.io.text import first_line, one_line


# -- reading files ---------------------------------------------------------------------------------------
def _open_regular(path: str | os.PathLike[str], what: str, *, follow: bool = True) -> BinaryIO:
    """Open a regular file for reading; refuse pipes, devices, sockets and folders without blocking on them.

    ``follow=False`` also refuses a symlink as the last path component.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputError(f"{what}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{what}: is a directory, not an ONNX model file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{what}: cannot open: {first_line(exc)}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"{what}: is a directory, not an ONNX model file")
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{what}: not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a regular file's bytes (a pipe or device is refused, not read)."""
    digest = hashlib.sha256()
    with _open_regular(path, str(path)) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

# -- external data ---------------------------------------------------------------------------------------
def _external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def _resolve_external_location(base: Path, tensor: onnx.TensorProto) -> tuple[Path, int, int | None]:
    """Check one external-data reference and return (file, offset, length). Reads nothing."""
    info = _external_info(tensor)
    location = info.get("location", "")
    name = tensor.name or "<unnamed>"
    if not location:
        raise InputError(f"tensor {name!r} is marked external but names no data file")
    if "\0" in location:
        raise InputError(f"tensor {name!r}: external data location {location!r} contains a NUL byte")
    loc = Path(location)
    if loc.is_absolute() or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise InputError(f"tensor {name!r}: external data location {location!r} is an absolute path")
    if any(part == ".." for part in Path(location.replace("\\", "/")).parts):
        raise InputError(f"tensor {name!r}: external data location {location!r} leaves the model's folder")
    target = base / loc
    try:
        real_base = base.resolve()
        real_target = target.resolve(strict=True)
    except (RuntimeError, OSError, ValueError):
        raise InputError(f"tensor {name!r}: external data file {location!r} not found") from None
    if real_base not in real_target.parents:
        raise InputError(f"tensor {name!r}: external data location {location!r} resolves outside the model's folder")
    st = real_target.stat()
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"tensor {name!r}: external data location {location!r} is not a regular file")
    if st.st_nlink > 1:
        raise InputError(
            f"tensor {name!r}: external data file {location!r} has {st.st_nlink} hard links; a hard link may lead "
            "outside the model's folder, so shared files are refused (copy it to break the link)"
        )
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise InputError(f"tensor {name!r}: external data offset/length are not integers") from None
    if offset < 0 or (length is not None and length < 0):
        raise InputError(f"tensor {name!r}: negative external data offset or length")
    size = st.st_size
    end = offset + (length if length is not None else 0)
    if offset > size or end > size:
        raise InputError(
            f"tensor {name!r}: external data range [{offset}, {end}) lies beyond the end of {location!r} ({size} bytes)"
        )
    return real_target, offset, length


def _external_refs(model: onnx.ModelProto, base: Path) -> list[tuple[onnx.TensorProto, Path, int, int]]:
    """Every external tensor with its checked (file, offset, length); nothing is read."""
    refs = []
    for tensor in model_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        check_declared(tensor)
        target, offset, length = _resolve_external_location(base, tensor)
        if length is None:
            length = target.stat().st_size - offset
        expected = expected_bytes(tensor)
        if expected is not None and expected != length:
            raise InputError(size_message(tensor, f"need {expected} bytes", f"its external data range holds {length}"))
        refs.append((tensor, target, offset, length))
    return refs


def _read_external(refs: list[tuple[onnx.TensorProto, Path, int, int]]) -> None:
    """Read each external tensor's bytes into ``raw_data``."""
    for tensor, target, offset, length in refs:
        with _open_regular(target, f"external data file {target.name!r}", follow=False) as fh:
            st = os.fstat(fh.fileno())
            if st.st_nlink > 1 or st.st_size < offset + length:  # changed since it was checked
                raise InputError(f"tensor {tensor.name!r}: external data file {target.name!r} changed while loading")
            fh.seek(offset)
            data = fh.read(length)
        if len(data) != length:
            raise InputError(f"tensor {tensor.name!r}: external data file {target.name!r} changed while loading")
        tensor.raw_data = data
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def input_files(path: str | os.PathLike[str]) -> list[Path]:
    """The model file and the (checked) external data files it refers to, reading no tensor data."""
    p = Path(path)
    model = _parse(p, None)
    files = [p]
    for _, target, _, _ in _external_refs(model, p.parent):
        if target not in files:
            files.append(target)
    return files


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies under ``folder`` (links resolved)."""
    return path.resolve().is_relative_to(folder.resolve())


def check_output_path(source: str | os.PathLike[str], output: str | os.PathLike[str], *, in_place: bool = False) -> None:
    """Refuse an output whose model or data file would replace the input model or one of its data files.

    ``in_place`` allows it (the caller asked to overwrite the input).
    """
    out = Path(output)
    targets = [t for t in (out, out.parent / (out.name + ".data")) if t.exists()]
    if in_place or not targets:
        return
    if not any(os.path.samefile(t, source) or _within(t, Path(source).parent) for t in targets):
        return  # (an input's data files lie under its folder: nothing to parse the input for)
    inputs = input_files(source)
    for target in targets:
        for i, existing in enumerate(inputs):
            if os.path.samefile(target, existing):
                what = "is the input file" if target == out and i == 0 else f"would overwrite the input's {'model' if i == 0 else 'data'} file {existing.name!r}"
                raise InputError(f"{output}: {what}; pass --in-place to overwrite it")


# -- loading ---------------------------------------------------------------------------------------------
def _check_text(model: onnx.ModelProto) -> None:
    """Every string field is valid UTF-8 (protobuf parses proto2 strings unchecked; writing one would raise).

    Walks the descriptors without touching bytes fields, so tensor data is not copied.
    """
    stack: list = [model]
    while stack:
        msg = stack.pop()
        for field in msg.DESCRIPTOR.fields:
            repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
            if field.type == field.TYPE_MESSAGE:
                if repeated:
                    stack.extend(getattr(msg, field.name))
                elif msg.HasField(field.name):
                    stack.append(getattr(msg, field.name))
            elif field.type == field.TYPE_STRING:
                try:
                    value = getattr(msg, field.name)
                    values = list(value) if repeated else [value]
                except UnicodeDecodeError:
                    values = [b""]
                if any(isinstance(v, bytes) for v in values):  # upb hands back bytes it cannot decode
                    raise InputError(f"not an ONNX model: a {msg.DESCRIPTOR.name}.{field.name} is not valid UTF-8 text")


def _parse(p: Path, max_bytes: int | None) -> onnx.ModelProto:
    with _open_regular(p, str(p)) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise InputError(f"{p}: empty file")
        if max_bytes is not None and size > max_bytes:
            raise InputError(f"{p}: {size} bytes exceeds the limit of {max_bytes} bytes (--max-model-bytes)")
        if size > PROTOBUF_LIMIT:
            raise InputError(f"{p}: {size} bytes is over protobuf's 2 GiB limit; keep the weights in external data")
        payload = fh.read()
    try:
        model = onnx.ModelProto.FromString(payload)
    except (DecodeError, RuntimeError, ValueError, RecursionError) as exc:
        text = first_line(exc)
        if "depth" in text.lower() or "recursion" in text.lower() or isinstance(exc, RecursionError):
            raise InputError(f"{p}: not an ONNX model: messages nested too deeply for protobuf to parse (subgraphs nested beyond its recursion limit)") from None
        raise InputError(f"{p}: not an ONNX model (protobuf parse failed: {text})") from None
    try:
        _check_text(model)
    except InputError as exc:
        raise InputError(f"{p}: {exc}") from None
    if not model.HasField("graph") or not model.graph.node:
        raise InputError(f"{p}: not an ONNX model (no graph or no nodes)")
    return model


@dataclass(frozen=True)
class LoadedModel:
    """A model as loaded: its proto, and one short note per export quirk normalized on the way in."""

    proto: onnx.ModelProto
    normalized: tuple[str, ...] = ()


def read_model(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> LoadedModel:
    """Load an ONNX model with its external data, refusing anything unsafe or malformed.

    Raises :class:`InputError` (one line, no traceback needed) for a missing file, a directory or other
    non-regular file, an unparsable or structurally invalid model, external data outside the model's
    folder, or more than ``max_bytes`` bytes of model file plus external data. Harmless export quirks
    that onnxruntime accepts are normalized in memory first (:mod:`rewriter.io.normalize`); the result
    says which.
    """
    p = Path(path)
    try:
        model = _parse(p, max_bytes)
    except InputError as exc:
        raise InputError(one_line(str(exc))) from None
    try:
        normalized = normalize_model(model)
        check_opsets(model)
        check_limits(model)
        refs = _external_refs(model, p.parent)
        if max_bytes is not None and refs:
            total = p.stat().st_size + sum(length for _, _, _, length in refs)
            if total > max_bytes:
                raise InputError(
                    f"{total} bytes of model file and external data exceeds the limit of {max_bytes} bytes (--max-model-bytes)"
                )
        _read_external(refs)
        check_model_structure(model)
    except InputError as exc:
        raise InputError(one_line(f"{p}: {exc}")) from None
    return LoadedModel(model, tuple(normalized))


def load_model(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> onnx.ModelProto:
    """:func:`read_model`'s proto: the model, checked and normalized."""
    return read_model(path, max_bytes=max_bytes).proto

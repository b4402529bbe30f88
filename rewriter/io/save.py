"""Atomic saves: of models (with their external data) and of any other output file.

Nothing here leaves a partial file at the destination. Each file is written to a temporary file in the
destination folder (``.NAME.PID.XXXX.tmp``, mode ``0o666 & ~umask`` like any new file), flushed to disk,
then moved into place with ``os.replace``. :func:`save_model` moves the data file first, the model last.
When an existing model at the destination may refer to the data file being replaced, that model is first
moved aside, so that a reader (or a run killed half way) finds the old model with its old data, no model,
or the new model with its new data -- never the old model over new data. The files moved aside
(``.NAME.PID.XXXX.old``; the old data file is kept by a hard link) are removed when the save completes; a
killed save leaves them for recovery by hand. Stale temporary files of this pattern whose process is gone
are removed by the next save to the same path. A symbolic link at a model's destination is replaced by the
new file (its target is never written), with a warning. :func:`write_atomically` writes one file (a report,
a plan, an HTML page) the same way. Neither function modifies its input.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import onnx

from rewriter.errors import InputError
from rewriter.io.proto import PROTOBUF_LIMIT, copy_model, model_tensors
from rewriter.io.text import first_line

log = logging.getLogger(__name__)

#: Tensors at least this large go to the data file when saving with external data.
EXTERNAL_THRESHOLD = 1024
_ALIGN = 4096


def check_destination(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, after refusing (InputError) a missing output folder or a path that is a folder."""
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{out}: output folder {folder} does not exist")
    if out.is_dir():
        raise InputError(f"{out}: is a directory")
    return out


# -- temporary files -------------------------------------------------------------------------------------
def _umask() -> int:
    """The process umask, read from /proc where possible (setting it to read it races with other threads)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _copy_into(source: str, fh: IO[Any]) -> None:
    """Copy the file ``source`` into the open file ``fh``: in the kernel (``sendfile``) where it can, else
    8 MiB at a time."""
    import shutil

    with open(source, "rb") as src:
        fh.flush()
        start, size, sent = fh.tell(), os.fstat(src.fileno()).st_size, 0
        try:
            while sent < size:
                n = os.sendfile(fh.fileno(), src.fileno(), sent, size - sent)
                if n == 0:
                    break
                sent += n
        except (AttributeError, OSError):  # no sendfile here (or not between these files): copied below
            pass
        if sent < size:
            src.seek(sent)
            fh.seek(start + sent)
            shutil.copyfileobj(src, fh, 8 << 20)
        else:
            fh.seek(start + size)  # (sendfile moved the descriptor, not the file object)


def _make_temp(folder: Path, name: str, suffix: str) -> tuple[int, str]:
    """A new file ``.NAME.PID.XXXX<suffix>`` in ``folder``, readable like any new file (not mkstemp's 0600)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=suffix, dir=folder)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


def _write_temp(folder: Path, name: str, write: Callable[[IO[Any]], object], *, text: bool = False) -> str:
    """A new temporary file for ``name`` in ``folder``, filled by ``write`` and flushed to disk; its path.

    ``text``: ``write`` gets a UTF-8 text stream instead of a binary one. The file is removed if writing fails.
    """
    fd, tmp = _make_temp(folder, name, ".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_temps(folder: Path, names: Iterable[str]) -> None:
    """Remove ``.NAME.PID.XXXX.tmp`` files left by saves whose process is gone (killed mid-write).

    Safe: only this module's own pattern, only for the names being written, and never a file whose
    process is still running (a concurrent save of the same path keeps its temporary file). Files moved
    aside (``.old``) are reported, never removed: they may be the only copy of an overwritten model.
    """
    patterns = [re.compile(rf"^\.{re.escape(name)}\.(\d+)\.[A-Za-z0-9_]+\.(tmp|old)$") for name in names]
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        for pattern in patterns:
            match = pattern.match(entry.name)
            if match is None or _pid_alive(int(match.group(1))):
                continue
            if match.group(2) == "old":
                log.warning("%s was left by an interrupted save (the model it replaced); not removed", Path(folder, entry.name))
                continue
            try:
                os.unlink(entry.path)
                log.info("removed %s, left by an interrupted save", entry.path)
            except OSError:
                pass


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- one file --------------------------------------------------------------------------------------------
def write_atomically(path: str | os.PathLike[str], write: Callable[[IO[Any]], object], *, text: bool = False) -> Path:
    """Write ``path`` through ``write`` into a temporary file, then move it into place; return the path.

    ``text``: ``write`` gets a UTF-8 text stream instead of a binary one. A missing output folder, or a
    path that is a folder, is an InputError before anything is written; on any failure the old file (if
    any) is left as it was and the temporary file is removed.
    """
    out = check_destination(path)
    folder = out.parent if str(out.parent) else Path(".")
    _remove_stale_temps(folder, (out.name,))
    tmp = _write_temp(folder, out.name, write, text=text)
    try:
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)
    return out


# -- models ----------------------------------------------------------------------------------------------
def _tensor_nbytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model_tensors(model))


def _externalize(model: onnx.ModelProto, data_name: str, fh: IO[bytes]) -> None:
    """Move every tensor of ``EXTERNAL_THRESHOLD`` raw bytes or more into ``fh``, each at a 4096-aligned
    offset (zero padding between), and point the tensor at ``data_name``; edits ``model`` in place."""
    offset = 0
    for tensor in model_tensors(model):
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


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    serialized: str | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically; return the path.

    ``serialized``: a file already holding ``model`` serialized (a run's result was written once for its
    sessions): copied rather than serialized again, where the model goes in one file.

    ``external_data=None`` stores weights in a side file ``<name>.data`` only when the model would
    exceed protobuf's 2 GiB limit. The data file is written fresh (never appended to) and moved into
    place before the model file; see the module docstring for what a reader or a killed run can observe.
    """
    out = check_destination(path)
    folder = out.parent if str(out.parent) else Path(".")
    if external_data is None:
        external_data = _tensor_nbytes(model) + 64 * 1024 * 1024 >= PROTOBUF_LIMIT
    data_name = out.name + ".data"
    data_path = folder / data_name
    for link in (out, data_path) if external_data else (out,):
        if link.is_symlink():
            log.warning("%s is a symbolic link; it is replaced by a regular file, its target is left alone", link)
    _remove_stale_temps(folder, (out.name, data_name))
    to_write = model
    temps: list[str] = []
    try:
        if external_data:
            to_write = copy_model(model)
            temps.append(_write_temp(folder, data_name, lambda fh: _externalize(to_write, data_name, fh)))
        if serialized is not None and not external_data:
            model_tmp = _write_temp(folder, out.name, lambda fh: _copy_into(serialized, fh))
        else:
            try:
                payload = to_write.SerializeToString()
            except ValueError as exc:  # protobuf refuses messages over 2 GiB
                raise InputError(f"{out}: the model is too large to write without external data ({first_line(exc)}); use --external-data") from None
            model_tmp = _write_temp(folder, out.name, lambda fh: fh.write(payload))
        temps.append(model_tmp)
        aside: list[str] = []
        if external_data:
            if os.path.lexists(out) and data_path.exists():
                # The old model may refer to the data file about to be replaced: move it aside (and keep
                # the old data by a hard link) until the new model is in place, so that nobody ever sees
                # the old model over new data.
                aside += _set_aside(out, data_path, folder)
            os.replace(temps[0], data_path)
            temps.pop(0)
        os.replace(model_tmp, out)
        temps.remove(model_tmp)
        _fsync_dir(folder)
        for leftover in aside:
            os.unlink(leftover)
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return out


def _aside_name(folder: Path, name: str) -> str:
    return str(folder / f".{name}.{os.getpid()}.{secrets.token_hex(8)}.old")


def _set_aside(model_path: Path, data_path: Path, folder: Path) -> list[str]:
    """Keep the old data file under a hidden name (hard link) and move the old model there too."""
    kept = []
    old_data = _aside_name(folder, data_path.name)
    try:
        os.link(data_path, old_data)
        kept.append(old_data)
    except OSError:  # no hard links here: the old data cannot be kept, the old model is still moved
        log.info("cannot keep %s aside while saving (no hard links on this file system)", data_path)
    old_model = _aside_name(folder, model_path.name)
    os.replace(model_path, old_model)
    kept.append(old_model)
    return kept

"""int8 post-training quantization through ``onnxruntime.quantization`` (no quantizer of our own).

The recipe is onnxruntime's own advice for CPU inference (``quantize_static``'s docstring, "Choosing
parameters for CPU inference"):

* ``QuantFormat.QDQ``: the format ORT's CPU kernels are optimized for since 1.11 (QuantizeLinear /
  DequantizeLinear pairs around float ops, which ``ORT_ENABLE_ALL`` fuses into QLinearConv and friends);
* weights ``QInt8``, symmetric, **per channel** (per output channel of a Conv: the accuracy ORT recommends
  for ResNet-style convolutions whose channels differ in range, at a small cost in speed);
* activations ``QUInt8`` (asymmetric, ``x = s (q - z)``): x86-64 CPUs, with or without VNNI, run
  u8 x s8 products; ``int8`` activations (symmetric) are the choice for ARM and are an option here;
* ``reduce_range=False`` (VNNI machines accumulate 8-bit products without saturation); an option for
  older x86;
* MinMax calibration: a tensor's range is ``[min, max]`` over the calibration feeds.

Calibration is done once per :class:`Quantizer` and reused for every quantization with a different set of
nodes kept in float: ``quantize_static``'s ``calibration_cache_path`` writes the
tensor ranges to a JSON file on the first call and loads them on the next (checked by signature; present in the
onnxruntime 1.32 used here). Ranges are those of the *float*
model whatever is excluded, so reusing them gives exactly what recalibrating would. On an onnxruntime
without the cache every call calibrates again (slower, same ranges).

Before quantizing, :func:`prepare` normalizes the float model and says what it did:

* a model that already holds QuantizeLinear/DequantizeLinear (or QLinear*/integer ops) is refused: never
  quantized twice;
* below opset 13 (per-channel QDQ needs ``axis`` on QuantizeLinear/DequantizeLinear) the model is
  converted with ``onnx.version_converter``;
* ``quant_pre_process`` (onnxruntime's pre-processing: symbolic shape inference and onnxruntime's basic
  graph optimizations, e.g. BatchNormalization folded into the Conv before it, so that the folded weight
  is what gets quantized) is run when ``preprocess`` is on; when it fails, the model is quantized as it is
  and the note says so;
* nodes without a name are named ``<op>_<index>`` (``nodes_to_exclude`` works by name).

Everything runs in a temporary directory and comes back as an ``onnx.ModelProto``; the same model, feeds
and exclusions give byte-identical output.
"""

from __future__ import annotations

import inspect
import logging
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import onnx

from rewriter.errors import InputError

log = logging.getLogger(__name__)

Feed = dict[str, np.ndarray]

#: The lowest opset quantized as it is (per-channel QuantizeLinear/DequantizeLinear take ``axis`` from 13).
MIN_OPSET = 13
#: At most this many calibration feeds are run before their ranges are merged (``CalibStridedMinMax``: bounds
#: memory; MinMax ranges do not depend on it). Not ``CalibMaxIntermediateOutputs``: onnxruntime 1.32 drops the
#: outputs it collected when that limit is reached instead of merging them.
CALIBRATION_CHUNK = 4
#: Ops that mean a model is quantized already.
QUANTIZED_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
    "MatMulInteger", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearConcat", "QGemm",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
})


@dataclass(frozen=True)
class Int8Options:
    """The quantization recipe (see the module docstring): activations ``"uint8"`` (x86) or ``"int8"`` (ARM)."""

    activations: str = "uint8"
    per_channel: bool = True
    reduce_range: bool = False
    preprocess: bool = True

    def __post_init__(self) -> None:
        if self.activations not in ("uint8", "int8"):
            raise InputError(f"int8 activations must be 'uint8' or 'int8', not {self.activations!r}")


@dataclass(frozen=True)
class Prepared:
    """The float model that gets quantized and the normalizations that made it from the input."""

    model: onnx.ModelProto
    normalizations: tuple[str, ...]


def refusal(model: onnx.ModelProto) -> str | None:
    """Why ``model`` cannot be quantized (it is quantized already), or ``None``."""
    found = sorted({n.op_type for n in model.graph.node if n.op_type in QUANTIZED_OPS})
    if found:
        return f"already quantized (holds {', '.join(found)}): quantize the float model, never a quantized one"
    return None


def opset(model: onnx.ModelProto) -> int:
    """The model's ``ai.onnx`` opset version."""
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return max(versions) if versions else 0


def _named(model: onnx.ModelProto) -> str | None:
    """Name every unnamed node ``<op>_<index>`` (unique), in place; the note, or ``None``."""
    taken = {n.name for n in model.graph.node if n.name}
    count = 0
    for i, node in enumerate(model.graph.node):
        if node.name:
            continue
        name = f"{node.op_type}_{i}"
        while name in taken:
            name += "_"
        node.name = name
        taken.add(name)
        count += 1
    return f"named {count} unnamed node(s) <op>_<index> (exclusions are by name)" if count else None


def _preprocessed(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """``quant_pre_process`` of ``model`` (or ``model`` itself when it fails) and the note saying which."""
    from onnxruntime.quantization import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="int8-pre.") as tmp:
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "pre.onnx"
        onnx.save(model, str(src))
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
            out = onnx.load(str(dst))
        except Exception as exc:  # onnxruntime's optimizer raises its own types
            log.warning("quant_pre_process failed (%s: %s); quantizing the model as it is", type(exc).__name__, exc)
            return model, f"quant_pre_process failed ({type(exc).__name__}); quantized without it"
    return out, (f"onnxruntime quant_pre_process (shape inference, basic graph optimizations): "
                 f"{len(model.graph.node)} -> {len(out.graph.node)} nodes")


def prepare(model: onnx.ModelProto, options: Int8Options | None = None) -> Prepared:
    """The float model to quantize (see the module docstring); an :class:`InputError` for a quantized one."""
    options = options or Int8Options()
    why = refusal(model)
    if why is not None:
        raise InputError(why)
    notes: list[str] = []
    work = onnx.ModelProto()
    work.CopyFrom(model)
    version = opset(work)
    if version < MIN_OPSET:
        try:
            work = onnx.version_converter.convert_version(work, MIN_OPSET)
        except Exception as exc:  # the converter raises plain RuntimeErrors
            raise InputError(f"opset {version} cannot be converted to {MIN_OPSET} for int8: {exc}") from None
        notes.append(f"converted from opset {version} to {MIN_OPSET} (onnx.version_converter) for per-channel QDQ")
    if options.preprocess:
        work, note = _preprocessed(work)
        notes.append(note)
    named = _named(work)
    if named:
        notes.append(named)
    for note in notes:
        log.info("int8 normalization: %s", note)
    return Prepared(work, tuple(notes))


def _reader(feeds: Sequence[Mapping[str, np.ndarray]]):  # type: ignore[no-untyped-def]
    """A ``CalibrationDataReader`` over ``feeds``, in order."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._all = [dict(f) for f in feeds]
            self._items = iter(self._all)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._items, None)

        def __len__(self) -> int:
            return len(self._all)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._items = iter(self._all[start_index:end_index])

    return FeedReader()


def _cache_supported() -> bool:
    from onnxruntime.quantization import quantize_static

    return "calibration_cache_path" in inspect.signature(quantize_static).parameters


class Quantizer:
    """Quantizes one prepared float model again and again, with different nodes kept in float, from one
    calibration (see the module docstring). A context manager: the temporary directory goes on exit."""

    def __init__(self, prepared: Prepared, calibration: Sequence[Mapping[str, np.ndarray]], options: Int8Options | None = None) -> None:
        if not calibration:
            raise InputError("int8 quantization needs calibration feeds")
        self.prepared = prepared
        self.options = options or Int8Options()
        self.calibration = [dict(f) for f in calibration]
        self._dir = tempfile.TemporaryDirectory(prefix="int8.")
        self.source = Path(self._dir.name) / "float.onnx"
        onnx.save(prepared.model, str(self.source))
        self.cache = Path(self._dir.name) / "calibration.json"
        self.cached = _cache_supported()
        self.calls = 0

    def __enter__(self) -> Quantizer:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._dir.cleanup()

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.prepared.model.graph.node]

    def quantize(self, exclude: Iterable[str] = ()) -> onnx.ModelProto:
        """The prepared model in int8 QDQ with the nodes named in ``exclude`` kept in float."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        names = set(self.node_names)
        excluded = sorted(set(exclude))
        unknown = [n for n in excluded if n not in names]
        if unknown:
            raise InputError(f"cannot keep unknown node(s) in float: {unknown[:5]}")
        out = Path(self._dir.name) / f"int8-{self.calls}.onnx"
        self.calls += 1
        extra = {"calibration_cache_path": str(self.cache)} if self.cached else {}
        # Ranges merged every few feeds (strided MinMax: the same min/max), not every tensor of every feed held at once.
        n = len(self.calibration)
        options = {"CalibStridedMinMax": max(d for d in range(1, CALIBRATION_CHUNK + 1) if n % d == 0)}
        quantize_static(
            str(self.source), str(out), _reader(self.calibration), quant_format=QuantFormat.QDQ,
            per_channel=self.options.per_channel, reduce_range=self.options.reduce_range,
            activation_type=QuantType.QUInt8 if self.options.activations == "uint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8, nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
            extra_options=options, **extra,
        )
        model = onnx.load(str(out))
        out.unlink()
        return model


def quantize_int8(model: onnx.ModelProto, calibration: Sequence[Mapping[str, np.ndarray]], exclude: Iterable[str] = (),
                  options: Int8Options | None = None) -> tuple[onnx.ModelProto, Prepared]:
    """``model`` in int8 QDQ (one call: prepare, calibrate, quantize) and what preparing it did."""
    prepared = prepare(model, options)
    with Quantizer(prepared, calibration, options) as q:
        return q.quantize(exclude), prepared


def quantized_nodes(int8: onnx.ModelProto) -> list[str]:
    """Names of the nodes of an int8 QDQ model that run on quantized values: those (not Q/DQ themselves)
    with an input made by a DequantizeLinear, in graph order."""
    dq_out = {o for n in int8.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in int8.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq_out for i in n.input)]


def replay(model: onnx.ModelProto, calibration: Sequence[Mapping[str, np.ndarray]], excluded: Iterable[str],
           options: Int8Options | None = None) -> onnx.ModelProto:
    """``model`` prepared and quantized with ``excluded`` (nodes of the prepared model) kept in float: what a plan
    replays. The same model, calibration feeds, exclusions and recipe give the same bytes as the search's result
    (one deterministic calibration, one ``quantize_static`` call)."""
    options = options or Int8Options()
    with Quantizer(prepare(model, options), calibration, options) as quantizer:
        return quantizer.quantize(excluded)

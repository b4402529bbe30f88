"""Structure, then precision: factorize the float model under a budget, then quantize it with onnxruntime's
own static int8 recipe (QDQ, per-channel weights), then check the quantized model against the float original.

The passes leave an int8 QDQ model's weights alone (they say "quantized weights (QDQ): ..."): the order is
always float model -> bottleneck -> ``quantize_static``. On the trained digits CNN (its real held-out
digits, calibrated on training images the judge never sees)::

    python examples/quantize_after.py [OUT_DIR]

prints top-1 on the whole held-out split for the float original, the factorized float model, and each
quantized, and the quantized factorized model's numerics against the float original (``validate``). Run it
from a checkout with the dev extras installed (``models``, the digits data, lives at the repository root).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for models.digits

import rewriter  # noqa: E402
from models.digits import load_split  # noqa: E402
from rewriter.validation.compare import validate_models  # noqa: E402
from rewriter.validation.feeds import FeedSet  # noqa: E402
from rewriter.validation.judge import ValidationConfig  # noqa: E402
from rewriter.validation.latency import TimingOptions  # noqa: E402
from rewriter.validation.numerics import Budget  # noqa: E402
from rewriter.validation.runtime import RuntimeOptions, deploy_session  # noqa: E402

MODEL = Path(__file__).resolve().parents[1] / "models" / "digits" / "digits_cnn.onnx"
BATCH = 8
#: The factorization's budget (float against float), and the check of the final int8 model against the float original.
SEARCH_BUDGET, FINAL_BUDGET = "cosine>=0.9999", "cosine>=0.99,top1-drop<=0.02"


def top1(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    session = deploy_session(onnx.load(str(path)), RuntimeOptions(threads=1))
    n = len(x) - len(x) % BATCH
    logits = np.concatenate([session.run(None, {"input": x[i : i + BATCH]})[0] for i in range(0, n, BATCH)])
    return float(np.mean(np.argmax(logits, axis=1) == y[:n]))


def quantize(src: Path, dst: Path, images: np.ndarray) -> None:
    """onnxruntime's static int8 recipe: QDQ, per-channel int8 weights, uint8 activations."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": images[i : i + BATCH]} for i in range(0, len(images), BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)


def main(out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    x_train, _, x_test, y_test = load_split()
    shapes = {"input": (BATCH, 1, 32, 32)}
    feeds = FeedSet(
        validation=[{"input": x_test[i : i + BATCH]} for i in range(0, 64, BATCH)],
        calibration=[{"input": x_train[i : i + BATCH]} for i in range(0, 64, BATCH)],
        source="digits: 64 training images (calibration), 64 held-out (numerics)",
    )
    timing = TimingOptions(min_pairs=8, max_pairs=20, time_budget_s=1.0)

    # 1. Structure: the bottleneck pass on the float model, under its own budget.
    result = rewriter.optimize(MODEL, ["bottleneck"], input_shapes=shapes, feeds=feeds,
                               config=ValidationConfig(budget=Budget.parse(SEARCH_BUDGET), timing=timing))
    factorized = out_dir / "digits.bottleneck.onnx"
    rewriter.save_model(result.model, factorized)
    print(f"bottleneck: {len(result.in_model)} factorization(s) kept, MACs {result.before.total_macs:,} -> {result.after.total_macs:,}")

    # 2. Precision: the same int8 recipe on the original and on the factorized model (calibrated on other
    #    training images than the factorization's).
    int8_original, int8_factorized = out_dir / "digits.int8.onnx", out_dir / "digits.bottleneck.int8.onnx"
    calibration = x_train[64:192]
    quantize(MODEL, int8_original, calibration)
    quantize(factorized, int8_factorized, calibration)

    # 3. Proof: top-1 on the whole held-out split, and the final model against the float original.
    for name, path in (("float original", MODEL), ("bottleneck", factorized), ("int8", int8_original), ("bottleneck + int8", int8_factorized)):
        print(f"top-1 {name}: {top1(path, x_test, y_test):.4f}")
    check = validate_models(MODEL, int8_factorized, input_shapes=shapes,
                            feeds=FeedSet(feeds.validation, [], feeds.source),
                            config=ValidationConfig(budget=Budget.parse(FINAL_BUDGET), timing=timing), exact=False)
    worst = min(s.cosine for s in check.numerics.values())
    print(f"bottleneck + int8 against the float original: cosine {worst:.6f}, speedup {check.latency.ci if check.latency else '-'}; "
          f"{FINAL_BUDGET}: {'PASS' if check.passed else 'FAIL: ' + '; '.join(check.failures)}")
    return 0 if check.passed else 1


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="quantize_after_"))))

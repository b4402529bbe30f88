"""What both pages share: escaping, number formats, the style sheet, the page frame and the summary cards.

Rule of both pages: nothing unknown is printed as a placeholder (``?``, ``None``, ``nan``, ``-``); a
value that is unknown is left out, and a measurement that was not made says "not measured".
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

BEFORE_COLOUR = "#a0aec0"
AFTER_COLOUR = "#2b6cb0"
FRONT_COLOUR = "#dd6b20"
UNCHANGED_COLOUR = "#cbd5e0"


def e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def known(value: Any) -> bool:
    """A value worth printing: not ``None``, not an empty string, not a non-finite float."""
    if value is None or value == "":
        return False
    return not (isinstance(value, float) and not math.isfinite(value))


def fmt_int(n: float | int | None) -> str:
    if not known(n):
        return "not measured"
    assert n is not None
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def fmt_ms(x: float | None) -> str:
    return "not measured" if not known(x) else f"{x:.3f} ms"


def fmt_ci(lat: Mapping[str, Any] | None) -> str:
    """``1.234x [1.200, 1.270]``, or "not measured"."""
    if not lat or not known(lat.get("speedup")):
        return "not measured"
    if known(lat.get("ci_low")) and known(lat.get("ci_high")):
        return f"{lat['speedup']:.3f}x [{lat['ci_low']:.3f}, {lat['ci_high']:.3f}]"
    return f"{lat['speedup']:.3f}x"


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if known(v) else "not measured"
    return str(v)


def short(text: str, n: int = 34) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def arrow(before: str, after: str) -> str:
    return before if before == after else f"{before} \u2192 {after}"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def environment_line(env: Mapping[str, Any], extra: Iterable[str] = ()) -> str:
    """``onnx-bottleneck 0.2.0, onnxruntime 1.x, provider cpu, 1 thread(s), <CPU>``: the known parts only."""
    parts = []
    if known(env.get("tool_version")):
        parts.append(f"onnx-bottleneck {env['tool_version']}")
    if known(env.get("onnxruntime")):
        parts.append(f"onnxruntime {env['onnxruntime']}")
    if known(env.get("provider")):
        parts.append(f"provider {env['provider']}")
    if known(env.get("threads")):
        parts.append(f"{env['threads']} thread(s)")
    if known(env.get("cpu")):
        parts.append(str(env["cpu"]))
    parts += list(extra)
    return f'<p class="muted">{e(", ".join(parts))}</p>' if parts else ""


def cards(items: Sequence[tuple[str, str]]) -> str:
    """Summary cards ``(caption, value)``; cards without a value are left out."""
    shown = [(k, v) for k, v in items if v]
    if not shown:
        return ""
    return '<div class="cards">' + "".join(f'<div class="card"><b>{e(v)}</b><span>{e(k)}</span></div>' for k, v in shown) + "</div>"


def table(head: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = (), row_class: Sequence[str] = ()) -> str:
    """A table of already-escaped cells; columns in ``numeric`` are right-aligned."""
    out = ["<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = f' class="{e(row_class[i])}"' if i < len(row_class) and row_class[i] else ""
        out.append(f"<tr{cls}>" + "".join(f'<td class="n">{c}</td>' if j in numeric else f"<td>{c}</td>" for j, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif;margin:24px;color:#1a202c;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e2e8f0;padding-bottom:4px}
.muted{color:#718096;font-size:12px}.pass{color:#22543d;background:#c6f6d5}.fail{color:#742a2a;background:#fed7d7}
.badge{display:inline-block;padding:2px 8px;border-radius:4px;font-weight:600;font-size:13px}
table{border-collapse:collapse;font-size:12px;margin-top:6px}th,td{border:1px solid #e2e8f0;padding:4px 6px;text-align:left;vertical-align:top}
th{background:#f7fafc}td.n{text-align:right;font-variant-numeric:tabular-nums}tr.kept td{background:#f0fff4}tr.rolled_back td{background:#fffaf0}tr.not_tried td{color:#718096}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-top:10px}.card{border:1px solid #e2e8f0;border-radius:6px;padding:8px 12px;min-width:150px}
.card b{display:block;font-size:16px}.card span{color:#718096;font-size:12px}
svg text{font-family:inherit}svg .lb{font-size:11px;fill:#2d3748}svg .lb.touched{font-weight:700;fill:#1a365d}svg .vl{font-size:11px;fill:#4a5568}
svg .lg{font-size:11px;fill:#4a5568}svg .ax{font-size:11px;fill:#4a5568}svg .at{font-size:12px;fill:#2d3748}svg .pl{font-size:11px;fill:#9c4221}
code{font-size:12px}
"""


def page(title: str, body: Sequence[str]) -> str:
    """The self-contained document: inline CSS, no scripts, no external resources."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(b for b in body if b) + "\n</body></html>\n"
    )

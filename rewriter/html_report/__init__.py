"""The HTML pages: the optimize report (:func:`render_html`) and the sweep page (:func:`render_sweep_html`).

Each is one self-contained file (inline CSS and SVG, no scripts, no external resources), rendered from
the JSON the command writes (plus, for the report, the per-layer rows), so a page can be made again later
from its JSON. Neither prints a placeholder for what is unknown: it is left out, or said "not measured".

* :mod:`~rewriter.html_report.layers`: per-layer MACs and latency before/after (profiled over interleaved
  rounds; a change within the noise is drawn as unchanged);
* :mod:`~rewriter.html_report.charts`: the SVG bars and the speedup curve (labels that never overlap);
* :mod:`~rewriter.html_report.report_page` and :mod:`~rewriter.html_report.sweep_page`: the two pages.
"""

from rewriter.html_report._markup import AFTER_COLOUR, BEFORE_COLOUR, FRONT_COLOUR, UNCHANGED_COLOUR
from rewriter.html_report.charts import MAX_BARS, Box, CurvePoint, bar_chart_svg, curve_svg, latency_chart_svg, place_labels, text_boxes
from rewriter.html_report.layers import LayerRow, layer_rows, profile_layers, touched_nodes
from rewriter.html_report.report_page import end_to_end_rows, render_html, write_html
from rewriter.html_report.sweep_page import render_sweep_html, sweep_axis, write_sweep_html
from rewriter.validation.profile import LayerTime, latency_change, node_durations_from_trace

__all__ = [
    "AFTER_COLOUR", "BEFORE_COLOUR", "FRONT_COLOUR", "MAX_BARS", "UNCHANGED_COLOUR", "Box", "CurvePoint", "LayerRow", "LayerTime",
    "bar_chart_svg", "curve_svg", "end_to_end_rows", "latency_change", "latency_chart_svg", "layer_rows", "node_durations_from_trace",
    "place_labels", "profile_layers", "render_html", "render_sweep_html", "sweep_axis", "text_boxes", "touched_nodes", "write_html",
    "write_sweep_html",
]

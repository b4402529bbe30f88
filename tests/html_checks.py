"""Checks of a rendered HTML page, without a browser and in one (headless chromium).

Without a browser (:func:`page_problems`): no placeholder text (``?``, ``None``, ``nan``, ``null``,
``undefined``) anywhere a reader sees it (tooltips included), no empty section (a heading with nothing
under it, a table without rows, an empty paragraph), and no two chart labels whose boxes overlap, the
boxes estimated from the SVG coordinates (:func:`rewriter.html_report.text_boxes`).

In a browser (:func:`browser_problems`, :func:`screenshot`): the same checks on the laid-out DOM -- the
real bounding boxes of every SVG text element -- computed by a script added to a copy of the page, whose
result chromium's ``--dump-dom`` hands back; and a screenshot that must not be blank.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from itertools import combinations
from pathlib import Path

from rewriter.html_report import text_boxes

PLACEHOLDER = re.compile(r"\?|(?<![\w-])(None|nan|NaN|null|undefined)(?![\w-])")


def visible_text(page: str) -> str:
    """The page's text (tooltips included), tags and the style sheet removed, entities decoded."""
    body = re.sub(r"<style>.*?</style>", " ", page, flags=re.S)
    body = re.sub(r"<head>.*?</head>", " ", body, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", body))


def placeholders(page: str) -> list[str]:
    text = visible_text(page)
    return [f"placeholder {m.group(0)!r} in ...{text[max(0, m.start() - 40):m.end() + 40]!r}..." for m in PLACEHOLDER.finditer(text)]


def empty_sections(page: str) -> list[str]:
    problems = []
    body = page.split("<body>", 1)[-1]
    for chunk in re.split(r"(?=<h2>)", body)[1:]:
        head = re.match(r"<h2>(.*?)</h2>", chunk, flags=re.S)
        rest = chunk[head.end():] if head else chunk
        if "<svg" not in rest and not visible_text(rest).strip():
            problems.append(f"empty section {head.group(1) if head else chunk[:40]!r}")
    problems += [f"table without rows near {m.start()}" for m in re.finditer(r"<tbody></tbody>", page)]
    problems += [f"empty paragraph near {m.start()}" for m in re.finditer(r"<p[^>]*>\s*</p>", page)]
    problems += [f"empty card near {m.start()}" for m in re.finditer(r"<b>\s*</b>", page)]
    return problems


def overlapping_labels(page: str) -> list[str]:
    problems = []
    for svg in re.findall(r"<svg.*?</svg>", page, flags=re.S):
        for (ta, a), (tb, b) in combinations(text_boxes(svg), 2):
            if a.overlaps(b):
                problems.append(f"labels overlap: {ta!r} and {tb!r}")
    return problems


def page_problems(page: str) -> list[str]:
    return placeholders(page) + empty_sections(page) + overlapping_labels(page)


# -- in a browser ----------------------------------------------------------------------------------------
def find_chromium() -> str | None:
    override = os.environ.get("CHROMIUM")
    if override:
        return shutil.which(override) or (override if os.path.isfile(override) else None)
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


#: Runs in a copy of the page: overlapping SVG text boxes (laid out), placeholder text, empty sections.
CHECK_SCRIPT = r"""
<script>
(function () {
  const out = {overlaps: [], placeholders: [], empty: [], texts: 0};
  document.querySelectorAll("svg").forEach(function (svg) {
    const boxes = Array.from(svg.querySelectorAll("text")).map(function (t) {
      const label = Array.from(t.childNodes).filter(function (n) { return n.nodeType === 3; }).map(function (n) { return n.data; }).join("");
      return [label, t.getBoundingClientRect()];
    });
    out.texts += boxes.length;
    for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
      const a = boxes[i][1], b = boxes[j][1];
      const w = Math.min(a.right, b.right) - Math.max(a.left, b.left), h = Math.min(a.bottom, b.bottom) - Math.max(a.top, b.top);
      if (w > 0.5 && h > 0.5) out.overlaps.push(boxes[i][0] + " / " + boxes[j][0]);
    }
  });
  const text = document.body.innerText + " " + Array.from(document.querySelectorAll("title")).map(function (t) { return t.textContent; }).join(" ");
  const re = /\?|(?<![\w-])(None|nan|NaN|null|undefined)(?![\w-])/g;
  let m;
  while ((m = re.exec(text)) !== null) out.placeholders.push(text.slice(Math.max(0, m.index - 40), m.index + 40));
  document.querySelectorAll("h2").forEach(function (h) {
    let n = h.nextElementSibling, ok = false;
    while (n && n.tagName !== "H2") {
      if (n.tagName !== "SCRIPT" && (n.tagName.toLowerCase() === "svg" || (n.innerText || "").trim() || n.querySelector("svg"))) ok = true;
      n = n.nextElementSibling;
    }
    if (!ok) out.empty.push(h.innerText);
  });
  const pre = document.createElement("pre");
  pre.id = "html-check";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
"""


def _chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def browser_problems(browser: str, page: Path, work: Path) -> list[str]:
    """The checks of the module docstring on the page laid out by chromium."""
    probe = work / f"{page.stem}.check.html"
    probe.write_text(page.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    proc = _chromium(browser, work / "profile", "--virtual-time-budget=5000", "--window-size=1200,2000", "--dump-dom", probe.resolve().as_uri())
    found = re.search(r'<pre id="html-check">(.*?)</pre>', proc.stdout, flags=re.S)
    if not found:
        return [f"the check script left no result (chromium exit {proc.returncode}): {proc.stderr[-500:]}"]
    out = json.loads(html.unescape(found.group(1)))
    problems = [f"overlap: {o}" for o in out["overlaps"]] + [f"placeholder: {p!r}" for p in out["placeholders"]]
    problems += [f"empty section: {s}" for s in out["empty"]]
    return problems + ([] if out["texts"] else ["no SVG text laid out"])


def screenshot(browser: str, page: Path, shot: Path, work: Path, height: int = 2000) -> None:
    proc = _chromium(browser, work / "profile", f"--screenshot={shot}", f"--window-size=1200,{height}", page.resolve().as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000, (proc.returncode, proc.stderr[-2000:])

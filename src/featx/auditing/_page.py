"""audit.html: one static page (no server, no network) with the findings' thumbnails embedded as JPEG data URIs.

Thumbnails come from ``--source`` or from the source the store recorded; the page stays under 20 MB
(thumbnails past the limit are left out, and the page says so).
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

import numpy as np

from ..errors import BadImage, FeatxError
from ..files import write_json_atomic, write_text_atomic

__all__ = ["MAX_PAGE_BYTES", "THUMBNAIL_PX", "open_thumbnail_source", "write_outputs"]

_logger = logging.getLogger(__name__)

MAX_PAGE_BYTES = 20_000_000
THUMBNAIL_PX = 112  # longest side of a thumbnail (small images are enlarged to it)
_EXAMPLES_PER_PAIR = 4  # images per direction of a confusable pair

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{margin-top:0} h2{margin-top:32px;border-bottom:1px solid #ccc}
.grid{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;font-size:12px;max-width:260px}
.card img{display:block;width:112px;height:auto;image-rendering:auto}
.pair{display:flex;gap:6px}
.missing{width:112px;height:112px;display:flex;align-items:center;justify-content:center;background:#eee;color:#888;font-size:11px}
.given{color:#b00} .suggested{color:#070} .id{color:#666;word-break:break-all}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.notes li{color:#805000}
"""


def open_thumbnail_source(spec: str | None, recorded: str | None, features: Path):
    """(image source or None, note or None): ``--source`` (an error when it cannot be read), else the source the store
    recorded at extraction (as given then, or relative to the store's folder); None with a note when neither is readable."""
    from ..sources import resolve_source

    if spec is not None:
        return resolve_source(spec), None
    if not recorded:
        return None, "thumbnails left out: the store records no source; pass --source"
    candidates = [recorded] + ([str(features.parent / recorded)] if not Path(recorded).is_absolute() else [])
    for candidate in candidates:
        try:
            return resolve_source(candidate), None
        except FeatxError:
            continue
    return None, f"thumbnails left out: the recorded source '{recorded}' cannot be read from here; pass --source"


class _Thumbnails:
    """Data URIs of thumbnails by row, within the page's byte budget."""

    def __init__(self, src, ids: np.ndarray, budget: int):
        self.src, self.budget, self.cache, self.left_out = src, budget, {}, 0
        self.index = {} if src is None else {image_id: i for i, image_id in enumerate(src.ids)}
        self.ids = ids

    def uri(self, row: int) -> str | None:
        if row in self.cache:
            return self.cache[row]
        i = self.index.get(str(self.ids[row]))
        data = None if i is None else _jpeg(self.src, i)
        if data is not None and len(data) > self.budget:
            self.left_out += 1
            data = None
        if data is not None:
            self.budget -= len(data)
        self.cache[row] = data
        return data

    def img(self, row: int, alt: str) -> str:
        uri = self.uri(row)
        if uri is None:
            return f'<div class="missing">{"no image" if self.src is not None else "no source"}</div>'
        return f'<img class="thumb" src="{uri}" alt="{html.escape(alt)}" data-row="{row}">'


def _jpeg(src, i: int) -> str | None:
    from PIL import Image

    try:
        im = src.load(i)
    except BadImage:
        return None
    scale = THUMBNAIL_PX / max(im.size)
    im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _e(v) -> str:
    return html.escape("" if v is None else str(v))


def _pixels(p: dict) -> str:
    return "" if p["pixel_similarity"] is None else f' pixels {p["pixel_similarity"]:.3f}'


def _duplicates(result, thumbs: _Thumbnails) -> list[str]:
    from ._report import duplicate_rule

    pairs = sorted(result.duplicates, key=lambda p: (not p["across_splits"], -p["similarity"]))[: result.config.top]
    cards = [f'<div class="card dup"><div class="pair">{thumbs.img(p["a_row"], p["a"])}{thumbs.img(p["b_row"], p["b"])}</div>'
             f'<b>{p["similarity"]:.4f}</b>{_pixels(p)}{" (same bytes)" if p["identical_bytes"] else ""}'
             f'<div class="id">{_e(p["a"])} ({_e(p["a_split"])}, {_e(p["a_label"])})</div>'
             f'<div class="id">{_e(p["b"])} ({_e(p["b_split"])}, {_e(p["b_label"])})</div></div>' for p in pairs]
    head = (f"<h2>Near-duplicates: {len(result.duplicates)} pairs at {_e(duplicate_rule(result))}, "
            f"{sum(p['across_splits'] for p in result.duplicates)} across splits</h2>")
    return [head, f'<div class="grid">{"".join(cards)}</div>' if cards else "<p>None.</p>"]


def _suspects(result, thumbs: _Thumbnails) -> list[str]:
    lc = result.labels
    if lc.skipped:
        return ["<h2>Likely label errors</h2>", f"<p>Skipped: {_e(lc.skipped)}.</p>"]
    cards = [f'<div class="card suspect">{thumbs.img(s["row"], s["id"])}<b>#{i + 1}</b> '
             f'<span class="given">given: {_e(s["given"])} ({s["label_quality"]:.3f})</span><br>'
             f'<span class="suggested">suggested: {_e(s["suggested"])} ({s["suggested_probability"]:.3f})</span>'
             f'<div class="id">{_e(s["id"])}</div></div>' for i, s in enumerate(lc.suspects[: result.config.top])]
    head = (f"<h2>Likely label errors: {len(lc.suspects)} of {len(lc.rows)} '{_e(result.train_split)}' images</h2>"
            "<p>Given label and its out-of-fold probability; the suggested label and its probability.</p>")
    return [head, f'<div class="grid">{"".join(cards)}</div>' if cards else "<p>None.</p>"]


def _outliers(result, thumbs: _Thumbnails) -> list[str]:
    flagged = result.outliers()
    shown = flagged[: result.config.top] or result.most_isolated(min(12, result.config.top))
    what = (f"{len(flagged)} beyond the fence ({result.fence:.4f})" if flagged
            else f"none beyond the fence ({result.fence:.4f}); the most isolated images")
    cards = [f'<div class="card outlier">{thumbs.img(o["row"], o["id"])}any class: {o["any_class_distance"]:.4f}<br>'
             f'same class: {"-" if o["same_class_distance"] is None else format(o["same_class_distance"], ".4f")}'
             f'<div class="id">{_e(o["id"])} ({_e(o["split"])}, {_e(o["label"])})</div></div>' for o in shown]
    return [f"<h2>Outliers (cosine distance to the {result.config.k}-th neighbour): {what}</h2>",
            f'<div class="grid">{"".join(cards)}</div>' if cards else "<p>None.</p>"]


def _confusable(result, thumbs: _Thumbnails) -> list[str]:
    lc = result.labels
    if lc.skipped or not lc.confusable:
        return ["<h2>Confusable class pairs</h2>", f"<p>{'Skipped: ' + _e(lc.skipped) if lc.skipped else 'None'}.</p>"]
    names = [result.rows.class_names[c] for c in lc.classes]
    y = np.searchsorted(lc.classes, result.rows.labels[lc.rows])
    predicted = lc.probabilities.argmax(1)
    rows = []
    for p in lc.confusable[: min(10, result.config.top)]:
        a, b = names.index(p["a"]), names.index(p["b"])
        examples = [thumbs.img(int(lc.rows[i]), str(result.rows.ids[lc.rows[i]]))
                    for src, dst in ((a, b), (b, a)) for i in np.flatnonzero((y == src) & (predicted == dst))[:_EXAMPLES_PER_PAIR]]
        rows.append(f"<tr><td>{_e(p['a'])} / {_e(p['b'])}</td><td>{p['a_as_b']}</td><td>{p['b_as_a']}</td><td>{p['share']:.1%}</td>"
                    f'<td><div class="pair">{"".join(examples)}</div></td></tr>')
    return ["<h2>Confusable class pairs (out-of-fold confusion)</h2>",
            "<table><tr><th>classes a / b</th><th>a as b</th><th>b as a</th><th>share</th><th>examples (a as b, then b as a)</th></tr>"
            + "".join(rows) + "</table>"]


def page(result, src) -> str:
    from ._report import summary_lines

    thumbs = _Thumbnails(src, result.rows.ids, MAX_PAGE_BYTES - 1_000_000)  # the text's share: far below 1 MB
    body = [f"<h1>Audit of {_e(result.key)}</h1>", "<pre>" + _e("\n".join(line for line in summary_lines(result)[1:] if not line.startswith("Wrote"))) + "</pre>"]
    for section in (_duplicates, _suspects, _outliers, _confusable):
        body += section(result, thumbs)
    if thumbs.left_out:
        body.insert(2, f'<ul class="notes"><li>{thumbs.left_out} thumbnails left out to keep the page under 20 MB</li></ul>')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>featx audit: {_e(result.key)}</title>'
            f"<style>{_STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def write_outputs(result, src, note: str | None) -> None:
    """audit.json, audit.md and audit.html in ``result.out`` (each written atomically)."""
    from ._report import markdown

    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    if note:
        result.notes.append(note)
        _logger.warning("%s", note)
    result.paths = [out / "audit.json", out / "audit.md", out / "audit.html"]
    write_json_atomic(result.paths[0], result.to_dict())
    write_text_atomic(result.paths[1], markdown(result))
    text = page(result, src)
    assert len(text.encode()) <= MAX_PAGE_BYTES, "the thumbnail budget keeps the page under 20 MB"
    write_text_atomic(result.paths[2], text)

"""Pictures of grounded sentences (PNG, PIL) and static HTML pages that open from disk.

A *picture* is one image with coloured boxes and, in a panel on its right, one text label per
grounded snippet (alignment) or region caption (captions JSONL), joined by a line to the centre of
its box, as on the paper's project page.  One colour per region; the sentence is printed under
the image with each snippet underlined in its region's colour.  Snippets grounded in the
whole-image box get a frame around the image instead of a line.

Small images (Flickr8K is 224x224) are upscaled for drawing (``side`` pixels on the long side),
so boxes and text stay readable.  Labels are stacked in the side panel, sorted by the height of
their box centre, so they never overlap and their lines rarely cross.

Pages (:func:`write_pictures_page`, :func:`write_retrieval_page`) use no network, no server:
images are files next to the page (relative links) and the little JavaScript is inline.

Everything a page or a file name takes from input data (keys, sentids, captions, ranks) is hostile until
escaped: text is HTML-escaped where it is inserted, links are URL-encoded, JSON inside a script element has
``<``, ``>``, ``&`` and U+2028/9 as ``\\uXXXX``, and output file names are built by :func:`safe_part` from
ASCII letters, digits, ``.``, ``_`` and ``-`` only, so none can leave the output folder.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

# colour-blind-friendly-ish, saturated, readable as text on white and as boxes on photos
PALETTE = ["#e6194b", "#1f6fd1", "#2a9d3a", "#f58231", "#911eb4", "#0fa3a3", "#d6289b", "#8a5a14",
           "#5b6b00", "#000080", "#b8860b", "#c0392b"]
WHOLE = "#404040"  # the whole-image region
MIN_SIDE, MAX_SIDE = 32, 4096  # `vsa show --side`: the drawn image's long side, in pixels
FONT_CANDIDATES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans.ttf",
                   "/Library/Fonts/Arial.ttf", "C:/Windows/Fonts/arial.ttf")
BOLD_CANDIDATES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "/usr/share/fonts/TTF/DejaVuSans-Bold.ttf",
                   "/Library/Fonts/Arial Bold.ttf", "C:/Windows/Fonts/arialbd.ttf")


@dataclass
class Label:
    text: str
    region: int  # index into Picture.boxes
    note: str = ""  # e.g. the score
    phrase: bool = False  # a region's own phrase (`vsa caption --regions`), not a snippet of the sentence


@dataclass
class Picture:
    """What one PNG shows."""

    image: Path
    title: str
    boxes: dict[int, tuple[list[float], str]] = field(default_factory=dict)  # region -> (xyxy box, class label)
    labels: list[Label] = field(default_factory=list)
    # the sentence(s) printed under the image: each a list of (text, region or None)
    sentences: list[list[tuple[str, int | None]]] = field(default_factory=list)
    whole_regions: set = field(default_factory=set)  # regions that are the whole image

    def colour(self, region: int, whole: bool = False) -> str:
        """Distinct colours for the regions of this picture, in order of first mention."""
        if whole or region in self.whole_regions:
            return WHOLE
        order = []
        for L in self.labels:
            if L.region not in order and L.region not in self.whole_regions:
                order.append(L.region)
        return PALETTE[order.index(region) % len(PALETTE)] if region in order else colour_of(region)


def colour_of(region: int, whole: bool = False) -> str:
    return WHOLE if whole else PALETTE[region % len(PALETTE)]


def _font(size: int, bold: bool = False):
    from PIL import ImageFont

    for p in BOLD_CANDIDATES if bold else FONT_CANDIDATES:
        if os.path.exists(p):
            return ImageFont.truetype(p, size)
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # very old Pillow
        return ImageFont.load_default()


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_part(text, limit: int = 60) -> str:
    """``text`` as part of a file name: runs of anything but ASCII letters, digits, ``.``, ``_``, ``-`` become
    ``_``, no leading or trailing dot, dash or underscore (never ``.`` or ``..``, no hidden file, no option-like
    name), at most ``limit`` characters; ``"x"`` when nothing is left. Never holds a path separator."""
    s = _UNSAFE.sub("_", str(text))[:limit].strip("._-")
    return s or "x"


def _out_file(out_dir: Path, name: str) -> Path:
    """``out_dir / name`` for a name vsa built; refuses anything that is not one plain file name."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name):
        raise ValueError(f"not a safe output file name: {name!r}")
    return Path(out_dir) / name


def url(path: str) -> str:
    """A relative link to the file ``path`` (``/``-separated): every character but letters, digits, ``/``
    and ``-._~`` percent-encoded, so ``#``, ``?``, ``%`` and ``:`` are parts of the name."""
    return quote(str(path), safe="/")


def script_json(obj) -> str:
    """``obj`` as JSON that is safe as the text of a ``<script>`` element: ``<``, ``>``, ``&`` and the line
    separators U+2028/U+2029 written as ``\\uXXXX`` (they occur only inside JSON strings, where the escape
    means the same character), so no ``</script>`` or ``<!--`` can end or change the element."""
    from vsa.io import dumps  # a file name that is not UTF-8 becomes \udcXX escapes, as in every vsa JSON

    s = dumps(obj).decode()
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"),
                    ("\u2029", "\\u2029")):
        s = s.replace(ch, esc)
    return s


def _is_whole(box, label: str, width: int, height: int) -> bool:
    if label == "image":
        return True
    x1, y1, x2, y2 = box
    return x1 <= 1 and y1 <= 1 and x2 >= width - 1 and y2 >= height - 1


# ----------------------------------------------------------------------------- from records


def _box(v, where: str) -> list[float]:
    from vsa.errors import VsaError
    from vsa.io import is_number

    if not (isinstance(v, list) and len(v) == 4 and all(is_number(x) for x in v)):
        raise VsaError(f"{where}: 'box' must be a list of 4 numbers [x1, y1, x2, y2], got {v!r:.80}")
    return [float(x) for x in v]


def _list(rec: dict, name: str, where: str = "the record") -> list:
    from vsa.errors import VsaError

    v = rec.get(name)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
        raise VsaError(f"{where}: '{name}' must be a list of objects, got {v!r:.80}")
    return v


def from_alignment(rec: dict, image: Path) -> Picture:
    """A picture of one alignments-JSONL line (docs/formats.md); VsaError (no file) on a malformed record."""
    from vsa.errors import VsaError

    pic = Picture(Path(image), f"{rec.get('key', '')} #{rec.get('sentid', '')}")
    seg: list[tuple[str, int | None]] = []
    for k, s in enumerate(_list(rec, "snippets"), 1):
        r = s.get("region")
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise VsaError(f"snippet {k}: 'region' must be a whole number >= 0, got {r!r:.80}")
        box = s.get("box")
        label = str(s.get("label", ""))
        if r == 0 or label == "image":
            pic.whole_regions.add(r)
        if box is not None:
            pic.boxes[r] = (_box(box, f"snippet {k}"), label)
        note = f"{s['score']:.2f}" if isinstance(s.get("score"), (int, float)) else ""
        pic.labels.append(Label(str(s.get("text", "")), r, note))
        seg.append((str(s.get("text", "")), r))
    pic.sentences.append(seg)
    return pic


def from_caption(rec: dict, image: Path) -> Picture:
    """A picture of one captions-JSONL line: the caption, and the phrases of its ``regions`` (``vsa caption
    --regions``: each detector box described on its own) on their boxes; a grounded caption (``vsa caption
    --ground``: ``snippets``) is drawn as an alignment, its snippets on their boxes, with the region phrases
    beside them (a box that holds a snippet and a phrase is one box)."""
    if rec.get("snippets"):
        pic = from_alignment(rec, image)
        pic.title = str(rec.get("key") or rec.get("path") or "")
    else:
        pic = Picture(Path(image), str(rec.get("key") or rec.get("path") or ""))
        pic.sentences.append([(str(rec.get("caption", "")), None)])
    for i, reg in enumerate(_list(rec, "regions"), 1):
        box = reg.get("box")
        if box is None:
            continue
        box, label = _box(box, f"region {i}"), str(reg.get("label", ""))
        r = next((k for k, (b, lab) in pic.boxes.items()
                  if lab == label and max(abs(x - y) for x, y in zip(b, box)) <= 0.5), None)
        if r is None:
            r = max(pic.boxes, default=0) + 1
            pic.boxes[r] = (box, label)
        if label == "image":
            pic.whole_regions.add(r)
        pic.labels.append(Label(str(reg.get("caption", "")), r, phrase=True))
    return pic


# ----------------------------------------------------------------------------- drawing


def _line(text) -> str:
    """``text`` on one line for PIL: line breaks (``\\n``, ``\\r``, U+0085, U+2029, ...) make its text layout
    fail, so every run of white space becomes one space."""
    return " ".join(str(text).split())


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, cur = [], ""
    for w in text.split():
        t = f"{cur} {w}".strip()
        if draw.textlength(t, font=font) <= width or not cur:
            cur = t
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    return lines or [""]


def _sentence_lines(pic: Picture, measure, font, width: float) -> list[list[tuple]]:
    """The sentence block under the image: lines of ``(word, region)``, wrapped at ``width``."""
    lines = []
    for seg in pic.sentences:
        words = [(w, r) for text, r in seg for w in text.split()]
        line, x = [], 0.0
        for w, r in words:
            wl = measure.textlength(w + " ", font=font)
            if x + wl > width and line:
                lines.append(line)
                line, x = [], 0.0
            line.append((w, r))
            x += wl
        lines.append(line)
    return lines


def _panel_rows(pic: Picture, is_whole, centre, measure, font, width: float) -> list[tuple]:
    """Side-panel rows ``(Label, wrapped lines)``: one per region, its snippets in sentence order joined by a
    dot (one line to each box); object regions sorted by box-centre height, whole-image ones last."""
    grouped: dict[tuple, Label] = {}  # a region's snippets in one row, its own phrase in another
    for L in pic.labels:
        at = (L.region, L.phrase)
        if at in grouped:
            g = grouped[at]
            grouped[at] = Label(f"{g.text}  \u00b7  {L.text}", L.region, ", ".join(x for x in (g.note, L.note) if x),
                                L.phrase)
        else:
            grouped[at] = Label(L.text, L.region, L.note, L.phrase)
    labels = sorted(grouped.values(), key=lambda L: (is_whole(L.region) or centre(L.region) is None,
                                                     (centre(L.region) or (0, 0))[1]))
    return [(L, _wrap(measure, L.text, font, width)) for L in labels]


def _draw_boxes(d, pic: Picture, is_whole, scale: float, W: int, H: int, top: int, font) -> None:
    """Object regions as 3px coloured frames with a dark outline and a class tag; the whole image as an inset
    frame."""
    used = {L.region for L in pic.labels}
    tags: list[tuple] = []
    tag_draw: list[tuple] = []
    for r in sorted(used):
        if r not in pic.boxes:
            continue
        box, label = pic.boxes[r]
        label = _line(label)
        whole = is_whole(r)
        col = pic.colour(r, whole)
        x1, y1, x2, y2 = (v * scale for v in box)
        x1, x2 = max(0, min(x1, W - 1)), max(0, min(x2, W - 1))
        y1, y2 = max(0, min(y1, H - 1)) + top, max(0, min(y2, H - 1)) + top
        if whole:
            d.rectangle([x1 + 2, y1 + 2, x2 - 2, y2 - 2], outline=col, width=5)
            continue
        d.rectangle([x1 - 1, y1 - 1, x2 + 1, y2 + 1], outline="black", width=1)
        d.rectangle([x1, y1, x2, y2], outline=col, width=3)
        d.rectangle([x1 + 3, y1 + 3, x2 - 3, y2 - 3], outline="black", width=1)
        if label:  # a tag with the class name, moved down the box's left edge until it overlaps no other tag
            tw = d.textlength(label, font=font)
            ty = y1 + 3 if y1 + 22 < y2 else y1 - 20
            tag = None
            while ty + 18 <= max(y2, y1 + 18):
                cand = (x1 + 3, ty, x1 + 3 + tw + 8, ty + 18)
                if not any(cand[0] < t[2] and t[0] < cand[2] and cand[1] < t[3] and t[1] < cand[3] for t in tags):
                    tag = cand
                    break
                ty += 19
            if tag is not None:
                tags.append(tag)
                tag_draw.append((tag, col, label))
    for tag, col, label in tag_draw:  # after every box, so no frame crosses a tag
        d.rectangle(list(tag), fill=col)
        d.text((tag[0] + 4, tag[1] + 1), label, fill="white", font=font)


def _row_heights(rows) -> list[int]:
    return [len(w) * 24 + 14 for _, w in rows]


def _place_rows(rows, is_whole, centre, top: int, body_h: int) -> list[float]:
    """The y of each panel row: as near its box centre's height as the rows above allow, pushed back up from
    the bottom where rows ran over the body."""
    heights = _row_heights(rows)
    ys, y = [], top + 4
    for (L, _), h in zip(rows, heights):
        c = None if is_whole(L.region) else centre(L.region)
        want = top + c[1] - 12 if c is not None else y
        y = max(y, want)
        ys.append(y)
        y += h
    overflow = y - (top + body_h)
    for i in range(len(ys) - 1, -1, -1):
        if overflow <= 0:
            break
        limit = (ys[i - 1] + heights[i - 1]) if i else top + 4
        shift = min(overflow, ys[i] - limit)
        for k in range(i, len(ys)):
            ys[k] -= shift
        overflow -= shift
    return ys


def _draw_rows(d, pic: Picture, rows, ys, is_whole, centre, px: float, top: int, f_label, f_small) -> None:
    """Panel rows (colour swatch, wrapped snippet text, the region's name and score) with leader lines to
    their boxes."""
    mixed = len({L.phrase for L in pic.labels}) > 1  # snippets and region phrases: say which rows are phrases
    for (L, wrapped), y in zip(rows, ys):
        whole = is_whole(L.region)
        col = pic.colour(L.region, whole)
        h = len(wrapped) * 24
        cy = y + 12
        d.rectangle([px, cy - 8, px + 16, cy + 8], fill=col)
        for i, ln in enumerate(wrapped):
            d.text((px + 26, y + i * 24), ln, fill=col, font=f_label)
        end_y = y + h - 2
        sub = "whole image" if whole else (pic.boxes.get(L.region, (None, ""))[1] or f"region {L.region}")
        if L.note:
            sub += f"  score {L.note}"
        if L.phrase and mixed:
            sub += "  (region phrase)"
        d.text((px + 26, end_y), _line(sub), fill="#666666", font=f_small)
        c = centre(L.region)
        if c is not None and not whole:
            cx, cyy = c[0], c[1] + top
            d.line([(px - 2, cy), (cx, cyy)], fill="white", width=5)
            d.line([(px - 2, cy), (cx, cyy)], fill=col, width=3)
            d.ellipse([cx - 6, cyy - 6, cx + 6, cyy + 6], fill=col, outline="white", width=2)


def _draw_sentences(d, pic: Picture, lines, is_whole, y: float, x0: float, line_h: int, font) -> None:
    """The sentence(s), each snippet's words in its region's colour and underlined."""
    for line in lines:
        x = x0
        space = d.textlength(" ", font=font)
        for i, (w, r) in enumerate(line):
            wl = d.textlength(w, font=font)
            if r is None:
                d.text((x, y), w, fill="black", font=font)
            else:
                col = pic.colour(r, is_whole(r))
                d.text((x, y), w, fill=col, font=font)
                same_next = i + 1 < len(line) and line[i + 1][1] == r
                d.line([(x, y + 25), (x + wl + (space if same_next else 0), y + 25)], fill=col, width=3)
            x += wl + space
        y += line_h


def render(pic: Picture, side: int = 512, panel: int = 400, max_pixels: int | None = None):
    """Draw ``pic``; returns a PIL RGB image: the photo with its boxes, a side panel of snippets with leader
    lines to their boxes, the sentence(s) underneath."""
    from PIL import Image, ImageDraw

    from vsa.images import open_image

    im = open_image(pic.image, max_pixels)
    if not pic.labels:
        panel = 0  # a plain caption: no side panel
    W0, H0 = im.size
    scale = side / max(W0, H0)
    W, H = max(1, round(W0 * scale)), max(1, round(H0 * scale))
    im = im.resize((W, H), Image.BICUBIC)
    pad, line_h, top = 16, 30, 28  # top: the title bar
    f_label, f_small, f_text, f_title = _font(19, bold=True), _font(14), _font(20), _font(14)

    def centre(r):
        b = pic.boxes.get(r)
        return ((b[0][0] + b[0][2]) / 2 * scale, (b[0][1] + b[0][3]) / 2 * scale) if b else None

    def is_whole(r):
        b = pic.boxes.get(r)
        return r in pic.whole_regions or (b is not None and _is_whole(b[0], b[1], W0, H0))

    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    sent_lines = _sentence_lines(pic, measure, f_text, W + panel - pad)
    rows = _panel_rows(pic, is_whole, centre, measure, f_label, panel - 2 * pad - 28)
    body_h = max(H, sum(_row_heights(rows)) + 8)
    canvas = Image.new("RGB", (W + panel, top + body_h + pad + len(sent_lines) * line_h + pad), "white")
    canvas.paste(im, (0, top))
    d = ImageDraw.Draw(canvas)
    d.text((6, 6), _line(pic.title), fill="#333333", font=f_title)
    _draw_boxes(d, pic, is_whole, scale, W, H, top, f_small)
    _draw_rows(d, pic, rows, _place_rows(rows, is_whole, centre, top, body_h), is_whole, centre, W + pad, top,
               f_label, f_small)
    _draw_sentences(d, pic, sent_lines, is_whole, top + body_h + pad, pad / 2, line_h, f_text)
    return canvas


# ----------------------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px} .card{background:white;border:1px solid #ddd;border-radius:6px;padding:12px;margin:0 0 18px 0;
display:inline-block;vertical-align:top;max-width:940px} .card img{max-width:100%;display:block}
.sent{font-size:17px;margin:8px 0 0 0;line-height:1.7} .snip{border-bottom:3px solid;padding:0 1px;font-weight:600}
.meta{color:#666;font-size:13px} .ok{color:#1a7f1a;font-weight:700} .bad{color:#999}
nav button{margin:0 4px} input{font-size:15px;padding:3px 6px} table{border-collapse:collapse}
td{vertical-align:top;padding:6px 10px;border-bottom:1px solid #eee} .thumb{width:104px;height:auto;border:3px solid transparent;vertical-align:middle}
.thumbs{white-space:nowrap}
.thumb.ok{border-color:#1a9f1a} .rank{color:#888;font-size:12px}
"""


def _sentence_html(pic: Picture, is_whole) -> str:
    parts = []
    for seg in pic.sentences:
        h = []
        for text, r in seg:
            if r is None:
                h.append(html.escape(text))
            else:
                col = pic.colour(r, is_whole(r))
                h.append(f'<span class="snip" style="color:{col};border-color:{col}" data-region="{r}">{html.escape(text)}</span>')
        parts.append('<p class="sent">' + " ".join(h) + "</p>")
    return "".join(parts)


def _phrases_html(pic: Picture, is_whole) -> str:
    """The region phrases of a caption (``vsa caption --regions``), each in its box's colour."""
    items = []
    for L in pic.labels:
        if L.phrase:
            col = pic.colour(L.region, is_whole(L.region))
            where = "whole image" if is_whole(L.region) else pic.boxes.get(L.region, (None, ""))[1]
            items.append(f'<li><span class="snip" style="color:{col};border-color:{col}" data-region="{L.region}">'
                         f'{html.escape(L.text)}</span> <span class="meta">{html.escape(where)}</span></li>')
    return f'<ul class="phrases">{"".join(items)}</ul>' if items else ""


def write_pictures_page(entries: list[tuple[Picture, str]], out_dir: Path, title: str = "vsa") -> Path:
    """``entries``: (picture, PNG file path relative to ``out_dir``, ``/``-separated; the page links it
    URL-encoded). Writes ``out_dir/index.html``."""
    from vsa.io import atomic_write

    cards = []
    for pic, png in entries:
        def is_whole(r, pic=pic):
            return r in pic.whole_regions or (r in pic.boxes and pic.boxes[r][1] == "image")
        n_boxes = len({L.region for L in pic.labels if L.region in pic.boxes})
        n_phrases = sum(L.phrase for L in pic.labels)
        cards.append(
            f'<div class="card" data-boxes="{n_boxes}" data-snippets="{len(pic.labels) - n_phrases}" '
            f'data-phrases="{n_phrases}">'
            f'<div class="meta">{html.escape(pic.title)}</div>'
            f'<img src="{html.escape(url(png))}" alt="{html.escape(pic.title)}">'
            f"{_sentence_html(pic, is_whole)}{_phrases_html(pic, is_whole)}</div>")
    doc = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
           f"<p class=\"meta\">{len(entries)} picture(s). Each snippet is joined to the centre of its box; "
           f"a frame around the whole image marks snippets grounded in the whole image.</p>"
           + "".join(cards) + "</body></html>\n")
    out = Path(out_dir) / "index.html"
    with atomic_write(out) as fh:  # a file name that is not UTF-8 is shown as its \udcXX escapes
        fh.write(doc.encode("utf-8", "backslashreplace"))
    return out


RETRIEVAL_JS = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const PER = 20;
let mode = 'i2t', page = 0, filt = '';
function esc(s){return String(s).replace(/[&<>"']/g, c => ({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;',"'":'&#39;'}[c]));}
function items(){
  const L = mode === 'i2t' ? D.i2t : D.t2i;
  if (!filt) return L;
  const f = filt.toLowerCase();
  return L.filter(x => (mode === 'i2t' ? D.images[x.image].key : D.sentences[x.sent].text).toLowerCase().includes(f)
                       || (mode === 'i2t' && x.top.some(s => D.sentences[s].text.toLowerCase().includes(f))));
}
function thumb(i, ok){const im = D.images[i]; return `<img class="thumb${ok?' ok':''}" src="${esc(im.thumb)}" title="${esc(im.key)}" alt="${esc(im.key)}">`;}
function draw(){
  const L = items(), n = Math.max(1, Math.ceil(L.length / PER));
  page = Math.min(page, n - 1);
  const rows = L.slice(page * PER, page * PER + PER).map(x => {
    if (mode === 'i2t') {
      const s = x.top.map((sid, k) => { const ok = x.gt.includes(sid);
        return `<div class="${ok?'ok':''}"><span class="rank">${k+1}.</span> ${ok?'&#10003; ':''}${esc(D.sentences[sid].text)}</div>`; }).join('');
      const miss = x.top.some(sid => x.gt.includes(sid)) ? '' :
        `<div class="bad">correct (rank ${esc(x.rank)}): ${x.gt.slice(0, 2).map(sid => esc(D.sentences[sid].text)).join(' / ')}</div>`;
      return `<tr class="item"><td>${thumb(x.image, false)}<div class="meta">${esc(D.images[x.image].key)}<br>first correct at rank ${esc(x.rank)}</div></td><td>${s}${miss}</td></tr>`;
    }
    const t = x.top.map((iid, k) => `<span><span class="rank">${k+1}</span>${thumb(iid, iid === x.gt)}</span>`).join(' ');
    const miss = x.top.includes(x.gt) ? '' : ` <span class="bad">&nbsp;correct (rank ${esc(x.rank)}):</span>${thumb(x.gt, true)}`;
    return `<tr class="item"><td style="max-width:320px">${esc(D.sentences[x.sent].text)}<div class="meta">correct image at rank ${esc(x.rank)}</div></td><td class="thumbs">${t}${miss}</td></tr>`;
  }).join('');
  document.getElementById('rows').innerHTML = rows;
  document.getElementById('pos').textContent = `page ${page + 1} / ${n} (${L.length} ${mode === 'i2t' ? 'images' : 'sentences'})`;
}
function setMode(m){mode = m; page = 0; draw();}
document.getElementById('i2t').onclick = () => setMode('i2t');
document.getElementById('t2i').onclick = () => setMode('t2i');
document.getElementById('prev').onclick = () => {page = Math.max(0, page - 1); draw();};
document.getElementById('next').onclick = () => {page += 1; draw();};
document.getElementById('q').oninput = e => {filt = e.target.value; page = 0; draw();};
const h = new URLSearchParams(location.hash.slice(1));
if (h.get('mode')) mode = h.get('mode');
if (h.get('page')) page = parseInt(h.get('page')) || 0;
draw();
"""


def write_retrieval_page(data: dict, out_dir: Path, title: str = "vsa retrieval") -> Path:
    """``data``: ``{"images": [{"key", "thumb"}], "sentences": [{"text", "image"}], "i2t": [{"image", "top": [sent idx],
    "gt": [sent idx], "rank"}], "t2i": [{"sent", "top": [image idx], "gt": image idx, "rank"}], "summary": str}``;
    ``thumb``: a file path relative to ``out_dir`` (``/``-separated), linked URL-encoded. The page's script
    inserts every text (keys, sentences, ranks) HTML-escaped."""
    from vsa.io import atomic_write

    data = {**data, "images": [{**im, "thumb": url(im["thumb"])} for im in data.get("images", [])]}
    doc = (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
           f"<p class=\"meta\">{html.escape(str(data.get('summary', '')))}</p>"
           "<nav><button id=\"i2t\">Image annotation (image &rarr; sentences)</button>"
           "<button id=\"t2i\">Image search (sentence &rarr; images)</button> "
           "<input id=\"q\" placeholder=\"filter by word or file\"> "
           "<button id=\"prev\">&larr;</button><span id=\"pos\"></span><button id=\"next\">&rarr;</button></nav>"
           "<p class=\"meta\">Correct sentences are marked &#10003; in green; the correct image has a green frame.</p>"
           "<table><tbody id=\"rows\"></tbody></table>"
           f"<script type=\"application/json\" id=\"data\">{script_json(data)}</script>"
           f"<script>{RETRIEVAL_JS}</script></body></html>\n")
    out = Path(out_dir) / "retrieval.html"
    with atomic_write(out) as fh:  # a file name that is not UTF-8 is shown as its \udcXX escapes
        fh.write(doc.encode("utf-8", "backslashreplace"))
    return out


def thumb_name(key: str, src: Path) -> str:
    """The thumbnail file name of image ``key`` read from ``src``: its stem made safe (:func:`safe_part`) and a
    hash of the key, the image file's absolute path, size and modification time, so two images never share a
    thumbnail (``a/x.jpg``, ``b/x.jpg``) and an image changed since an earlier run into the same folder gets a
    new one."""
    try:
        st = os.stat(src)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:  # write_thumb says why
        stamp = ""
    h = hashlib.sha1(f"{key}\0{os.path.abspath(src)}\0{stamp}".encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{safe_part(Path(str(key)).stem, 40)}-{h}.jpg"


def write_thumb(src: Path, dst: Path, side: int = 160, max_pixels: int | None = None) -> None:
    from vsa.images import open_image
    from vsa.io import atomic_write

    im = open_image(src, max_pixels)
    im.thumbnail((side, side))
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(dst) as fh:
        im.save(fh, "JPEG", quality=85)


def save_png(img, dst: Path) -> None:
    from vsa.io import atomic_write

    with atomic_write(dst) as fh:
        img.save(fh, "PNG", optimize=True)


# ----------------------------------------------------------------------------- retrieval ranks -> page data

_IMG_FIELDS = ("key", "image", "filename", "imgid", "image_id")
_SENT_FIELDS = ("sentid", "sent", "sentence_id", "sentence")
_TOP_FIELDS = ("top", "topk", "ranked", "top_sentences", "top_images", "top_sentids", "top_keys", "top_imgids")
_GT_FIELDS = ("gt", "truth", "correct", "gt_sentids", "gt_sentences", "gt_image", "gt_key", "gt_imgid")


def _field(d: dict, names, what: str, source, default=...):
    from vsa.errors import VsaError

    for n in names:
        if n in d:
            return d[n]
    if default is not ...:
        return default
    raise VsaError(f"a {what} entry has none of the fields {', '.join(names)} (has: {', '.join(sorted(d))})", source)


def retrieval_data(ranks: dict, ds, out_dir: Path, top: int = 5, source=None, progress_factory=None,
                   max_pixels: int | None = None) -> dict:
    """Page data for :func:`write_retrieval_page` from ``vsa eval --ranks-out`` JSON and the dataset.

    Reads the ``--ranks-out`` format of :mod:`vsa.alignment.evaluate` (docs/formats.md): ``{"split", "model",
    "images": [{"key", "top": [sentid...], "gt": [sentid...], "rank"}], "sentences": [{"sentid", "top":
    [key...], "gt": key, "rank"}]}``; ``i2t``/``t2i`` for ``images``/``sentences`` and image ids for keys are
    accepted too.  Thumbnails are written into ``out_dir/thumbs/``, one per image file (named by :func:`thumb_name`).
    A ``rank`` must be a whole number from 1 (or absent); anything else is refused, naming the entry.
    """
    from vsa.errors import VsaError

    i2t = ranks.get("i2t", ranks.get("images"))
    t2i = ranks.get("t2i", ranks.get("sentences"))
    if not isinstance(i2t, list) or not isinstance(t2i, list):
        raise VsaError("retrieval ranks need lists 'i2t' (per image) and 't2i' (per sentence)", source)
    by_key, by_name, by_imgid, by_sentid = {}, {}, {}, {}
    for r in ds.images:
        by_key[r.key] = r
        by_name.setdefault(Path(r.key).name, r)
        by_imgid[r.imgid] = r
        for s in r.sentences:
            by_sentid[s.sentid] = (r, s)
    images: list[dict] = []
    img_index: dict[str, int] = {}
    sents: list[dict] = []
    sent_index: dict[int, int] = {}

    def img(ref):
        if isinstance(ref, dict):
            ref = _field(ref, _IMG_FIELDS, "image", source)
        if not isinstance(ref, (str, int)) or isinstance(ref, bool):
            raise VsaError(f"an image of the ranks must be a key or an image id, got {ref!r:.80}", source)
        r = by_key.get(ref) or by_name.get(Path(str(ref)).name) if isinstance(ref, str) else by_imgid.get(ref)
        if r is None:
            raise VsaError(f"image {ref!r} of the ranks is not in the dataset {ds.source}", source)
        if r.key not in img_index:
            img_index[r.key] = len(images)
            images.append({"key": r.key, "_rec": r})
        return img_index[r.key]

    def sent(ref):
        if isinstance(ref, dict):
            ref = _field(ref, _SENT_FIELDS, "sentence", source)
        hit = by_sentid.get(int(ref)) if isinstance(ref, (int, float, str)) and str(ref).lstrip("-").isdigit() else None
        if hit is None:
            raise VsaError(f"sentence {ref!r} of the ranks is not in the dataset {ds.source}", source)
        r, s = hit
        if s.sentid not in sent_index:
            sent_index[s.sentid] = len(sents)
            sents.append({"text": s.raw or " ".join(s.tokens), "image": img(r.key)})
        return sent_index[s.sentid]

    i2t_name = "i2t" if "i2t" in ranks else "images"
    t2i_name = "t2i" if "t2i" in ranks else "sentences"

    def entry(e, where: str) -> dict:
        if not isinstance(e, dict):
            raise VsaError(f"{where}: expected an object, got {e!r:.80}", source)
        rank = e.get("rank")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
            raise VsaError(f"{where}: 'rank' must be a whole number from 1, got {rank!r:.80}", source)
        return e

    def ids(v, what: str, where: str) -> list:
        if not isinstance(v, list):
            raise VsaError(f"{where}: '{what}' must be a list, got {v!r:.80}", source)
        return v

    out_i2t, out_t2i = [], []
    for n, e in enumerate(i2t):
        where = f"{i2t_name}[{n}]"
        e = entry(e, where)
        gt = _field(e, _GT_FIELDS, "i2t", source, default=None)
        i = img(e)
        rec = images[i]["_rec"]
        gt_ids = [sent(g) for g in ids(gt, "gt", where)] if gt is not None else [sent(s.sentid) for s in rec.sentences]
        tops = [sent(x) for x in ids(_field(e, _TOP_FIELDS, "i2t", source), "top", where)[:top]]
        rank = e.get("rank") or next((k + 1 for k, x in enumerate(tops) if x in gt_ids), None)
        out_i2t.append({"image": i, "top": tops, "gt": gt_ids, "rank": rank if rank is not None else f">{top}"})
    for n, e in enumerate(t2i):
        where = f"{t2i_name}[{n}]"
        s = sent(entry(e, where))
        gt = _field(e, _GT_FIELDS, "t2i", source, default=None)
        gt_i = img(gt) if gt is not None else sents[s]["image"]
        tops = [img(x) for x in ids(_field(e, _TOP_FIELDS, "t2i", source), "top", where)[:top]]
        rank = e.get("rank") or next((k + 1 for k, x in enumerate(tops) if x == gt_i), None)
        out_t2i.append({"sent": s, "top": tops, "gt": gt_i, "rank": rank if rank is not None else f">{top}"})
    out_dir = Path(out_dir)
    prog = progress_factory() if progress_factory else None
    task = prog.add_task("thumbs", total=len(images)) if prog else None
    if prog:
        prog.start()
    try:
        for im in images:
            src = ds.image_path(im["_rec"])
            im["thumb"] = f"thumbs/{thumb_name(im['key'], src)}"
            dst = _out_file(out_dir / "thumbs", im["thumb"][len("thumbs/"):])
            if not dst.exists():
                write_thumb(src, dst, max_pixels=max_pixels)
            if prog:
                prog.advance(task)
    finally:
        if prog:
            prog.stop()
    for im in images:
        del im["_rec"]
    summ = ranks.get("summary") or ""
    if not summ and isinstance(ranks.get("i2t_summary"), dict):
        summ = str(ranks["i2t_summary"])
    r1_i = 100.0 * sum(1 for e in out_i2t if e["rank"] == 1) / max(len(out_i2t), 1)
    r1_t = 100.0 * sum(1 for e in out_t2i if e["rank"] == 1) / max(len(out_t2i), 1)
    summary = (f"{len(out_i2t)} images, {len(out_t2i)} sentences"
               + (f" ({ranks['model']})" if ranks.get("model") else "")
               + f". Image annotation R@1 {r1_i:.1f}%, image search R@1 {r1_t:.1f}%. {summ}".rstrip())
    return {"split": ranks.get("split", ""), "summary": summary, "images": images, "sentences": sents,
            "i2t": out_i2t, "t2i": out_t2i}


# ----------------------------------------------------------------------------- vsa show


def file_kind(path: Path) -> str:
    """``alignments`` | ``captions`` | ``retrieval``: what ``vsa show`` draws from the file, by its content."""
    from vsa.errors import VsaError
    from vsa.io import iter_jsonl, read_json

    if str(path).endswith(".json") and not str(path).endswith(".jsonl"):
        obj = read_json(path)
        if isinstance(obj, dict):
            return "retrieval"
        raise VsaError("expected retrieval ranks (a JSON object from `vsa eval --ranks-out`)", path)
    for lineno, rec in iter_jsonl(path, with_lineno=True):
        if "caption" in rec:  # a caption record, grounded (`vsa caption --ground`: 'snippets') or not
            return "captions"
        if "snippets" in rec:
            return "alignments"
        raise VsaError("neither an alignment (no 'snippets') nor a caption record (no 'caption')", path, lineno)
    raise VsaError("empty file", path)


def image_path(rec: dict, root, source: Path, lineno: int) -> Path:
    """The image file of an alignment or caption record: its ``path`` (as given, or next to ``source``), else
    its ``key`` under the image root ``root``."""
    from vsa.errors import VsaError

    for f in ("path", "key"):
        if rec.get(f) is not None and not isinstance(rec[f], str):
            raise VsaError(f"'{f}' must be a string, got {rec[f]!r:.80}", source, lineno)
    cands = []
    if rec.get("path"):
        p = Path(rec["path"])
        cands += [p, source.parent / p]
    if rec.get("key") and root is not None:
        cands.append(Path(root) / rec["key"])
    for c in cands:
        if c.exists():
            return c
    if not cands:
        raise VsaError("cannot find the image: the record has no 'path' and no image root is set "
                       "(pass --images or set [dataset] images in vsa.toml)", source, lineno)
    raise VsaError(f"image not found (tried {', '.join(map(str, cands))}; pass --images)", source, lineno)


def picture_name(rec: dict, kind: str, used: set) -> str:
    """The PNG file name of a record: the stem of its key (or path) and, for alignments, its sentid, each made
    safe by :func:`safe_part`; ``-2``, ``-3``... where the name (in any case) is in ``used``, which gets it."""
    base = safe_part(Path(str(rec.get("key") or rec.get("path") or "")).stem)
    if kind == "alignments" and rec.get("sentid") not in (None, ""):
        base += f"-{safe_part(rec['sentid'])}"
    name, n = f"{base}.png", 1
    while name.lower() in used:
        n += 1
        name = f"{base}-{n}.png"
    used.add(name.lower())
    return name


def show_pictures(path: Path, out_dir: Path, kind: str | None = None, root=None, keys=None, split: str | None = None,
                  limit: int = 50, sentences: int = 5, side: int = 512, no_png: bool = False,
                  max_pixels: int | None = None, progress=None) -> dict:
    """``vsa show`` of an alignments or captions JSONL (``kind``, default: :func:`file_kind`): a PNG per chosen
    record (at most ``sentences`` per image, ``limit`` images (0: all), only image ``keys`` and ``split`` when
    given; no PNG with ``no_png``) and ``index.html`` in ``out_dir``. ``root``: the image root for records
    without a usable ``path``. Returns ``{"page", "pictures", "images"}``."""
    from vsa.errors import VsaError
    from vsa.io import iter_jsonl

    path, out_dir = Path(path), Path(out_dir)
    kind = kind or file_kind(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_image: dict[str, int] = {}
    chosen = []
    for lineno, rec in iter_jsonl(path, with_lineno=True):
        key = str(rec.get("key") or rec.get("path") or "")
        if keys and key not in keys and Path(key).name not in keys:
            continue
        if split and rec.get("split") not in (None, split):
            continue
        if key not in per_image:
            if limit and len(per_image) >= limit:
                continue
            per_image[key] = 0
        if per_image[key] >= sentences:
            continue
        per_image[key] += 1
        chosen.append((lineno, rec))
    entries: list[tuple[Picture, str]] = []
    pictures = []
    for lineno, rec in chosen:  # fail before any work
        img = image_path(rec, root, path, lineno)
        try:
            pictures.append((rec, from_alignment(rec, img) if kind == "alignments" else from_caption(rec, img)))
        except VsaError as e:
            raise VsaError(e.reason, path, lineno) if e.path is None else e from None
    used: set[str] = set()  # lower case: one file per picture also where names differ only in case
    task = progress.add_task("show", total=len(chosen)) if progress is not None else None
    for rec, pic in pictures:
        name = picture_name(rec, kind, used)
        if not no_png:
            save_png(render(pic, side=side, max_pixels=max_pixels), _out_file(out_dir, name))
        entries.append((pic, name))
        if task is not None:
            progress.advance(task)
    if not entries:
        raise VsaError("nothing to show (check --key / --split)", path)
    page = write_pictures_page(entries, out_dir, title=f"vsa {kind}: {path.name}")
    return {"page": page, "pictures": len(entries), "images": len(per_image)}


def show_retrieval(path: Path, ds, out_dir: Path, top: int = 5, max_pixels: int | None = None,
                   progress_factory=None) -> dict:
    """``vsa show`` of retrieval ranks JSON (``vsa eval --ranks-out``) of dataset ``ds``: ``retrieval.html`` and
    thumbnails in ``out_dir``, ``top`` ranked items per query. Returns ``{"page", "images", "sentences"}``."""
    from vsa.io import read_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = retrieval_data(read_json(path), ds, out_dir, top=top, source=path, progress_factory=progress_factory,
                          max_pixels=max_pixels)
    page = write_retrieval_page(data, out_dir, title=f"vsa retrieval: {ds.name} {data.get('split', '')}")
    return {"page": page, "images": len(data["i2t"]), "sentences": len(data["t2i"])}

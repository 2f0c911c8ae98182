"""`vsa show` pages in a real headless browser (Debian's chromium): no console errors, no broken images.

Each page is loaded from disk (file://) through a copy with an error hook injected at the top of
<head>: it records console.error calls, uncaught exceptions, failed resource loads, images that
did not decode and dialogs (alert, confirm, prompt, print: what injected script would open), and
writes them into the DOM, which chromium's --dump-dom prints.  A screenshot of
every page is saved (into $VSA_SCREENSHOTS when set, else the test's tmp folder).  The hook is
proven by pages broken on purpose.  Skips when chromium is absent (`.ci/install-chromium`).
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
from PIL import Image, ImageDraw

from tests.conftest import run_cli

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (run .ci/install-chromium)")

HOOK = """<script>
(function(){
  var errs = [];
  var oe = console.error;
  console.error = function(){ errs.push('console.error: ' + Array.prototype.join.call(arguments, ' ')); return oe.apply(console, arguments); };
  window.addEventListener('error', function(e){
    var t = e.target;
    if (t && t !== window && (t.src || t.href)) errs.push('failed to load: ' + (t.src || t.href));
    else errs.push('uncaught: ' + e.message);
  }, true);
  window.addEventListener('unhandledrejection', function(e){ errs.push('unhandled rejection: ' + e.reason); });
  ['alert', 'confirm', 'prompt', 'print'].forEach(function(f){
    window[f] = function(m){ errs.push('dialog: ' + f + '(' + m + ')'); };
  });
  window.addEventListener('load', function(){ setTimeout(function(){
    var imgs = document.images;
    for (var i = 0; i < imgs.length; i++) if (!imgs[i].complete || imgs[i].naturalWidth === 0) errs.push('broken image: ' + imgs[i].src);
    var pre = document.createElement('pre'); pre.id = '__vsa_check';
    pre.textContent = JSON.stringify({errors: errs, images: imgs.length, text: document.body.innerText.length,
      rows: document.querySelectorAll('tr.item').length, cards: document.querySelectorAll('.card').length,
      srcs: Array.prototype.map.call(imgs, function(im){ return im.src; }), body: document.body.innerText,
      title: document.title});
    document.body.appendChild(pre);
  }, 300); });
})();
</script>"""

NO_DIALOGS = "<script>['alert', 'confirm', 'prompt', 'print'].forEach(function(f){ window[f] = function(){}; });</script>"

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars"]


def _chromium(args: list, profile: Path, timeout=90) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, timeout=timeout)


def check_page(page: Path, tmp_path: Path, hash_: str = "") -> dict:
    """Load ``page`` in chromium; returns {"errors": [...], "images": n, "text": chars} and saves a screenshot."""
    page = Path(page).resolve()
    src = page.read_text()
    assert "<head>" in src
    checked = page.with_name(f".check-{page.name}")
    checked.write_text(src.replace("<head>", "<head>" + HOOK, 1))
    # the screenshot is of the page as it is, but a dialog would hold headless chromium until the timeout
    # (the check above reports it)
    unblocked = page.with_name(f".shot-{page.name}")
    unblocked.write_text(src.replace("<head>", "<head>" + NO_DIALOGS, 1))
    try:
        url = checked.as_uri() + hash_
        r = _chromium(["--dump-dom", "--virtual-time-budget=5000", url], tmp_path / f"profile-{page.stem}")
        m = re.search(r'<pre id="__vsa_check">(.*?)</pre>', r.stdout.decode("utf-8", "replace"), re.S)
        assert m, f"the page did not finish loading in chromium: {r.stderr.decode()[-2000:]}"
        result = json.loads(html.unescape(m.group(1)))
        shots = Path(os.environ.get("VSA_SCREENSHOTS") or tmp_path)
        shots.mkdir(parents=True, exist_ok=True)
        shot = shots / f"{page.parent.name}-{page.stem}{hash_.replace('#', '-').replace('=', '-')}.png"
        _chromium([f"--screenshot={shot}", "--window-size=1280,1400", "--virtual-time-budget=5000",
                   unblocked.as_uri() + hash_], tmp_path / f"profile-shot-{page.stem}")
    finally:
        checked.unlink(missing_ok=True)
        unblocked.unlink(missing_ok=True)
    assert shot.exists(), f"no screenshot of {page}"
    with Image.open(shot) as im:
        assert len(im.convert("RGB").getcolors(1 << 20) or [0, 0]) > 10, "blank screenshot"
    result["screenshot"] = str(shot)
    return result


def assert_clean(result: dict, min_images: int):
    assert result["errors"] == [], result["errors"]
    assert result["images"] >= min_images
    assert result["text"] > 50


# ----------------------------------------------------------------------------- the hook itself fails on broken pages


@pytest.mark.parametrize("body,expect", [
    ('<img src="no-such-image.png">', "failed to load"),
    ('<script>console.error("something broke")</script>', "console.error: something broke"),
    ('<script>undefinedFunction()</script>', "uncaught"),
    ('<img src="data:image/png;base64,AAAA">', "failed to load"),
    ('<img src="x" onerror="alert(1)">', "dialog: alert(1)"),
])
@pytest.mark.slow
def test_broken_pages_are_caught(tmp_path, body, expect):
    page = tmp_path / "broken.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>b</title></head><body><p>{'x' * 80}</p>{body}</body></html>")
    res = check_page(page, tmp_path)
    assert any(expect in e for e in res["errors"]), res
    with pytest.raises(AssertionError):
        assert_clean(res, 0)


@pytest.mark.slow
def test_clean_page_passes(tmp_path):
    Image.new("RGB", (20, 20), "red").save(tmp_path / "ok.png")
    page = tmp_path / "ok.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>ok</title></head><body><p>{'x' * 80}</p><img src='ok.png'></body></html>")
    assert_clean(check_page(page, tmp_path), 1)


# ----------------------------------------------------------------------------- vsa show pages


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for i in range(n):
        im = Image.new("RGB", (224, 224), (40 + 20 * i, 120, 200 - 15 * i))
        ImageDraw.Draw(im).ellipse([40 + 5 * i, 50, 150, 170], fill=(230, 200, 40))
        key = f"img{i}.jpg"
        im.save(folder / key)
        keys.append(key)
    return keys


@pytest.mark.slow
def test_alignment_and_caption_pages(tmp_path):
    keys = _images(tmp_path / "imgs", 3)
    recs = []
    for i, k in enumerate(keys):
        recs.append({"key": k, "sentid": i, "split": "test", "tokens": "a yellow ball on the blue floor".split(), "beta": 1.0,
                     "snippets": [{"start": 0, "end": 3, "text": "a yellow ball", "region": 1, "box": [40, 50, 150, 170], "label": "sports ball", "score": 1.5},
                                  {"start": 3, "end": 7, "text": "on the blue floor", "region": 0, "box": [0, 0, 224, 224], "label": "image", "score": 0.4}]})
    (tmp_path / "al.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    r = run_cli("show", tmp_path / "al.jsonl", "-o", tmp_path / "al", "--images", tmp_path / "imgs")
    assert r.returncode == 0, r.stderr.decode()
    assert_clean(check_page(tmp_path / "al" / "index.html", tmp_path), 3)

    caps = [{"path": str(tmp_path / "imgs" / k), "key": k, "caption": "a yellow ball on a blue floor",
             "regions": [{"box": [40, 50, 150, 170], "label": "sports ball", "caption": "a yellow ball"}]} for k in keys]
    (tmp_path / "caps.jsonl").write_bytes(b"".join(orjson.dumps(c) + b"\n" for c in caps))
    r = run_cli("show", tmp_path / "caps.jsonl", "-o", tmp_path / "caps")
    assert r.returncode == 0, r.stderr.decode()
    assert_clean(check_page(tmp_path / "caps" / "index.html", tmp_path), 3)


@pytest.mark.slow
def test_retrieval_page(tmp_path):
    keys = _images(tmp_path / "imgs", 6)
    ds = {"dataset": "tiny", "images": [
        {"filename": k, "imgid": i, "split": "test", "sentids": [2 * i, 2 * i + 1],
         "sentences": [{"raw": f"picture number {i} with a yellow ball", "tokens": [], "imgid": i, "sentid": 2 * i},
                       {"raw": f"ball {i} on a blue floor", "tokens": [], "imgid": i, "sentid": 2 * i + 1}]}
        for i, k in enumerate(keys)]}
    for im in ds["images"]:
        for s in im["sentences"]:
            s["tokens"] = s["raw"].split()
    (tmp_path / "ds.json").write_bytes(orjson.dumps(ds))
    # the `vsa eval --ranks-out` format (docs/formats.md, "Retrieval ranks JSON")
    ranks = {"split": "test", "dataset": "tiny", "model": "align.pt", "k": 3,
             "images": [{"key": k, "top": [(2 * i + 2) % 12, 2 * i, 2 * i + 1], "top_scores": [0.3, 0.2, 0.1],
                         "gt": [2 * i, 2 * i + 1], "rank": 2} for i, k in enumerate(keys)],
             "sentences": [{"sentid": s, "text": "", "top": [keys[s // 2], keys[(s // 2 + 1) % 6]], "top_scores": [0.2, 0.1],
                            "gt": keys[s // 2], "rank": 1} for s in range(12)]}
    (tmp_path / "ranks.json").write_bytes(orjson.dumps(ranks))
    out = tmp_path / "ret"
    r = run_cli("show", tmp_path / "ranks.json", "-o", out, "--dataset", tmp_path / "ds.json", "--images", tmp_path / "imgs")
    assert r.returncode == 0, r.stderr.decode()
    assert len(list((out / "thumbs").glob("*.jpg"))) == 6
    res = check_page(out / "retrieval.html", tmp_path)
    assert_clean(res, 6)  # image annotation: one thumbnail per image
    res = check_page(out / "retrieval.html", tmp_path, "#mode=t2i")
    assert_clean(res, 12 * 2)  # image search: top-2 thumbnails for each of the 12 sentences
    # a thumbnail gone missing is caught
    next((out / "thumbs").glob("*.jpg")).unlink()
    res = check_page(out / "retrieval.html", tmp_path)
    assert any("thumbs/" in e for e in res["errors"]), res


# ----------------------------------------------------------------------------- hostile captions, file names, ranks

HOSTILE_TEXT = ["<!--<script>", "</script><script>alert(1)</script>", "<img src=x onerror=alert(2)>",
                "\" onmouseover=\"alert(3)", "' onerror='alert(4)", "&amp; &lt;b&gt;", "a \u2028 b \u2029 c",
                "${alert(6)}`"]
# file names: `</script>.jpg` is the key of `script>.jpg` in the folder `<`; a/x.jpg and b/x.jpg share a name
HOSTILE_FILES = [("", "<!--<script>.jpg"), ("", "<script>.jpg"), ("<", "script>.jpg"), ("", "q\"u'o.jpg"),
                 ("", "x#1?.jpg"), ("", "100%.jpg"), ("", "50%25 a b.jpg"), ("", "&amp;.jpg"), ("a", "x.jpg"),
                 ("b", "x.jpg")]


def _hostile_images(root: Path) -> list[str]:
    keys = []
    for i, (sub, fn) in enumerate(HOSTILE_FILES):
        (root / sub).mkdir(parents=True, exist_ok=True)
        im = Image.new("RGB", (224, 224), (20 * i, 200 - 15 * i, 90))
        ImageDraw.Draw(im).rectangle([10 + 10 * i, 40, 150, 170], fill=(240, 220, 30))
        im.save(root / sub / fn, "JPEG")
        keys.append(f"{sub}/{fn}" if sub else fn)
    return keys


def _assert_shows(res: dict, texts):
    assert res["errors"] == [], res["errors"]  # no dialog, no script error, no broken picture
    for t in texts:
        assert t in res["body"], (t, res["body"][:2000])


@pytest.mark.slow
def test_hostile_retrieval_page(tmp_path):
    keys = _hostile_images(tmp_path / "imgs")
    n = len(keys)
    ds = {"dataset": "<!--<script>", "images": []}
    for i, (sub, fn) in enumerate(HOSTILE_FILES):
        sents = [{"raw": HOSTILE_TEXT[i % len(HOSTILE_TEXT)], "imgid": i, "sentid": 2 * i},
                 {"raw": f"plain caption {i}", "imgid": i, "sentid": 2 * i + 1}]
        for s in sents:
            s["tokens"] = s["raw"].split()
        ds["images"].append({"filepath": sub, "filename": fn, "imgid": i, "split": "test", "sentids": [2 * i, 2 * i + 1],
                             "sentences": sents})
    (tmp_path / "ds.json").write_bytes(orjson.dumps(ds))
    ranks = {"split": "</script>", "model": "<!--<script>", "summary": "</script><script>alert(5)</script>",
             "images": [{"key": k, "top": [2 * i, (2 * i + 3) % (2 * n)], "gt": [2 * i, 2 * i + 1], "rank": 1}
                        for i, k in enumerate(keys)],
             "sentences": [{"sentid": s, "top": [keys[s // 2], keys[(s // 2 + 1) % n]], "gt": keys[s // 2], "rank": 1}
                           for s in range(2 * n)]}
    (tmp_path / "ranks.json").write_bytes(orjson.dumps(ranks))
    out = tmp_path / "ret"
    r = run_cli("show", tmp_path / "ranks.json", "-o", out, "--dataset", tmp_path / "ds.json", "--images", tmp_path / "imgs")
    assert r.returncode == 0, r.stderr.decode()
    shown = [t for t in HOSTILE_TEXT if "\u2028" not in t]
    res = check_page(out / "retrieval.html", tmp_path)
    _assert_shows(res, shown + [k for k in keys])
    assert res["rows"] == n and res["images"] == n
    assert len(set(res["srcs"])) == n  # a/x.jpg and b/x.jpg: two thumbnails
    assert "</script>" in res["title"] and "<!--<script>" in res["body"]
    res = check_page(out / "retrieval.html", tmp_path, "#mode=t2i")
    _assert_shows(res, shown)
    assert res["rows"] == 2 * n and res["images"] == 2 * 2 * n


@pytest.mark.slow
def test_retrieval_page_shows_a_text_rank_as_text(tmp_path):
    """write_retrieval_page (the library) takes any rank; the page's script inserts it as text."""
    from vsa.pictures import write_retrieval_page

    (tmp_path / "thumbs").mkdir()
    Image.new("RGB", (60, 60), "orange").save(tmp_path / "thumbs" / "t.jpg")
    bad = "<img src=x onerror=alert(1)>"
    data = {"summary": "s" * 60, "images": [{"key": "t.jpg", "thumb": "thumbs/t.jpg"}],
            "sentences": [{"text": "one", "image": 0}, {"text": "other", "image": 0}],
            "i2t": [{"image": 0, "top": [1], "gt": [0], "rank": bad}], "t2i": [{"sent": 0, "top": [], "gt": 0, "rank": bad}]}
    write_retrieval_page(data, tmp_path)
    for mode, images in (("", 1), ("#mode=t2i", 1)):
        res = check_page(tmp_path / "retrieval.html", tmp_path, mode)
        _assert_shows(res, [f"rank {bad}"])
        assert res["rows"] == 1 and res["images"] == images


@pytest.mark.slow
def test_hostile_alignment_and_caption_pages(tmp_path):
    keys = _hostile_images(tmp_path / "imgs")
    recs = []
    for i, k in enumerate(keys):
        t = HOSTILE_TEXT[i % len(HOSTILE_TEXT)]
        recs.append({"key": k, "sentid": ["x/../../../escape", "</script>", "#?%", 7][i % 4], "split": "test",
                     "tokens": (t + " on the floor").split(), "beta": 1.0,
                     "snippets": [{"start": 0, "end": 1, "text": t, "region": 1, "box": [40, 50, 150, 170], "label": t,
                                   "score": 1.5},
                                  {"start": 1, "end": 4, "text": "on the floor", "region": 0, "box": [0, 0, 224, 224],
                                   "label": "image", "score": 0.4}]})
    (tmp_path / "al.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    r = run_cli("show", tmp_path / "al.jsonl", "-o", tmp_path / "al", "--images", tmp_path / "imgs")
    assert r.returncode == 0, r.stderr.decode()
    res = check_page(tmp_path / "al" / "index.html", tmp_path)
    shown = [t for t in HOSTILE_TEXT if "\u2028" not in t]
    _assert_shows(res, shown)
    assert res["cards"] == len(keys) and res["images"] == len(keys) and len(set(res["srcs"])) == len(keys)

    caps = [{"path": str(tmp_path / "imgs" / k), "key": k, "caption": HOSTILE_TEXT[i % len(HOSTILE_TEXT)],
             "regions": [{"box": [40, 50, 150, 170], "label": "</script>", "caption": "<!--<script>"}]}
            for i, k in enumerate(keys)]
    (tmp_path / "caps.jsonl").write_bytes(b"".join(orjson.dumps(c) + b"\n" for c in caps))
    r = run_cli("show", tmp_path / "caps.jsonl", "-o", tmp_path / "caps")
    assert r.returncode == 0, r.stderr.decode()
    res = check_page(tmp_path / "caps" / "index.html", tmp_path)
    _assert_shows(res, shown + keys)
    assert res["cards"] == len(keys) and res["images"] == len(keys) and len(set(res["srcs"])) == len(keys)

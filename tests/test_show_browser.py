"""`vsa show` pages in a real headless browser (Debian's chromium): no console errors, no broken images.

Each page is loaded from disk (file://) through a copy with an error hook injected at the top of
<head>: it records console.error calls, uncaught exceptions, failed resource loads and images that
did not decode, and writes them into the DOM, which chromium's --dump-dom prints.  A screenshot of
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
  window.addEventListener('load', function(){ setTimeout(function(){
    var imgs = document.images;
    for (var i = 0; i < imgs.length; i++) if (!imgs[i].complete || imgs[i].naturalWidth === 0) errs.push('broken image: ' + imgs[i].src);
    var pre = document.createElement('pre'); pre.id = '__vsa_check';
    pre.textContent = JSON.stringify({errors: errs, images: imgs.length, text: document.body.innerText.length});
    document.body.appendChild(pre);
  }, 300); });
})();
</script>"""

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
    try:
        url = checked.as_uri() + hash_
        r = _chromium(["--dump-dom", "--virtual-time-budget=5000", url], tmp_path / f"profile-{page.stem}")
        m = re.search(r'<pre id="__vsa_check">(.*?)</pre>', r.stdout.decode("utf-8", "replace"), re.S)
        assert m, f"the page did not finish loading in chromium: {r.stderr.decode()[-2000:]}"
        result = json.loads(html.unescape(m.group(1)))
    finally:
        checked.unlink(missing_ok=True)
    shots = Path(os.environ.get("VSA_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / f"{page.parent.name}-{page.stem}{hash_.replace('#', '-').replace('=', '-')}.png"
    _chromium([f"--screenshot={shot}", "--window-size=1280,1400", "--virtual-time-budget=5000", page.as_uri() + hash_],
              tmp_path / f"profile-shot-{page.stem}")
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
])
def test_broken_pages_are_caught(tmp_path, body, expect):
    page = tmp_path / "broken.html"
    page.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>b</title></head><body><p>{'x' * 80}</p>{body}</body></html>")
    res = check_page(page, tmp_path)
    assert any(expect in e for e in res["errors"]), res
    with pytest.raises(AssertionError):
        assert_clean(res, 0)


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

"""Robust image loading and image-file discovery.

:func:`open_image` returns an RGB PIL image with its EXIF orientation applied, or
raises :class:`ImageError` (a VsaError) naming the file and the reason.  Boxes
computed on it refer to the rotated (upright) image.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from vsa.errors import VsaError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own default (about 13400 x 13400)


class ImageError(VsaError):
    pass


def pixel_limit(value: int | None = None) -> int:
    """The decompression-bomb limit: ``value``, else PIL's default (the CLI resolves ``--max-pixels`` and
    $VSA_MAX_PIXELS: :func:`vsa.cli.workspace.max_pixels`)."""
    return DEFAULT_MAX_PIXELS if value is None else int(value)


def _to_rgb(im, path):
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        a = ((a - lo) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return im.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...


def _pil_open():
    """PIL's own ``Image.open``: importing ultralytics replaces it with a wrapper that, on an unreadable
    file, tries to pip-install a HEIF plugin and prints to stdout (our data channel)."""
    import sys

    from PIL import Image

    f = Image.open
    if getattr(f, "__module__", "PIL.Image") != "PIL.Image":
        orig = getattr(sys.modules.get(f.__module__), "_image_open", None)
        if orig is not None and getattr(orig, "__module__", "") == "PIL.Image":
            return orig
    return f


def open_image(path, max_pixels: int | None = None):
    """Open ``path`` as an upright RGB PIL image; ImageError naming the file otherwise."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    limit = pixel_limit(max_pixels)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise ImageError("no such file", p) from None
    except OSError as e:
        raise ImageError(f"cannot read ({e.strerror})", p) from None
    if size == 0:
        raise ImageError("empty file (0 bytes)", p)
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # we check ourselves, with our own message
    try:
        with _pil_open()(p) as im:
            w, h = im.size
            if w * h > limit:
                raise ImageError(
                    f"image is {w}x{h} = {w * h} pixels, over the limit of {limit} (possible decompression bomb; "
                    f"raise the limit with VSA_MAX_PIXELS=N, or with --max-pixels where the command has it)", p)
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im, p)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)", p) from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in msg.lower():
            msg = f"truncated or corrupt image ({msg})"
        raise ImageError(f"cannot decode image ({msg})", p) from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _walk(folder: Path, seen: set) -> Iterable[Path]:
    try:
        real = folder.resolve()
    except (OSError, RuntimeError):
        return
    if real in seen:  # symlink loop or repeated folder
        return
    seen.add(real)
    try:
        entries = sorted(os.scandir(folder), key=lambda e: os.fsencode(e.name))
    except OSError:
        return
    for e in entries:
        p = Path(e.path)
        try:
            if e.is_dir(follow_symlinks=True):
                yield from _walk(p, seen)
            elif e.is_file(follow_symlinks=True) and p.suffix.lower() in IMAGE_EXTS:
                yield p
        except OSError:
            continue


def find_images(inputs: Iterable, recursive: bool = True, missing_ok: bool = False) -> list[tuple[Path, str]]:
    """Expand files and folders into ``(path, key)`` pairs.

    Folders are walked recursively (sorted, symlink loops skipped) for common image
    extensions; keys are paths relative to the folder given. Files given directly
    keep their file name as key. A missing input is an ImageError, unless ``missing_ok``
    (then it is kept, and opening it reports it: ``--skip-bad`` warns and goes on).
    """
    out: list[tuple[Path, str]] = []
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            files = _walk(p, set()) if recursive else sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTS)
            for f in files:
                out.append((f, f.relative_to(p).as_posix()))
        elif p.exists() or missing_ok:
            out.append((p, p.name))
        else:
            raise ImageError("no such file or folder", p)
    return out


def listed_images(path, missing_ok: bool = False, bad_line: str = "not an image path") -> list[tuple[Path, str]]:
    """Images listed one path (file or folder) per line in a text file or on stdin (``"-"``), as
    :func:`find_images` gives them. A line naming nothing that exists is an ImageError
    ``<file>:<line>: bad_line: 'the line'`` (``<stdin>:<line>`` for stdin), unless ``missing_ok``."""
    from vsa.io import numbered_text_lines

    out: list[tuple[Path, str]] = []
    for lineno, line, where in numbered_text_lines(path):
        p = Path(line)
        if not missing_ok and not p.exists():
            shown = line if len(line) <= 60 else line[:57] + "..."
            raise ImageError(f"{bad_line}: {shown!r}", where, lineno)
        out.extend(find_images([p], missing_ok=missing_ok))
    return out


# ----------------------------------------------------------------------------- many images within a pixel budget


def pixel_budget(budget=None, max_pixels: int | None = None):
    """How many decoded pixels a pipeline may hold at once (decoding, prefetched, and in the batch being worked on):
    ``budget`` (a number, or a :class:`PixelBudget` to share or inspect), else the larger of the per-image limit
    (:func:`pixel_limit`) and PIL's default, so one image at the limit always fits (a 178-megapixel RGB image is
    about 0.5 GB). An image over the budget is admitted alone."""
    if isinstance(budget, PixelBudget):
        return budget
    if budget is not None:
        return max(1, int(budget))
    return max(pixel_limit(max_pixels), DEFAULT_MAX_PIXELS)


def image_pixels(path, max_pixels: int | None = None) -> int:
    """``width x height`` of an image file from its header (nothing is decoded): the pixels :func:`open_image`
    will hold. 0 when it will not decode anything: unreadable, or over the limit (refused before decoding)."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with _pil_open()(path) as im:
            w, h = im.size
    except Exception:
        return 0
    finally:
        Image.MAX_IMAGE_PIXELS = old
    n = int(w) * int(h)
    return 0 if n > pixel_limit(max_pixels) else n


class PixelBudget:
    """The pixels held in flight by :func:`budgeted_batches`: ``used`` now, ``peak`` the most ever, ``items``
    admitted and not yet released."""

    def __init__(self, total: int):
        self.total, self.used, self.peak, self.items = int(total), 0, 0, 0

    def fits(self, n: int) -> bool:
        return self.items == 0 or self.used + n <= self.total

    def take(self, n: int) -> None:
        self.used += n
        self.items += 1
        self.peak = max(self.peak, self.used)

    def give(self, n: int, items: int = 0) -> None:
        self.used -= n
        self.items -= items


def budgeted_batches(n: int, cost, load, budget, batch_size: int = 1, weight=None, held=None, pool=None,
                     window: int = 1, turns: bool = False, here=None):
    """The results of ``load(0) .. load(n - 1)``, in order, in batches (lists), with the decoded pixels in flight
    bounded by ``budget`` (a number or a :class:`PixelBudget`).

    ``cost(i)``: the pixels item ``i`` will hold at most while it is loaded (known beforehand: an image header,
    :func:`image_pixels`); an item is admitted for loading only while the costs of all items admitted and not yet
    released fit in the budget (an item over the budget alone when nothing else is held). ``held(result)``: the
    pixels a loaded result still holds (default: its cost; the rest is released when it is taken). ``weight``:
    how much a result adds to a batch (default 1); a batch is yielded when it weighs ``batch_size``, or when the
    next item cannot be admitted before it is released. A yielded batch is emptied, and its pixels released,
    when the next batch is asked for: the caller keeps nothing from it beyond that.

    ``pool``: an executor that runs ``load`` (None: in the caller, one item at a time) with at most ``window``
    items admitted ahead of the caller; ``turns``: admit a new window only once the previous one is taken
    (loading and the caller's work alternate instead of competing for the cores). ``here``: ``(cost, load)``:
    an item that costs more is loaded by that ``load`` in the caller, not in ``pool`` (a worker process would
    hand it over as copies of it).
    """
    from collections import deque

    b = budget if isinstance(budget, PixelBudget) else PixelBudget(budget)
    window = max(1, int(window))
    queue: deque = deque()  # (future or None, index, cost) admitted, not taken
    nxt = 0
    batch: list = []
    batch_held, batch_weight = 0, 0

    next_cost = None  # the cost of item ``nxt``, once read

    def admit():
        nonlocal nxt, next_cost
        while nxt < n and len(queue) < window:
            if next_cost is None:
                next_cost = max(0, int(cost(nxt)))
            if not b.fits(next_cost):
                return
            b.take(next_cost)
            local = pool is None or (here is not None and next_cost > here[0])
            queue.append((None if local else pool.submit(load, nxt), nxt, next_cost))
            nxt, next_cost = nxt + 1, None

    try:
        while True:
            if not (turns and queue):
                admit()
            if batch and (batch_weight >= batch_size or not queue):
                out, count = batch, len(batch)
                yield out
                out.clear()
                b.give(batch_held, items=count)
                batch, batch_held, batch_weight = [], 0, 0
                continue
            if not queue:
                return
            fut, i, c = queue.popleft()
            r = fut.result() if fut is not None else here[1](i) if pool is not None else load(i)
            del fut
            h = c if held is None else min(c, max(0, int(held(r))))
            b.give(c - h)
            batch.append(r)
            batch_held += h
            batch_weight += 1 if weight is None else weight(r)
            r = None  # the batch holds it now, and lets go of it when emptied
    finally:
        for fut, _, _ in queue:
            if fut is not None:
                fut.cancel()


def worker_pool(load, workers: int, threads: bool = False):
    """``(executor, fn)``: ``fn(i)`` runs ``load(i)`` in an executor of ``workers`` processes (``load`` is given to
    each once, not with every item; each has one torch thread, ignores Ctrl-C, which the parent handles, and is
    gone when the parent is), or, with ``threads``, of threads of this process."""
    import concurrent.futures as cf

    if threads:
        return cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="vsa-decode"), load
    import multiprocessing as mp
    import sys

    ctx = mp.get_context("fork") if sys.platform.startswith("linux") else mp.get_context()
    pool = cf.ProcessPoolExecutor(max(1, workers), mp_context=ctx, initializer=_worker_init,
                                  initargs=(os.getpid(), load))
    return pool, _worker_load


def close_pool(pool, abort: bool) -> None:
    """Shut ``pool`` down; with ``abort`` (an error, Ctrl-C, a generator left early) without waiting for the
    work in progress, its worker processes stopped."""
    if pool is None:
        return
    if not abort:
        pool.shutdown(wait=True)
        return
    pool.shutdown(wait=False, cancel_futures=True)
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            p.terminate()
        except Exception:
            pass


_worker_task = None  # the ``load`` of this worker process (worker_pool)


def _worker_load(i):
    return _worker_task(i)


def _worker_init(parent: int, load) -> None:
    import signal
    import sys
    import threading

    global _worker_task
    _worker_task = load
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops the work
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(1)  # decoding/cropping only: leave the cores to the parent's model

    def watch():  # a parent killed outright cannot stop its workers: they stop themselves
        import time

        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="vsa-parent-watch").start()


class _ImageSet:
    """Decodes one image, returns it or the one-line error (runs in worker processes)."""

    def __init__(self, files, max_pixels):
        self.files, self.max_pixels = files, max_pixels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i][0]
        try:
            return i, open_image(path, self.max_pixels), None
        except ImageError as e:
            return i, None, str(e)
        except Exception as e:  # never a worker traceback: the same one-line message as in-process
            return i, None, str(ImageError(f"cannot read image ({type(e).__name__}: {e})", path))


def image_batches(files: list, batch_size: int = 1, workers: int = 0, max_pixels: int | None = None,
                  budget: int | PixelBudget | None = None):
    """Batches of up to ``batch_size`` ``(path, key, image, error)``, in order, decoding in ``workers`` processes
    (0: in this one), with at most ``budget`` decoded pixels (:func:`pixel_budget`) held at once: those being
    decoded, those decoded ahead, and the batch last yielded, which is emptied when the next is asked for. An image
    over a quarter of the budget is decoded in this process: from a worker it would come as copies of itself.

    ``image`` is None and ``error`` a one-line message (naming the file) when it cannot be read.
    """
    files = list(files)
    ds = _ImageSet(files, max_pixels)
    budget = pixel_budget(budget, max_pixels)
    pool, load = worker_pool(ds.__getitem__, workers) if workers > 0 and len(files) > 1 else (None, ds.__getitem__)
    total = budget.total if isinstance(budget, PixelBudget) else budget

    def held(r):
        im = r[1]
        return 0 if im is None else im.size[0] * im.size[1]

    done = False
    try:
        for batch in budgeted_batches(len(files), lambda i: image_pixels(files[i][0], max_pixels), load, budget,
                                      batch_size, held=held, pool=pool, window=8 * max(1, workers),
                                      here=(total // 4, ds.__getitem__)):
            out = [(files[i][0], files[i][1], im, err) for i, im, err in batch]
            batch.clear()
            yield out
            out.clear()
        done = True
    finally:
        close_pool(pool, abort=not done)


def iter_images(files: list, workers: int = 0, max_pixels: int | None = None,
                budget: int | PixelBudget | None = None):
    """Yield ``(path, key, image, error)`` in order, decoding in ``workers`` processes, with at most ``budget``
    decoded pixels held at once (:func:`image_batches`; the image last yielded counts until the next is asked for).

    ``image`` is None and ``error`` a one-line message (naming the file) when it cannot be read.
    """
    for batch in image_batches(files, 1, workers, max_pixels, budget):
        yield from batch

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


class _ImageSet:
    """Map-style dataset for a DataLoader: decodes one image, returns it or the one-line error."""

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


def iter_images(files: list, workers: int = 0, max_pixels: int | None = None):
    """Yield ``(path, key, image, error)`` in order, decoding in ``workers`` processes.

    ``image`` is None and ``error`` a one-line message (naming the file) when it cannot be read.
    """
    ds = _ImageSet(files, max_pixels)
    if workers <= 0 or len(files) < 2:
        for i in range(len(files)):
            _, im, err = ds[i]
            yield files[i][0], files[i][1], im, err
        return
    import torch

    loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=8, worker_init_fn=_one_thread)
    for i, im, err in loader:
        yield files[i][0], files[i][1], im, err


def _one_thread(_):
    import torch

    torch.set_num_threads(1)

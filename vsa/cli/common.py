"""Helpers shared by the CLI modules: stderr console, error handling, logging."""

from __future__ import annotations

import functools
import os
import sys

import typer

from vsa.errors import VsaError, disk_full, disk_full_message

_console = None


def console():
    """A rich Console on stderr (stdout carries data)."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True)
    return _console


def data_console(**kw):
    """A rich Console on the real stdout, for tables that are a command's data (see :func:`guarded`)."""
    from rich.console import Console

    from vsa.io import data_stdout

    return Console(file=data_stdout(), **kw)


def table_console():
    """:func:`data_console` for a table whose cells must be read whole (file names, sentences): as wide as the
    terminal (long cells wrap, none is cut), and off a terminal (a file, a pipe) wide enough for one line per
    row."""
    out = data_console()
    return out if out.is_terminal else data_console(width=100_000)


def info(msg: str) -> None:
    """A log line on stderr (rich markup allowed: callers escape user text)."""
    console().print(msg, highlight=False, soft_wrap=True)


def note(msg: str) -> None:
    """A plain-text log line on stderr (brackets are not markup)."""
    from rich.markup import escape

    console().print(escape(msg), highlight=False, soft_wrap=True)


def warn(msg: str) -> None:
    """``warning: msg`` on stderr, one line; ``msg`` is plain text (brackets are not markup)."""
    from rich.markup import escape

    console().print(f"[yellow]warning:[/yellow] {escape(msg)}", highlight=False, soft_wrap=True)


def fail(msg: str, code: int = 2):
    """Print ``vsa: error: msg`` as one line on stderr and exit with ``code``."""
    sys.stderr.write(f"vsa: error: {msg}\n")
    sys.stderr.flush()
    raise typer.Exit(code)


def quiet_libraries() -> None:
    """Ask third-party libraries not to chat (a user's own setting wins): ultralytics logs at INFO on stdout
    by default, including its settings banner on a first run."""
    os.environ.setdefault("YOLO_VERBOSE", "False")


def guarded(fn):
    """Decorator for command functions: VsaError -> one line on stderr, exit 2 (its ``exit_code``); a full
    disk or quota (ENOSPC, EDQUOT, also behind a library's own error) -> ``<file>: disk full (...)``, exit 2;
    Ctrl-C or SIGTERM -> ``vsa: error: interrupted``, exit 130 (:data:`vsa.runtime.INTERRUPTED`), the same
    for every command, also when a library raises an error of its own while handling it (a library that keeps
    something on an interrupt says so with :class:`vsa.runtime.Interrupted`).

    While the command runs, ``sys.stdout`` points at stderr and vsa's writers use the held real stdout
    (:func:`vsa.io.data_only_stdout`): stdout carries only vsa's data, whatever a library prints.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from vsa.io import data_only_stdout
        from vsa.runtime import INTERRUPTED, sigterm_as_interrupt

        quiet_libraries()
        try:
            with sigterm_as_interrupt(), data_only_stdout():
                return fn(*args, **kwargs)
        except VsaError as e:
            fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", INTERRUPTED)
        except BrokenPipeError:
            # downstream closed the pipe (e.g. `vsa regions ... | head`): stop quietly
            try:
                sys.stdout = None  # type: ignore[assignment]
            finally:
                raise typer.Exit(0)
        except Exception as e:
            full = disk_full(e)  # ENOSPC / EDQUOT from any writer, also wrapped by a library (torch.save)
            if full is not None:
                fail(disk_full_message(full), VsaError.exit_code)
            stop = _interrupt_behind(e)  # a library's own error while it handled Ctrl-C / SIGTERM
            if stop is None:
                raise
            fail(str(stop) if isinstance(stop, VsaError) else "interrupted", INTERRUPTED)

    return wrapper


def _interrupt_behind(exc: BaseException):
    """The interrupt ``exc`` was raised while handling, if any: a KeyboardInterrupt, or the
    :class:`vsa.runtime.Interrupted` that says what was kept (e.g. torch's DataLoader raises "worker killed by
    signal" when the SIGTERM that stopped vsa reached its workers too)."""
    from vsa.runtime import INTERRUPTED

    seen = set()
    exc = exc.__cause__ or exc.__context__
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, KeyboardInterrupt) or (isinstance(exc, VsaError) and exc.exit_code == INTERRUPTED):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def stdin_is_terminal() -> bool:
    """Is stdin an interactive terminal (or missing)? Reading it would wait for typing, not for a pipe."""
    try:
        return sys.stdin is None or sys.stdin.isatty()
    except (AttributeError, ValueError):
        return True


def _stdin_is_a_pipe_or_file() -> bool:
    """Was something piped or redirected into stdin (``|``, ``<`` a file), as against a terminal or /dev/null?"""
    import stat

    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, ValueError, OSError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def command_inputs(given, what: str, usage: str, stdin_holds: str, default_key: str | None = None) -> list[str]:
    """Where a command's inputs come from. One rule, the same whatever stdin is (a terminal, a pipe, /dev/null in
    a Makefile or CI):

    1. the inputs on the command line, ``-`` among them standing for stdin;
    2. none: the workspace's ``default_key`` (e.g. ``[dataset] images`` of vsa.toml), when the command has one and
       vsa.toml sets it; stdin is not read then (said on stderr when something was piped into it);
    3. else stdin, unless it is a terminal (reading it would wait for typing): nothing arriving on it is the
       command's error for empty input;
    4. else a one-line error naming the fix.

    ``what``: the inputs in words ("images"); ``usage``: how to give them ("IMAGES..."); ``stdin_holds``: what
    stdin is read as ("image paths (one per line)")."""
    if given:
        return [str(x) for x in given]
    if default_key is not None:
        from vsa.cli.config import workspace

        value = workspace().get(default_key)
        if value is not None:
            if _stdin_is_a_pipe_or_file():
                section, _, name = default_key.partition(".")
                warn(f"reading [{section}] {name} of vsa.toml ({value}), not stdin: pass - to read {stdin_holds} "
                     f"from stdin")
            return [str(value)]
    if not stdin_is_terminal():
        return ["-"]
    hint = ""
    if default_key is not None:
        section, _, name = default_key.partition(".")
        hint = f", or set [{section}] {name} in vsa.toml (`vsa init`)"
    raise VsaError(f"no {what} given: pass {usage}, or pipe {stdin_holds} into it{hint}")


def parse_weights(text: str, n: int) -> list[float]:
    """``--weights`` of an ensemble: ``n`` comma-separated non-negative numbers, not all zero."""
    try:
        w = [float(x) for x in text.split(",")]
    except ValueError:
        raise VsaError(f"--weights must be comma-separated numbers, got {text!r}") from None
    if len(w) != n:
        raise VsaError(f"--weights gives {len(w)} weights for {n} models (one per --model)")
    if any(x < 0 for x in w) or not any(w):
        raise VsaError(f"--weights must be non-negative and not all zero, got {text!r}")
    return w


ENV_PROGRESS_EVERY = "VSA_PROGRESS_EVERY"
PROGRESS_EVERY_S = 20.0  # a progress line this often on a stderr that is not a terminal (a log file, CI)


def progress(transient: bool = False):
    """Progress on stderr: rich's live bar with counts, rate and ETA on a terminal; elsewhere (a log file, CI,
    ``2>&1 | tee``) plain lines, one every 20 s of work (:class:`LineProgress`; ``$VSA_PROGRESS_EVERY``: ``N`` for
    every N items, ``Ns`` for every N seconds). Both have the methods of rich's Progress that vsa's library calls
    (``add_task``, ``advance``, ``remove_task``, ``start``, ``stop``, and use as a context manager)."""
    if not console().is_terminal:
        return LineProgress(*_progress_every())
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    class _Progress(Progress):
        """Shown from its first task on: a command that stops before any work (a bad argument found by the
        library it hands the progress to) prints no empty bar."""

        def __enter__(self):
            return self

        def add_task(self, *args, **kwargs):
            if not self.live.is_started:
                self.start()
            return super().add_task(*args, **kwargs)

        def __exit__(self, *exc):
            if self.live.is_started:
                self.stop()

        def advance(self, *args, **kwargs):
            from vsa.runtime import raise_if_interrupted

            raise_if_interrupted()  # a SIGTERM swallowed during a fork still stops the command
            super().advance(*args, **kwargs)

        def update(self, *args, **kwargs):
            from vsa.runtime import raise_if_interrupted

            raise_if_interrupted()
            super().update(*args, **kwargs)

    return _Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console(),
        transient=transient,
    )


def config_command(*configs: str):
    """A typer command class whose ``--help`` shows, for every option named like a field of the given config
    dataclasses (``"module:Class"``), that field's default: the dataclass is the one source of defaults, the
    options themselves default to None ("unset": the dataclass value is used). The dataclasses (and torch)
    are imported only when this command's help is shown, so ``vsa --help`` stays fast."""
    from typer.core import TyperCommand

    class ConfigCommand(TyperCommand):
        def format_help(self, ctx, formatter):
            defaults = config_defaults(*configs)
            for p in self.params:
                if p.name in defaults and p.default is None:
                    p.default, p.show_default = defaults[p.name], True
            return super().format_help(ctx, formatter)

    return ConfigCommand


def config_defaults(*configs: str) -> dict:
    """``{field: default}`` of config dataclasses named ``"module:Class"`` (later ones do not override)."""
    import dataclasses
    import importlib

    out: dict = {}
    for spec in configs:
        mod, cls = spec.split(":")
        for f in dataclasses.fields(getattr(importlib.import_module(mod), cls)):
            out.setdefault(f.name, f.default)
    return out


def _progress_every() -> tuple[int | None, float | None]:
    """``(items, seconds)`` between progress lines, from ``$VSA_PROGRESS_EVERY`` (``N`` items or ``Ns``)."""
    text = os.environ.get(ENV_PROGRESS_EVERY, "").strip()
    if not text:
        return None, PROGRESS_EVERY_S
    try:
        if text.endswith("s"):
            seconds = float(text[:-1])
            if seconds > 0:
                return None, seconds
        else:
            n = int(text)
            if n > 0:
                return n, None
    except ValueError:
        pass
    raise VsaError(f"{ENV_PROGRESS_EVERY} must be a number of items (e.g. 100) or of seconds (e.g. 30s), got {text!r}")


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


class LineProgress:
    """Progress as plain lines on stderr, for a stderr that is not a terminal: ``embed: 1200/8000 (15%), 3.1/s,
    elapsed 6:27, eta 36:33`` every ``every_items`` items or every ``every_s`` seconds of a task (whichever is
    set), and a last line when a task that printed one completes. A task shorter than that prints nothing: the
    command's own summary line says what it did. The rate (and ETA) is that of the work since the previous line,
    so work a resumed run found done counts as speed in the first line only; the last line gives the mean."""

    def __init__(self, every_items: int | None = None, every_s: float | None = PROGRESS_EVERY_S, clock=None):
        import time

        self.every_items, self.every_s = every_items, every_s
        self.clock = clock or time.monotonic
        self.tasks: dict[int, dict] = {}
        self._next_id = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        now = self.clock()
        self._next_id += 1
        self.tasks[self._next_id] = {"what": description, "total": total, "done": 0, "t0": now, "last_t": now,
                                     "last_n": 0, "printed": False, "finished": False}
        return self._next_id

    def remove_task(self, task: int) -> None:
        self.tasks.pop(task, None)

    def update(self, task: int, advance: float | None = None, completed: float | None = None,
               total: float | None = None, **_) -> None:
        t = self.tasks.get(task)
        if t is None:
            return
        if total is not None:
            t["total"] = total
        if completed is not None:
            self.advance(task, completed - t["done"])
        elif advance:
            self.advance(task, advance)

    def advance(self, task: int, advance: float = 1) -> None:
        from vsa.runtime import raise_if_interrupted

        raise_if_interrupted()
        t = self.tasks.get(task)
        if t is None:
            return
        now = self.clock()
        t["done"] += advance
        done, total = t["done"], t["total"]
        if total is not None and done >= total:
            if t["printed"] and not t["finished"]:
                self._line(t, now, final=True)
            t["finished"] = True
            return
        due = ((self.every_items is not None and done - t["last_n"] >= self.every_items)
               or (self.every_s is not None and now - t["last_t"] >= self.every_s))
        if due:
            self._line(t, now)

    def _line(self, t: dict, now: float, final: bool = False) -> None:
        done, total = t["done"], t["total"]
        n = f"{done:g}"
        parts = [f"{n}/{total:g} ({100 * done / total:.0f}%)" if total else n]
        t0, n0 = (t["t0"], 0) if final else (t["last_t"], t["last_n"])  # the last line: the mean rate
        rate = (done - n0) / (now - t0) if now > t0 and done > n0 else None
        if rate:
            parts.append(f"{rate:.0f}/s" if rate >= 100 else f"{rate:.1f}/s" if rate >= 1 else f"{1 / rate:.1f} s each")
        parts.append(f"elapsed {_clock(now - t['t0'])}")
        if final:
            parts.append("done")
        elif rate and total:
            parts.append(f"eta {_clock((total - done) / rate)}")
        sys.stderr.write(f"{t['what']}: {', '.join(parts)}\n")
        sys.stderr.flush()
        t.update(printed=True, last_t=now, last_n=done)

"""``vsa completion``, ``vsa --install-completion``, ``vsa --show-completion``: the shell completion scripts.

The scripts are static (:mod:`vsa.completions` writes them from the command tree; ``completions/`` in the
repository holds the same text): completing a word runs no Python.
"""

from __future__ import annotations

from typing import Optional

import typer

from vsa.cli import app
from vsa.cli.common import guarded, note

SHELLS = ("bash", "zsh", "fish")


def detect_shell() -> str:
    """The user's shell, from ``$SHELL``; a one-line error when it is none of bash, zsh, fish."""
    import os

    from vsa.errors import VsaError

    shell = os.path.basename(os.environ.get("SHELL", ""))
    if shell not in SHELLS:
        raise VsaError(f"cannot tell your shell from $SHELL ({shell or 'unset'}): name it, "
                       f"`vsa completion bash|zsh|fish --install` (or without --install: print the script)")
    return shell


def script(shell: str) -> str:
    from vsa.completions import FILES, scripts

    return scripts()[FILES[shell]]


def install_path(shell: str):
    """Where ``shell`` finds a user's completion script for ``vsa`` (bash: bash-completion's user folder; zsh: a
    folder the user puts on ``$fpath``; fish: its completions folder, read by every new fish)."""
    import os
    from pathlib import Path

    home = Path.home()
    if shell == "bash":
        user = os.environ.get("BASH_COMPLETION_USER_DIR") or Path(os.environ.get("XDG_DATA_HOME") or home / ".local/share") / "bash-completion"
        return Path(user) / "completions" / "vsa"
    if shell == "zsh":
        return Path(os.environ.get("ZDOTDIR") or home) / ".zfunc" / "_vsa"
    return Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config") / "fish" / "completions" / "vsa.fish"


def install(shell: str) -> None:
    """Write ``shell``'s script to :func:`install_path` and say on stderr where, and what a new shell needs."""
    from vsa.io import atomic_write

    path = install_path(shell)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w") as fh:
        fh.write(script(shell))
    note(f"wrote {path}")
    if shell == "bash":
        note("new bash shells complete vsa through the bash-completion package; without it, add to ~/.bashrc: "
             f"source {path}")
    elif shell == "zsh":
        note(f"add to ~/.zshrc, before compinit: fpath=({path.parent} $fpath); autoload -Uz compinit && compinit "
             "(then open a new shell)")
    else:
        note("new fish shells complete vsa")


def show(shell: str) -> None:
    from vsa.io import data_stdout

    out = data_stdout()
    out.write(script(shell))
    out.flush()


@app.command("completion")
@guarded
def completion_cmd(
    shell: Optional[str] = typer.Argument(None, help="bash, zsh or fish (default: your $SHELL)."),
    do_install: bool = typer.Option(False, "--install", help="Write the script where the shell finds it (and say what a new shell needs) instead of printing it."),
):
    """Shell completion: print the script for bash, zsh or fish, or --install it.

    `vsa --install-completion` installs it for your $SHELL; `source <(vsa completion bash)` completes in this shell only.
    """
    from vsa.errors import VsaError

    if shell is None:
        shell = detect_shell()
    if shell not in SHELLS:
        raise VsaError(f"no completion for {shell!r}: the shells are {', '.join(SHELLS)}")
    if do_install:
        install(shell)
    else:
        show(shell)


def root_flag(action: str) -> None:
    """``vsa --install-completion`` (``action`` "install") or ``--show-completion`` ("show") for the $SHELL's
    shell; then the process exits."""

    @guarded
    def run():
        (install if action == "install" else show)(detect_shell())

    run()
    raise typer.Exit()

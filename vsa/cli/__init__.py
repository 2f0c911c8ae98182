"""The ``vsa`` command line: one typer app, one module per command (``vsa train-align`` in
``train_align.py``, ``vsa search ...`` in ``search.py``, ...).

Each module in this package registers its command on :data:`app`.  A command body resolves its
arguments (flags, then ``vsa.toml`` and the ``VSA_*`` environment, read only here: :mod:`vsa.cli.config`,
:mod:`vsa.cli.workspace`), makes one library call (``vsa.*``) with explicit arguments, and prints; heavy
imports (torch, ultralytics) happen inside the command functions so ``vsa --help`` is fast.
"""

from __future__ import annotations

import sys

import typer

app = typer.Typer(
    name="vsa",
    help=(
        "Deep visual-semantic alignments (Karpathy & Fei-Fei, CVPR 2015): detect regions, embed them, "
        "align words to regions, generate and score image descriptions.\n\n"
        "Commands read and write JSONL / NPZ and pipe: `vsa regions imgs/ | vsa embed -o feats.npz`. "
        "Defaults come from ./vsa.toml (see `vsa init`).\n\n"
        "Shell completion (bash, zsh, fish): `vsa --install-completion`, or `vsa completion SHELL` to print the script."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
)

def _print_version(value: bool) -> None:
    if value:
        from vsa import __version__

        sys.stdout.write(f"vsa {__version__}\n")
        raise typer.Exit()


def _completion_flag(action: str):
    def callback(value: bool) -> None:
        if value:
            from vsa.cli.completion import root_flag

            root_flag(action)

    return callback


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
    install_completion: bool = typer.Option(False, "--install-completion", callback=_completion_flag("install"),
                                            is_eager=True, expose_value=False,
                                            help="Install shell completion for your $SHELL (bash, zsh, fish) and exit."),
    show_completion: bool = typer.Option(False, "--show-completion", callback=_completion_flag("show"),
                                         is_eager=True, expose_value=False,
                                         help="Print the completion script for your $SHELL and exit."),
) -> None:
    pass


# Command modules register themselves on `app` when imported. The pipeline's commands come in this order in
# `vsa --help`; any other module of this package is a command too, listed after them, so a new command is one file
# (`vsa/cli/<name>.py`; then regenerate completions/ with `python -m vsa.completions`).
_ORDER = ("init", "data", "regions", "embed", "train_align", "score", "search", "train_mrnn", "caption", "align",
          "eval", "show", "completion")
_NOT_COMMANDS = {"common", "config", "workspace"}


def _register_commands() -> None:
    import importlib
    import pkgutil

    found = {m.name for m in pkgutil.iter_modules(__path__)} - _NOT_COMMANDS
    for name in [n for n in _ORDER if n in found] + sorted(found - set(_ORDER)):
        importlib.import_module(f"{__name__}.{name}")


_register_commands()


def main() -> None:
    from vsa.errors import VsaError

    try:
        app()
    except VsaError as e:  # raised outside a guarded command (e.g. while loading vsa.toml)
        sys.stderr.write(f"vsa: error: {e}\n")
        sys.exit(e.exit_code)

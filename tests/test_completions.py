"""Shell completion scripts: up to date with the app, complete, and accepted by each shell."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vsa.completions import DEFAULT_DIR, FILES, command_tree, out_of_date, scripts

ROOT = Path(__file__).resolve().parents[1]
BASH = ROOT / "completions" / FILES["bash"]
ZSH = ROOT / "completions" / FILES["zsh"]
FISH = ROOT / "completions" / FILES["fish"]


def test_committed_scripts_are_up_to_date():
    assert DEFAULT_DIR == ROOT / "completions"
    stale = out_of_date(DEFAULT_DIR)
    assert not stale, f"completions out of date: {stale}; regenerate with `python -m vsa.completions`"


def test_tree_lists_every_command_and_option():
    import typer.main

    from vsa.cli import app

    tree = command_tree()
    by_path = {" ".join(c.path): c for c in tree.walk()}

    def walk(cmd, path):
        c = by_path[" ".join(path)]
        names = {n for o in c.options for n in o.names}
        for p in cmd.params:
            if type(p).__name__.endswith("Option") and not p.hidden:
                assert set(p.opts) <= names, (path, p.opts)
        for name, sub in getattr(cmd, "commands", {}).items():
            assert name in [s.name for s in c.subcommands]
            walk(sub, path + [name])

    walk(typer.main.get_command(app), ["vsa"])
    assert {"init", "data", "eval"} <= {s.name for s in tree.subcommands}
    assert [s.name for s in by_path["vsa data"].subcommands] == ["stats", "convert"]
    text = scripts()
    for c in tree.walk():
        for o in c.options:
            for n in o.names:
                assert n in text[FILES["bash"]] and n.lstrip("-") in text[FILES["fish"]]


def bash_complete(words: list[str], cwd: Path) -> list[str]:
    script = (f'source "{BASH}"; COMP_WORDS=({" ".join(repr(w) for w in words)}); '
              'COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _vsa; printf "%s\\n" "${COMPREPLY[@]}"')
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=cwd, timeout=60)
    assert p.returncode == 0, p.stderr
    return [ln for ln in p.stdout.splitlines() if ln]


def test_bash_sources_and_registers():
    p = subprocess.run(["bash", "-c", f'source "{BASH}" && complete -p vsa'], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "complete -F _vsa vsa"


def test_bash_completes_commands_options_and_files(tmp_path):
    (tmp_path / "feats.npz").write_bytes(b"")
    (tmp_path / "dataset_x.json").write_text("{}")
    assert bash_complete(["vsa", "da"], tmp_path) == ["data"]
    assert bash_complete(["vsa", "data", ""], tmp_path) == ["stats", "convert"]
    assert bash_complete(["vsa", "data", "stats", "--mi"], tmp_path) == ["--min-count"]
    assert bash_complete(["vsa", "data", "stats", "--json", "da"], tmp_path) == ["dataset_x.json"]
    assert bash_complete(["vsa", "data", "convert", "--out", "fe"], tmp_path) == ["feats.npz"]
    assert bash_complete(["vsa", "data", "stats", "--min-count", ""], tmp_path) == []  # a number: no files
    assert "--version" in bash_complete(["vsa", "--"], tmp_path)


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_syntax_and_registration(tmp_path):
    p = subprocess.run(["zsh", "-n", str(ZSH)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    script = (f"autoload -U compinit; compinit -u -d {tmp_path}/zcompdump; source {ZSH}; "
              "print -- ${_comps[vsa]} ${+functions[_vsa_data_stats]} ${+functions[_vsa_eval]}")
    p = subprocess.run(["zsh", "-f", "-c", script], capture_output=True, text=True, timeout=60,
                       env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["_vsa", "1", "1"]


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_syntax_and_completions(tmp_path):
    p = subprocess.run(["fish", "-n", str(FISH)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr

    def complete(line: str) -> list[str]:
        r = subprocess.run(["fish", "--no-config", "-c", f"source {FISH}; complete -C '{line}'"], capture_output=True,
                           text=True, timeout=60, cwd=tmp_path, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
        assert r.returncode == 0, r.stderr
        return [ln.split("\t")[0] for ln in r.stdout.splitlines()]

    (tmp_path / "feats.npz").write_bytes(b"")
    assert complete("vsa data st") == ["stats"]
    assert complete("vsa data stats --min") == ["--min-count"]
    assert complete("vsa data convert --out fe") == ["feats.npz"]
    assert "data" in complete("vsa ")


def zsh_complete(line: str, expect: str, cwd: Path, home: Path) -> str:
    """Type LINE<TAB> in an interactive zsh (on a pty) that loaded _vsa; return what the line became."""
    import os
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:  # child: an interactive zsh without user config
        os.chdir(cwd)
        os.execvpe("zsh", ["zsh", "-f", "-i"], {"HOME": str(home), "PATH": "/usr/bin:/bin", "TERM": "dumb", "PS1": "> "})
    out = b""
    try:
        os.write(fd, f"autoload -U compinit; compinit -u -d {home}/zcd; source {ZSH}; print READY\n".encode())
        deadline = time.monotonic() + 30
        while b"READY\r\n" not in out and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                out += os.read(fd, 65536)
        out = b""
        os.write(fd, f"{line}\t".encode())
        while expect.encode() not in out and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                out += os.read(fd, 65536)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        os.close(fd)
    return out.decode(errors="replace").replace("\x07", "")


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completes_on_a_terminal(tmp_path):
    (tmp_path / "feats.npz").write_bytes(b"")
    assert "vsa data stats " in zsh_complete("vsa data st", "ats ", tmp_path, tmp_path)
    assert "--min-count " in zsh_complete("vsa data stats --mi", "n-count ", tmp_path, tmp_path)
    assert "feats.npz " in zsh_complete("vsa data convert --out fe", "ats.npz ", tmp_path, tmp_path)


# ----------------------------------------------------------------------------- from the vsa command itself


def test_help_says_how_to_get_completion():
    from tests.conftest import run_cli

    r = run_cli("--help")
    text = " ".join(r.stdout.decode().split())
    assert r.returncode == 0 and "Shell completion (bash, zsh, fish): `vsa --install-completion`" in text
    assert "--install-completion" in text and "--show-completion" in text and "completion" in text.split("Commands:")[1]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_vsa_prints_the_shipped_scripts(shell):
    """`vsa completion SHELL` and `vsa --show-completion` (shell from $SHELL) print the script of completions/."""
    from tests.conftest import run_cli

    shipped = (ROOT / "completions" / FILES[shell]).read_bytes()
    r = run_cli("completion", shell)
    assert r.returncode == 0 and r.stdout == shipped, r.stderr.decode()
    r = run_cli("--show-completion", env={"SHELL": f"/usr/bin/{shell}"})
    assert r.returncode == 0 and r.stdout == shipped, r.stderr.decode()


def test_install_completion_writes_where_each_shell_looks(tmp_path):
    from tests.conftest import run_cli

    env = {"HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "ZDOTDIR": str(tmp_path / "z")}
    where = {"bash": tmp_path / "data" / "bash-completion" / "completions" / "vsa",
             "zsh": tmp_path / "z" / ".zfunc" / "_vsa",
             "fish": tmp_path / "cfg" / "fish" / "completions" / "vsa.fish"}
    for shell, path in where.items():
        r = run_cli("--install-completion", env={**env, "SHELL": f"/bin/{shell}"})
        assert r.returncode == 0 and r.stdout == b"", r.stderr.decode()
        assert path.read_bytes() == (ROOT / "completions" / FILES[shell]).read_bytes()
        assert r.stderr.decode().startswith(f"wrote {path}\n")
    assert "fpath=(" in run_cli("completion", "zsh", "--install", env=env).stderr.decode()
    # the installed bash script completes
    p = subprocess.run(["bash", "-c", f'source "{where["bash"]}"; COMP_WORDS=(vsa compl); COMP_CWORD=1; _vsa; '
                        'printf "%s\\n" "${COMPREPLY[@]}"'], capture_output=True, text=True, timeout=60)
    assert p.stdout.split() == ["completion"], p.stderr
    bad = run_cli("--install-completion", env={**env, "SHELL": "/bin/tcsh"})
    assert bad.returncode == 2 and bad.stderr.decode() == (
        "vsa: error: cannot tell your shell from $SHELL (tcsh): name it, `vsa completion bash|zsh|fish --install` "
        "(or without --install: print the script)\n")
    bad = run_cli("completion", "powershell")
    assert bad.returncode == 2 and bad.stderr.decode() == (
        "vsa: error: no completion for 'powershell': the shells are bash, zsh, fish\n")

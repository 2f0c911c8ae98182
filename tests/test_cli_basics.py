"""The CLI shell: help for every command, version, light imports, errors and pipes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import run_cli


def all_command_paths() -> list[list[str]]:
    import typer.main

    from vsa.cli import app

    out = []

    def walk(cmd, path):
        out.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, path + [name])

    walk(typer.main.get_command(app), [])
    return out


def test_help_lists_every_stage():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr.decode()
    out = r.stdout.decode()
    top = [p[0] for p in all_command_paths() if len(p) == 1]
    assert {"init", "data", "regions", "embed", "eval"} <= set(top)
    for name in top:
        assert f"  {name} " in out, name
    assert r.stderr == b""


def test_every_command_has_help():
    paths = all_command_paths()
    assert ["data", "stats"] in paths and ["data", "convert"] in paths
    # one interpreter for all: click's test runner on the real app
    code = (
        "import sys, json\n"
        "from typer.testing import CliRunner\n"
        "from vsa.cli import app\n"
        "bad = []\n"
        f"for path in json.loads({json.dumps(json.dumps(paths))}):\n"
        "    r = CliRunner().invoke(app, path + ['--help'])\n"
        "    if r.exit_code != 0 or 'Usage:' not in r.output:\n"
        "        bad.append((path, r.exit_code, r.output[-300:]))\n"
        "print(json.dumps(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout) == []


def test_short_help_option_and_version():
    r = run_cli("data", "-h")
    assert r.returncode == 0 and b"stats" in r.stdout and b"convert" in r.stdout
    r = run_cli("--version")
    from vsa import __version__

    assert r.returncode == 0 and r.stdout.decode() == f"vsa {__version__}\n"


def test_importing_the_cli_stays_light():
    """`vsa --help` must not pay for torch: no heavy import at module top of vsa.cli.* (or vsa, io, config, data)."""
    code = ("import sys, vsa, vsa.cli, vsa.io, vsa.cli.config, vsa.data, vsa.errors, vsa.completions\n"
            "print(' '.join(sorted(m for m in ('torch', 'torchvision', 'ultralytics') "
            "if m in sys.modules)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"heavy modules imported by `import vsa.cli`: {r.stdout.strip()}"


def test_unknown_command_and_option_exit_2():
    r = run_cli("bogus")
    assert r.returncode == 2 and b"No such command 'bogus'" in r.stderr
    r = run_cli("data", "stats", "--bogus")
    assert r.returncode == 2 and b"No such option" in r.stderr
    r = run_cli("data", "stats", "--min-count", "many")
    assert r.returncode == 2 and b"Invalid value for '--min-count'" in r.stderr


def test_closed_pipe_is_quiet(flickr8k):
    """`vsa data convert big.json | head -c 100`: exit 0, no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "vsa", "data", "convert", str(flickr8k / "dataset_flickr8k.json")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = p.stdout.read(100)
    p.stdout.close()
    err = p.stderr.read()
    rc = p.wait(timeout=120)
    assert head.startswith(b'{"dataset":"flickr8k"')
    assert rc == 0 and err == b"", err.decode()


@pytest.mark.parametrize("argv", [["data", "stats"], ["data", "convert"]])
def test_stdout_carries_data_only(tmp_path, argv):
    ds = tmp_path / "dataset_t.json"
    ds.write_text(json.dumps({"images": [{"filename": "a.jpg", "sentences": ["a dog"]}]}))  # no split: a warning
    r = run_cli(*argv, ds, *(["--json"] if argv[-1] == "stats" else []))
    assert r.returncode == 0, r.stderr.decode()
    json.loads(r.stdout)  # stdout is pure JSON ...
    assert r.stderr.decode().startswith("warning: ")  # ... and the note went to stderr

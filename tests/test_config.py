"""Workspace config vsa.toml: defaults for every command, flags override, paths relative to the file."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from tests.conftest import run_cli
from vsa.cli import config
from vsa.cli.config import DEFAULT_OUTPUTS, PATH_KEYS, Workspace, load_workspace, resolve
from vsa.errors import VsaError


def small_dataset(folder: Path, n: int = 10, name: str = "dataset_small.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    images = [{"filename": f"{i}.jpg", "split": "train" if i < n - 2 else "test",
               "sentences": [{"raw": f"a dog number {i % 3} runs"}, {"raw": "a cat sits"}]} for i in range(n)]
    p = folder / name
    p.write_text(json.dumps({"dataset": "small", "images": images}))
    return p


def write_toml(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / "vsa.toml"
    p.write_text(text)
    return p


def stats(*args, cwd, env=None):
    return run_cli("data", "stats", *args, "--json", cwd=cwd, env=env)


# ----------------------------------------------------------------------------- the library


def test_paths_are_relative_to_the_file(tmp_path):
    p = write_toml(tmp_path / "ws", '[dataset]\npath = "data/d.json"\nimages = "/abs/images"\nmin_count = 3\n'
                                    '[regions]\ntop = 7\nout = "~/r.jsonl"\n[output]\ndir = "out"\n')
    ws = load_workspace(p)
    assert ws.get("dataset.path") == tmp_path / "ws" / "data" / "d.json"
    assert ws.get("dataset.images") == Path("/abs/images")
    assert ws.get("regions.out") == Path.home() / "r.jsonl"
    assert ws.get("dataset.min_count") == 3 and ws.get("regions.top") == 7
    assert ws.get("features.regions") == tmp_path / "ws" / "out" / "feats.npz"  # output.dir + default name
    assert ws.get("align.model") == tmp_path / "ws" / "out" / "align.pt"
    assert ws.get("mrnn.nothing", "dflt") == "dflt"
    assert ws.describe("align.model") == f"[align] model in {p}"


def test_resolve_order_flag_then_file_then_default(tmp_path, monkeypatch):
    write_toml(tmp_path, '[dataset]\npath = "d.json"\n[regions]\ntop = 7\n')
    monkeypatch.chdir(tmp_path)
    config.reset_workspace()
    assert resolve(Path("flag.json"), "dataset.path", "DATASET") == Path("flag.json")
    assert resolve(None, "dataset.path", "DATASET") == tmp_path / "d.json"
    assert resolve(3, "regions.top", "--top") == 3
    assert resolve(None, "regions.top", "--top", default=19) == 7
    assert resolve(None, "regions.conf", "--conf", default=0.1) == 0.1
    assert resolve(None, "align.model", "--model", required=False) is None
    with pytest.raises(VsaError, match=rf"no align model given: pass --model or set \[align\] model in {tmp_path / 'vsa.toml'}"):
        resolve(None, "align.model", "--model")


def test_no_config_names_the_flag_and_vsa_init(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config.reset_workspace()
    assert config.workspace().path is None
    with pytest.raises(VsaError) as e:
        resolve(None, "dataset.path", "DATASET")
    assert str(e.value) == (f"no dataset path given: pass DATASET or set [dataset] path in vsa.toml "
                            f"(none found in {tmp_path}; `vsa init` writes one)")


def test_invalid_toml(tmp_path):
    p = write_toml(tmp_path, "[dataset]\npath = \n")
    with pytest.raises(VsaError, match=r"vsa\.toml: invalid TOML \(Invalid value \(at line 2, column 8\)\)"):
        load_workspace(p)


def test_vsa_config_env(tmp_path, monkeypatch):
    p = write_toml(tmp_path / "elsewhere", '[dataset]\npath = "d.json"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VSA_CONFIG", str(p))
    assert load_workspace().get("dataset.path") == tmp_path / "elsewhere" / "d.json"
    monkeypatch.setenv("VSA_CONFIG", str(tmp_path / "missing.toml"))
    with pytest.raises(VsaError, match="VSA_CONFIG points to a missing file"):
        load_workspace()


def test_template_parses_and_names_every_stage_output(tmp_path):
    p = tmp_path / "vsa.toml"
    config.write_template(p, "d.json", "imgs", "yolo11n.pt", "work")
    data = tomllib.loads(p.read_text())
    ws = Workspace(p, data)
    for key in DEFAULT_OUTPUTS:
        assert ws.get(key) == tmp_path / "work" / DEFAULT_OUTPUTS[key], key
    assert ws.get("dataset.path") == tmp_path / "d.json"
    assert ws.get("dataset.min_count") == 5 and ws.get("regions.top") == 19
    for key in ("dataset.path", "dataset.images", "regions.out", "features.regions", "align.model", "mrnn.model"):
        assert key in PATH_KEYS


# ----------------------------------------------------------------------------- through the CLI


def test_bare_data_stats_uses_the_workspace(tmp_path):
    ws = tmp_path / "ws"
    small_dataset(ws / "data")
    write_toml(ws, '[dataset]\npath = "data/dataset_small.json"\nmin_count = 1\n')
    r = stats(cwd=ws)
    assert r.returncode == 0, r.stderr.decode()
    st = json.loads(r.stdout)
    assert st["source"] == str(ws / "data" / "dataset_small.json")
    assert st["splits"]["train"]["images"] == 8 and st["splits"]["test"]["images"] == 2
    assert st["min_count"] == 1 and st["vocab_size"] == 9  # a dog number 0 1 2 runs cat sits
    # flags override the file
    other = small_dataset(tmp_path / "other", n=5, name="dataset_other.json")
    st2 = json.loads(stats(other, "--min-count", "20", cwd=ws).stdout)
    assert st2["source"] == str(other) and st2["splits"]["train"]["images"] == 3
    assert st2["min_count"] == 20 and st2["vocab_size"] == 0


def test_workspace_from_env_with_another_cwd(tmp_path):
    ws = tmp_path / "ws"
    small_dataset(ws / "data")
    toml = write_toml(ws, '[dataset]\npath = "data/dataset_small.json"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = stats(cwd=elsewhere, env={"VSA_CONFIG": str(toml)})
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)["splits"]["train"]["images"] == 8


def test_bare_command_without_workspace(tmp_path):
    r = run_cli("data", "stats", cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1, err
    assert err.startswith("vsa: error: no dataset path given: pass DATASET or set [dataset] path in vsa.toml")
    assert "`vsa init` writes one" in err


@pytest.mark.parametrize("text,needle", [
    ("[dataset\npath = 1\n", "invalid TOML"),
    ('[dataset]\npath = "d.json"\nmin_count = "five"\n', "min_count must be a positive integer, got 'five'"),
    ('[dataset]\npath = "missing.json"\n', "missing.json: no such file or folder"),
])
def test_bad_workspace_values(tmp_path, text, needle):
    small_dataset(tmp_path, name="d.json")
    write_toml(tmp_path, text)
    r = run_cli("data", "stats", cwd=tmp_path)
    err = r.stderr.decode()
    assert r.returncode == 2 and err.count("\n") == 1 and err.startswith("vsa: error: "), err
    assert needle in err


def test_init_writes_a_working_workspace(tmp_path):
    ds = small_dataset(tmp_path / "data")
    ws = tmp_path / "ws"
    ws.mkdir()
    r = run_cli("init", "--dataset", ds, "--images", tmp_path / "data", "--out", "out", cwd=ws)
    assert r.returncode == 0, r.stderr.decode()
    assert (ws / "vsa.toml").exists() and r.stdout == b""
    assert "wrote vsa.toml" in r.stderr.decode()
    r = stats(cwd=ws)
    assert r.returncode == 0, r.stderr.decode()
    assert json.loads(r.stdout)["source"] == str(ds)
    # refuses to overwrite, unless --force
    again = run_cli("init", cwd=ws)
    assert again.returncode == 2 and b"vsa.toml: already exists (use --force to overwrite)" in again.stderr
    assert run_cli("init", "--force", "--dataset", "x.json", cwd=ws).returncode == 0
    assert 'path = "x.json"' in (ws / "vsa.toml").read_text()
    assert run_cli("init", "--path", ws / "sub" / "my.toml", cwd=ws).returncode == 0
    assert (ws / "sub" / "my.toml").exists()


def test_template_quotes_awkward_paths(tmp_path):
    p = tmp_path / "vsa.toml"
    odd = 'my "data"\\caf\u00e9.json'
    config.write_template(p, odd, "imgs", "yolo11n.pt", "out dir/")
    ws = load_workspace(p)
    assert ws.raw("dataset.path") == odd
    assert ws.get("mrnn.model") == tmp_path / "out dir" / "mrnn.pt"


def test_init_elsewhere_rewrites_paths_relative_to_the_file(tmp_path):
    ds = small_dataset(tmp_path / "data")
    (tmp_path / "imgs").mkdir()
    r = run_cli("init", "--path", "proj/vsa.toml", "--dataset", "data/dataset_small.json", "--images", "imgs",
                "--out", "work", cwd=tmp_path)
    assert r.returncode == 0, r.stderr.decode()
    ws = load_workspace(tmp_path / "proj" / "vsa.toml")
    assert ws.raw("dataset.path") == "../data/dataset_small.json"
    assert ws.get("dataset.path").resolve() == ds
    assert ws.get("dataset.images").resolve() == tmp_path / "imgs"
    assert ws.get("align.model").resolve() == tmp_path / "work" / "align.pt"
    assert ws.raw("regions.detector") is None  # none named: the packaged detector, not a name in the working folder
    text = (tmp_path / "proj" / "vsa.toml").read_text()
    assert '# detector = "yolo11n.pt"' in text and "../shared" not in text
    r = run_cli("init", "--path", "p2/vsa.toml", "--detector", "yolo11n.pt", cwd=tmp_path)
    assert load_workspace(tmp_path / "p2" / "vsa.toml").raw("regions.detector") == "yolo11n.pt"  # a name: unchanged
    r = run_cli("data", "stats", "--json", cwd=tmp_path / "proj")
    assert r.returncode == 0 and json.loads(r.stdout)["splits"]["train"]["images"] == 8


def test_init_warns_about_missing_inputs(tmp_path):
    r = run_cli("init", "--dataset", "nope.json", "--images", "nowhere", cwd=tmp_path)
    assert r.returncode == 0
    err = r.stderr.decode()
    assert "warning: --dataset nope.json does not exist (yet)" in err and "warning: --images nowhere" in err


def test_the_environment_is_read_by_the_cli_only(monkeypatch):
    """$VSA_NO_JIT and $VSA_MAX_PIXELS become explicit arguments in vsa.cli.workspace."""
    from vsa.cli import workspace as W

    monkeypatch.delenv("VSA_NO_JIT", raising=False)
    assert W.jit() is True
    monkeypatch.setenv("VSA_NO_JIT", "1")
    assert W.jit() is False
    monkeypatch.setenv("VSA_MAX_PIXELS", "1e6")
    assert W.max_pixels(None) == 1_000_000 and W.max_pixels(5) == 5

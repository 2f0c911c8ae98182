"""`vsa train-align` under torchrun (2 CPU processes, gloo) against one process at the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from tests.synth_align import make_synthetic
from vsa.distributed import DistEnv
from vsa.alignment.train import rank_share


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rank_share_splits_a_batch_by_image_and_covers_it_once():
    img_of = torch.tensor([0, 0, 1, 2, 2, 3, 4, 4])
    imgs, sents = rank_share(img_of, 5, 2)
    assert [x.tolist() for x in imgs] == [[0, 2, 4], [1, 3]]
    assert [x.tolist() for x in sents] == [[0, 1, 3, 4, 6, 7], [2, 5]]
    one_img, one_sent = rank_share(img_of, 5, 1)
    assert one_img[0].tolist() == list(range(5)) and one_sent[0].tolist() == list(range(8))


def test_gather_is_the_identity_in_one_process():
    from vsa.distributed import gather_with_grad

    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x, DistEnv(), [3]) is x


def _launch(tmp_path, args: list[str], nproc: int):
    """``vsa ARGS`` in one plain process, or under torchrun with ``nproc`` CPU processes."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "vsa", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "vsa", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _train(tmp_path, ds_json, feats, out, nproc: int):
    args = ["train-align", "--dataset", str(ds_json), "--features", str(feats), "-o", str(out),
            "--epochs", "3", "--batch-size", "40", "--hidden", "32", "--lr", "3e-3", "--min-count", "1",
            "--seed", "5", "--threads", "1", "--device", "cpu",
            "--set", "embed=16", "--set", "dropout=0", "--set", "dropout_regions=0", "--set", "lr_decay=1", "--set", "warmup_epochs=1",
            "--set", "val_every=1"]
    return _launch(tmp_path, args, nproc)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_at_the_same_global_batch(tmp_path):
    from vsa.checkpoint import load_checkpoint
    from vsa.io import read_jsonl, write_json

    ds, feats, _ = make_synthetic(tmp_path, n_train=120, n_val=20, n_test=10)
    ds_json = tmp_path / "synthetic.json"
    write_json(ds_json, ds.to_karpathy())
    _train(tmp_path, ds_json, feats, tmp_path / "one.pt", 1)
    p2 = _train(tmp_path, ds_json, feats, tmp_path / "two.pt", 2)
    assert "distributed: 2 processes (gloo)" in p2.stderr
    assert p2.stderr.count("epoch 3/3") == 1  # only rank 0 reports
    one, two = read_jsonl(tmp_path / "one.log.jsonl"), read_jsonl(tmp_path / "two.log.jsonl")
    assert len(one) == len(two) == 3  # one log, written once
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-4)
        assert abs(b["val"]["rsum"] - a["val"]["rsum"]) <= 5.0
    assert one[-1]["loss"] < 0.5 * one[0]["loss"]  # it did learn
    sa = load_checkpoint(tmp_path / "one.last.pt")["state_dict"]
    sb = load_checkpoint(tmp_path / "two.last.pt")["state_dict"]
    assert sa.keys() == sb.keys()
    worst = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    scale = max(float(sa[k].float().abs().max()) for k in sa)
    assert worst <= 1e-3 * scale, worst


def _train_mrnn(tmp_path, ds, feats, out, nproc: int):
    args = ["train-mrnn", "--dataset", str(ds), "--features", str(feats), "--out", str(out), "--epochs", "3",
            "--scst-epochs", "0", "--batch-size", "24", "--hidden", "16", "--embed", "16", "--dropout", "0", "--lr", "5e-3", "--min-count", "1",
            "--threads", "1", "--seed", "2", "--device", "cpu", "--no-beam-search",
            "--set", "bf16=false"]  # float32: the comparison is to 1e-3
    return _launch(tmp_path, args, nproc)


@pytest.mark.slow
def test_train_mrnn_two_gloo_processes_match_one_process(tmp_path):
    from tests.test_mrnn import tiny_dataset
    from vsa.checkpoint import load_checkpoint

    ds, feats = tiny_dataset(tmp_path, n_train=30, n_val=5, n_test=2)  # 90 sentences: batches of 24, 24, 24, 18
    _train_mrnn(tmp_path, ds, feats, tmp_path / "one.pt", 1)
    p2 = _train_mrnn(tmp_path, ds, feats, tmp_path / "two.pt", 2)
    assert "distributed: 2 processes (gloo)" in p2.stderr and p2.stderr.count("best val CIDEr") == 1
    a, b = load_checkpoint(tmp_path / "one.last.pt"), load_checkpoint(tmp_path / "two.last.pt")
    ha, hb = a["meta"]["history"], b["meta"]["history"]
    assert [h["epoch"] for h in ha] == [h["epoch"] for h in hb] == [1, 2, 3]
    for x, y in zip(ha, hb):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3, abs=1e-3)
    assert ha[-1]["loss"] < ha[0]["loss"]
    sa, sb = a["state_dict"], b["state_dict"]
    worst = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    assert worst <= 1e-3 * max(float(sa[k].float().abs().max()) for k in sa), worst

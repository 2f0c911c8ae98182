"""Where the aligner's training time goes: one training step of the shipped recipe with torch's CPU dropout against
vsa's (`vsa.nn.Dropout`), with the recurrences run over the padding against packed, and the per-epoch val
retrieval (prints figures; no pass/fail).

    .venv/bin/python benchmarks/align_step.py [--threads 2] [--steps 20] [--epochs N] [--dataset DATASET_JSON]

1. the shipped aligner's architecture (`AlignModelConfig` defaults, 3 x 3 cells: the whole
   image, up to 19 boxes and 9 cells, Lite0's 1280-d features, random values; boxes per image drawn as Flickr8K's
   YOLOv5n detections: 1-19, 9.7 on average) trained with its loss (`AlignTrainConfig` defaults: `branch_loss` 1) on batches of 128 sentences (2
   per image; lengths drawn from the dataset's train sentences, by default Flickr8K's in ../shared, else uniform
   6-17), milliseconds per step, interleaved in one process, for: `torch.nn.Dropout` with the recurrences over the
   padding (the code before either change), `vsa.nn.Dropout` with them over the padding, packed recurrences
   (each recurrence step computes only the sentences still running: `ReluBRNN`, `last_state`) with the layers
   around the BRNN over the padding, torch's packed GRU module and the region vectors placed by `masked_scatter` (the
   code before the layers moved to the real words; all kinds share the BRNN's cheaper output stacking that came with the next
   change, about 2% of a step), the code as it is (those layers on the real words only, the GRU's recurrence written
   out on the CPU, rows placed by `index_copy`), the same under `torch.autocast("cpu", bfloat16)` (does a CPU with
   native bfloat16 make the step faster?), and the recipe shipped before the GRU branch (`global_encoder = "mean"`,
   `branch_loss` 0), with their ratios;
2. the val retrieval every epoch runs (1000 images x 5000 sentences, `vsa.retrieval.score_matrix`): seconds;
3. what this gives for the shipped recipe (its epochs of 235 steps): minutes of training, of validation every epoch,
   and with ``--set val_every`` equal to the epochs (validated once, at the end); ``--epochs`` for another count.

Run on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=0, help="epochs of the prediction (0: AlignTrainConfig's)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per kind and round (3 rounds)")
    ap.add_argument("--dataset", default=str(ROOT.parent / "shared/data/flickr8k/dataset_flickr8k.json"),
                    help="Karpathy-style dataset JSON whose train sentence lengths are drawn")
    args = ap.parse_args()
    import torch

    import vsa.alignment.model as A
    from vsa.retrieval import score_matrix
    from vsa.alignment.train import AlignTrainConfig, _loss

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    cfg = A.AlignModelConfig(cells=3, global_encoder="gru")
    tcfg = AlignTrainConfig(branch_loss=1.0)
    pool = None
    if Path(args.dataset).is_file():
        from vsa.data import load_dataset

        pool = torch.tensor([min(len(s.tokens), cfg.max_len) for im in load_dataset(args.dataset).split("train")
                             for s in im.sentences])
    rows = cfg.max_regions + 9

    def images(n):
        boxes = torch.randint(1, 20, (n,), generator=g)
        mask = torch.zeros(n, rows, dtype=torch.bool)
        for i in range(n):
            mask[i, : 1 + int(boxes[i])] = True
            mask[i, cfg.max_regions:] = True
        return torch.randn(n, rows, 1280, generator=g), mask

    def sentences(n):
        if pool is None:
            lengths = torch.randint(6, 18, (n,), generator=g)
        else:
            lengths = pool[torch.randint(len(pool), (n,), generator=g)]
        T = int(lengths.max())
        ids = torch.randint(1, 2540, (n, T), generator=g) * (torch.arange(T)[None] < lengths[:, None])
        return ids, lengths

    feats, rmask = images(tcfg.batch_size // tcfg.group)
    ids, lengths = sentences(tcfg.batch_size)
    img_of = torch.arange(tcfg.batch_size) // tcfg.group

    def model_with(dropout_cls, mcfg=cfg):
        A.Dropout, keep = dropout_cls, A.Dropout
        try:
            torch.manual_seed(0)
            m = A.BRNNAligner(mcfg, 2540, 1280)
        finally:
            A.Dropout = keep
        return m, torch.optim.Adam(m.parameters(), tcfg.lr)

    def padded_last_state(gru, x, lengths, drop=None):  # every sentence run to the batch's longest, its last word's
        return gru(x if drop is None else drop(x))[0][torch.arange(len(x)), lengths.clamp(min=1) - 1]

    def module_last_state(gru, x, lengths, drop=None):  # torch's packed GRU module (dropout over the padding too)
        from torch.nn.utils.rnn import pack_padded_sequence

        x = x if drop is None else drop(x)
        return gru(pack_padded_sequence(x, lengths.clamp(min=1), batch_first=True, enforce_sorted=False))[1][-1]

    def masked_regions(self, feats, mask):  # RegionEncoder before: masked_scatter (its gradient a masked_select)
        v = A._l2(self.proj(self.drop(self.stats(feats[mask]))))
        return v.new_zeros(*feats.shape[:2], v.shape[-1]).masked_scatter(mask[..., None], v)

    def padded_words(self, ids, lengths):  # SentenceBRNN's layers around the recurrence over every position
        e = torch.relu(self.inp(self.drop(self.embed(ids))))
        s = torch.relu(self.out(self.drop(self.rnn(e, lengths))))
        return A._l2(s)

    packed_brnn = A.ReluBRNN.forward

    def padded_brnn(self, e, lengths):  # the same cost as running every sentence to the batch's longest
        ones = torch.full_like(lengths, e.shape[1])
        return packed_brnn(self, e, ones) * (torch.arange(e.shape[1])[None] < lengths[:, None])[..., None]

    def step(m, opt, code="now", branch=True, bf16=False):
        keep = A.last_state, A.ReluBRNN.forward, A.SentenceBRNN.forward, A.RegionEncoder.forward
        if code == "padded":
            A.last_state, A.ReluBRNN.forward, A.SentenceBRNN.forward = padded_last_state, padded_brnn, padded_words
        elif code == "packed":
            A.last_state, A.SentenceBRNN.forward = module_last_state, padded_words
        if code != "now":
            A.RegionEncoder.forward = masked_regions
        t = tcfg if branch else AlignTrainConfig(branch_loss=0.0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            try:
                V, vm = m.embed_images(feats, rmask)
                S, sm = m.embed_sentences(ids, lengths)
            finally:
                A.last_state, A.ReluBRNN.forward, A.SentenceBRNN.forward, A.RegionEncoder.forward = keep
            loss = _loss(m, t, V, vm, S, sm, img_of, True)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), tcfg.grad_clip)
        opt.step()

    old = A.AlignModelConfig(cells=3, global_encoder="mean")
    kinds = {"torch dropout, padded": (*model_with(torch.nn.Dropout), "padded", True),
             "vsa dropout, padded": (*model_with(A.Dropout), "padded", True),
             "packed recurrences (before)": (*model_with(A.Dropout), "packed", True),
             "now": (*model_with(A.Dropout), "now", True),
             "now, CPU bfloat16 autocast": (*model_with(A.Dropout), "now", True, True),
             "no GRU branch (RWC-13rf)": (*model_with(A.Dropout, old), "now", False)}
    times = {k: [] for k in kinds}
    for kind in kinds.values():
        for _ in range(3):
            step(*kind)
    for _ in range(3):
        for k, kind in kinds.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step(*kind)
            times[k].append((time.perf_counter() - t) / args.steps * 1000)
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}; sentence "
          f"lengths {'of ' + args.dataset if pool is not None else 'uniform 6-17'}: batch mean "
          f"{lengths.float().mean():.1f}, longest {int(lengths.max())}")
    ms = {k: statistics.median(v) for k, v in times.items()}
    for k, v in ms.items():
        print(f"training step, {k:26s}: {v:6.1f} ms (rounds {', '.join(f'{x:.1f}' for x in times[k])})")
    now, packed = ms["now"], ms["packed recurrences (before)"]
    print(f"ratios: vsa / torch dropout (padded) {ms['vsa dropout, padded'] / ms['torch dropout, padded']:.3f}; "
          f"packed recurrences / padded {packed / ms['vsa dropout, padded']:.3f}; "
          f"now / packed recurrences {now / packed:.3f}; now / torch dropout, padded "
          f"{now / ms['torch dropout, padded']:.3f}; shipped recipe / no GRU branch "
          f"{now / ms['no GRU branch (RWC-13rf)']:.3f}; bfloat16 autocast / float32 "
          f"{ms['now, CPU bfloat16 autocast'] / now:.3f} (CPU capability {torch.backends.cpu.get_cpu_capability()})")

    vfeats, vmask = images(1000)
    vids, vlen = sentences(5000)
    m = kinds["now"][0]
    t = time.perf_counter()
    score_matrix(m, vfeats, vmask, vids, vlen)
    val_s = time.perf_counter() - t
    print(f"val retrieval, 1000 x 5000: {val_s:.1f} s")
    steps = -(-30000 // tcfg.batch_size)
    epochs = args.epochs or tcfg.epochs
    train_min = epochs * steps * now / 1000 / 60
    print(f"shipped recipe, {epochs} epochs of {steps} steps: {train_min:.1f} min of steps + "
          f"{epochs * val_s / 60:.1f} min of val every epoch = {train_min + epochs * val_s / 60:.1f} min; "
          f"with val_every={tcfg.val_every} {train_min + -(-epochs // tcfg.val_every) * val_s / 60:.1f} min; "
          f"with val_every={epochs} {train_min + val_s / 60:.1f} min (goal: 20; batches are read from the features "
          f"file besides)")


if __name__ == "__main__":
    main()

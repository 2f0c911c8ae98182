"""Where a self-critical (SCST) epoch of the generator spends its time (prints figures; no pass/fail).

    .venv/bin/python benchmarks/scst_step.py --features GRID.npz [--split val] [--images 300] [--meteor 2]

The shipped generator (vsa/assets/mrnn-flickr8k.pt, its trained weights, so the samples have the lengths they
have in training) runs the trainer's own SCST loop (`vsa.generator.train._scst_epoch`) over ``--images`` images of
``--split`` read from a `vsa embed --crop grid` file (the Lite2 grid of the shipped model) with their real
references, and the time of each phase is summed: sampling ``scst_samples`` captions per image, the reward
(CIDEr-D, and METEOR in its Java process with ``--meteor W`` > 0, as the shipped recipe's last epochs), the
re-scoring forward (`sequence_logprob`) and the rest (backward, clipping, the optimiser step). The model's weights
change as it trains, as in a real epoch. Run it on an otherwise idle machine.

Two ways of getting the samples' log-probabilities are timed, interleaved ``--repeats`` times from the same
weights: the samples drawn without gradients and re-scored by a teacher-forced forward (two passes; what
distributed training does), and the samples drawn with gradients (`sample_scored`, one pass; the default on one
process). It prints each epoch's phases and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("VSA_SHARED", ROOT.parent / "shared"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=Path, required=True, help="grid features (vsa embed --crop grid, Lite2)")
    ap.add_argument("--dataset", type=Path, default=SHARED / "data" / "flickr8k" / "dataset_flickr8k.json")
    ap.add_argument("--split", default="val")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--meteor", type=float, default=0.0, help="METEOR weight in the reward (needs Java)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="epochs of each way, interleaved")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from vsa.checkpoint import load_checkpoint
    from vsa.data import Vocab, load_dataset
    from vsa.distributed import setup
    from vsa.features.store import load_features
    from vsa.generator import train as T
    from vsa.generator.model import model_from_checkpoint
    from vsa.splits import caption_split

    ck = load_checkpoint(ROOT / "vsa" / "assets" / "mrnn-flickr8k.pt", "mrnn")
    model = model_from_checkpoint(ck)
    vocab = Vocab(ck["vocab"])
    tcfg = T.GeneratorTrainConfig(flip=0.0, scst_meteor=args.meteor)
    sp = T.head(caption_split(load_dataset(args.dataset), load_features(args.features), args.split, vocab,
                              tcfg.max_len, regions=True, max_regions=model.cfg.max_regions), args.images)
    opt = torch.optim.Adam(model.parameters(), lr=tcfg.scst_lr)
    scorer = T.scst_reward(sp, tcfg)
    spent = {"sample": 0.0, "reward": 0.0, "re-score forward": 0.0}
    count = {"samples": 0, "words": 0}

    def timed(name, fn):
        def run(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            spent[name] += time.perf_counter() - t
            return out
        return run

    sample, relp = T.sample, T.sequence_logprob

    def counting_sample(*a, **k):
        seqs = sample(*a, **k)
        count["samples"] += seqs.shape[0]
        count["words"] += int((seqs > 0).sum())
        return seqs

    scored = T.sample_scored

    def counting_scored(*a, **k):
        seqs, lp = scored(*a, **k)
        count["samples"] += seqs.shape[0]
        count["words"] += int((seqs > 0).sum())
        return seqs, lp

    def two_passes(m, f, ma, n, L):
        return T.sample(m, f, ma, n, L), None

    T.sample = timed("sample", counting_sample)
    T.sequence_logprob = timed("re-score forward", relp)
    scorer.score = timed("reward", scorer.score)
    env = setup("cpu")
    modes = {"re-score (two passes)": two_passes, "scored sampling (one pass)":
             timed("sample", counting_scored)}
    start = {k: v.clone() for k, v in model.state_dict().items()}
    T.sample_scored = modes["re-score (two passes)"]
    T._scst_epoch(model, opt, T.head(sp, 20), tcfg, 0, scorer, vocab, env=env)  # warm-up
    times: dict[str, list[float]] = {k: [] for k in modes}
    print(f"torch {torch.__version__}, {args.threads} threads, cpu {torch.backends.cpu.get_cpu_capability()}; "
          f"{len(sp.feats)} images x {tcfg.scst_samples} samples; reward CIDEr-D"
          f"{f' + {args.meteor} x METEOR' if args.meteor else ''}")
    for rep in range(args.repeats):
        for name, fn in modes.items():
            model.load_state_dict(start)
            opt = torch.optim.Adam(model.parameters(), lr=tcfg.scst_lr)
            T.sample_scored = fn
            for k in spent:
                spent[k] = 0.0
            count.update(samples=0, words=0)
            t0 = time.perf_counter()
            reward = T._scst_epoch(model, opt, sp, tcfg, 1, scorer, vocab, env=env)
            total = time.perf_counter() - t0
            times[name].append(total)
            spent["backward + step (the rest)"] = total - sum(v for k, v in spent.items() if k != "backward + step (the rest)")
            print(f"{name}: {total:.1f} s, {total / len(sp.feats) * 1000:.1f} ms per image (6000 images: "
                  f"{total / len(sp.feats) * 6000 / 60:.1f} min per epoch), load {os.getloadavg()[0]:.1f}, "
                  f"{count['words'] / max(count['samples'], 1):.1f} tokens per sample, mean reward {reward:.3f}")
            for k, v in sorted(spent.items(), key=lambda kv: -kv[1]):
                print(f"    {k:28s} {v:7.2f} s  {v / total:6.1%}")
    import statistics

    a, b = (statistics.median(times[k]) for k in modes)
    print(f"median epoch: two passes {a:.1f} s, one pass {b:.1f} s: one pass / two passes = {b / a:.2f} "
          f"(runs {', '.join(f'{y / x:.2f}' for x, y in zip(*times.values()))})")


if __name__ == "__main__":
    main()

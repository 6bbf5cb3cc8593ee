"""Overhead of BBDecoderTrainerCallback on Hugging Face ``Trainer.train`` (CPU, a small BERT).

Configurations, each a fresh model (same seed) trained for ``--steps`` optimizer steps with the same
arguments, measured interleaved (round-robin, order rotated every round):

- ``plain``: ``Trainer.train()`` without callback
- ``callback``: + ``BBDecoderTrainerCallback`` (all six gradient statistics and update ratios of every
  parameter, every step, before the Trainer's clipping)
- ``callback+probes``: + ``probes=True`` (activation RMS/max/kurtosis per block, attention entropy per
  head, logits), eager attention in all three configurations

Reports medians of the whole ``train()`` call and ratios to ``plain``; writes
``bench/results/trainer_callback_tN.json``. Needs ``transformers`` and ``accelerate``. Run::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_trainer_callback.py --rounds 7 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, interleaved, paired_ratio, pin_threads, save_results, thread_arg

try:
    from bbdecoder.integrations.transformers import BBDecoderTrainerCallback
except ImportError as error:  # the bench venv may not have transformers: skip, do not fail run_all
    print(f"bench_trainer_callback skipped: {error}")
    raise SystemExit(0) from error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 4 steps (smoke run)")
    thread_arg(parser)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 3, 4
    threads = pin_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    config = dict(
        vocab_size=1000,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=64,
        num_labels=2,
        attn_implementation="eager",
    )
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (8 * args.steps, 64), generator=g)
    data = [{"input_ids": ids[i], "labels": int(ids[i, 0] % 2)} for i in range(len(ids))]
    work = Path(tempfile.mkdtemp(prefix="bench-trainer-"))

    def run(kind: str) -> Any:
        def call() -> None:
            torch.manual_seed(0)
            model = transformers.BertForSequenceClassification(transformers.BertConfig(**config))
            callbacks = []
            if kind != "plain":
                run_dir = Path(tempfile.mkdtemp(dir=work))
                callbacks.append(BBDecoderTrainerCallback(run_dir, probes=kind == "callback+probes"))
            targs = transformers.TrainingArguments(
                output_dir=str(work / "out"),
                per_device_train_batch_size=8,
                max_steps=args.steps,
                max_grad_norm=1.0,
                logging_steps=10**6,
                save_strategy="no",
                report_to=[],
                use_cpu=True,
                disable_tqdm=True,
                dataloader_num_workers=0,
            )
            transformers.Trainer(model=model, args=targs, train_dataset=data, callbacks=callbacks).train()

        return call

    kinds = ["plain", "callback", "callback+probes"]
    timings = interleaved({k: run(k) for k in kinds}, repeats=args.rounds, warmup=1)
    ratios = {k: paired_ratio(timings[k], timings["plain"]) for k in kinds[1:]}
    for k in kinds:
        print(f"{k:>16}: median {timings[k].median:.3f} s for {args.steps} steps")
    for k, r in ratios.items():
        extra_ms = (timings[k].median - timings["plain"].median) / args.steps * 1e3
        r["extra_ms_per_step_incl_setup"] = extra_ms
        print(
            f"{k:>16} / plain: {r['median_of_ratios']:.3f} (q1 {r['q1']:.3f}, q3 {r['q3']:.3f}); "
            f"+{extra_ms:.1f} ms per step (store set-up and close spread over the steps)"
        )
    path = save_results(
        f"trainer_callback_t{threads}",
        {
            "environment": environment(),
            "steps": args.steps,
            "rounds": args.rounds,
            "config": config,
            "batch": 8,
            "seq_len": 64,
            "timings": timings,
            "ratios": ratios,
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

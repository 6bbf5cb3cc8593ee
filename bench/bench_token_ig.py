"""Token Integrated Gradients against Captum 0.9's ``LayerIntegratedGradients``: time and numbers.

Setting: random-weight ``transformers`` models with BERT-base's shape (12 layers, hidden 768, 12
heads, vocab 30522; sequence classification, 2 labels) and GPT-2's shape (12 layers, 768, 12 heads,
vocab 50257; the next-token logit at the last position), float32, eval mode, one sequence of
``--length`` tokens (default 32), ``--steps`` Gauss-Legendre nodes (default 16), ``--threads``
(default 2). Baseline for both libraries: token id 0 at every position (BERT's pad token).

* Ours: ``IntegratedGradients(model).attribute(inputs, target, baseline=ids, n_steps, method)``
  at the input embeddings (found through ``get_input_embeddings()``), its default rows per pass;
* Captum: ``LayerIntegratedGradients(forward, word_embeddings).attribute(ids, baselines=ids, ...)``
  with its default ``internal_batch_size`` (all rows in one pass);
  interleaved in one process (``common.interleaved``), ratio ours / Captum per round.
* Numbers: ``max |ours - captum| / max |captum|`` on the same call.

Usage: ``python bench/bench_token_ig.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, interleaved, paired_ratio, pin_threads, save_results, thread_arg

from bbdecoder import IntegratedGradients


def bert_case(length: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Any, torch.nn.Module, int]:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(num_labels=2)).eval()
    ids = torch.randint(1000, 30000, (1, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    return (
        model,
        {"input_ids": ids, "attention_mask": mask},
        forward,
        model.bert.embeddings.word_embeddings,
        1,
    )


def gpt2_case(length: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Any, torch.nn.Module, int]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    ids = torch.randint(1000, 50000, (1, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1]

    return model, {"input_ids": ids, "attention_mask": mask}, forward, model.transformer.wte, 464


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 8 steps, 16 tokens")
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    thread_arg(parser)
    args = parser.parse_args()
    threads = pin_threads(args.threads)
    length, steps, repeats = (16, 8, 3) if args.quick else (args.length, args.steps, args.repeats)
    from captum.attr import LayerIntegratedGradients

    results: dict[str, Any] = {"environment": environment(), "length": length, "n_steps": steps}
    for name, make in (("bert_base_shaped", bert_case), ("gpt2_shaped", gpt2_case)):
        print(f"{name}: {length} tokens, {steps} Gauss-Legendre steps", flush=True)
        model, inputs, forward, layer, target = make(length)
        baseline = torch.zeros_like(inputs["input_ids"])
        ig = IntegratedGradients(model)
        lig = LayerIntegratedGradients(forward, layer)

        def ours(ig: Any = ig, inputs: Any = inputs, baseline: Any = baseline, target: int = target) -> Any:
            return ig.attribute(inputs, target, baseline=baseline, n_steps=steps, method="gausslegendre")

        def theirs(
            lig: Any = lig, inputs: Any = inputs, baseline: Any = baseline, target: int = target
        ) -> Any:
            return lig.attribute(
                inputs["input_ids"],
                baselines=baseline,
                target=target,
                additional_forward_args=(inputs["attention_mask"],),
                n_steps=steps,
                method="gausslegendre",
            )

        a, b = ours(), theirs().detach()
        difference = float((a - b).abs().max() / b.abs().max())
        timings = interleaved({"ours": ours, "captum": theirs}, repeats=repeats, warmup=1)
        results[name] = {
            "ours_median_s": timings["ours"].median,
            "captum_median_s": timings["captum"].median,
            "ratio_ours_over_captum": paired_ratio(timings["ours"], timings["captum"]),
            "max_rel_difference": difference,
        }
        print(f"  ratio {results[name]['ratio_ours_over_captum']}, max rel diff {difference:.2e}", flush=True)
    path = save_results(f"token_ig_t{threads}", results)
    print(f"saved {path}")


if __name__ == "__main__":
    main()

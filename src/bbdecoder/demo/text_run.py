"""The text demo (``bbdecoder demo --text``): a small transformer on the planted-keyword task
(:mod:`bbdecoder.demo.text`), trained with the Analyzer and the transformer probes attached,
explained per token, checked, and written into a report. No download.

The check: with Integrated Gradients (pad-token baseline) and gradient x input at the token
embeddings, the top-attributed token of a test sentence is the planted keyword in at least
:data:`REQUIRED_HIT_RATE` of the sentences, while for copies of the model with shuffled weights it
is near chance (the mean of ``1 / length`` over the sentences, the rate of a random pick); both hit
rates are stored. The token maps of a few test sentences go into the store (kind ``token_scores``),
the report draws them as coloured words.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from bbdecoder.attribution import InputXGradient, IntegratedGradients
from bbdecoder.demo.run import DemoResult, fresh_store
from bbdecoder.demo.text import (
    CLASSES,
    PAD_ID,
    TextData,
    TextTransformer,
    make_optimizer,
    make_text_data,
    shuffled_copy,
    text_accuracy,
    training_batches,
)
from bbdecoder.progress import progress_bar, stage
from bbdecoder.report.blobs import store_table
from bbdecoder.report.section_tokens import store_token_maps
from bbdecoder.store.writer import RunWriter

METHODS = ("Integrated Gradients", "Input x Gradient")
REQUIRED_HIT_RATE = 0.9
CHANCE_MARGIN = 0.15  # the shuffled copies' mean hit rate must stay below chance + this
MODEL_FILE = "text_transformer_state_dict.pt"


@dataclass
class TextSettings:
    """Sizes of the text demo; :meth:`quick` is the reduced setting of the tests."""

    n_train: int = 2000
    n_test: int = 200
    epochs: int = 3
    batch_size: int = 32
    n_show: int = 8
    ig_steps: int = 16
    n_shuffled: int = 8
    seed: int = 0

    @classmethod
    def quick(cls) -> TextSettings:
        return cls(n_train=600, n_test=100, epochs=4, n_show=4, ig_steps=16, n_shuffled=2)


TokenExplain = Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def text_explainers(model: nn.Module, ig_steps: int = 16) -> dict[str, TokenExplain]:
    """Method name -> ``f(batch, labels) -> (N, L)`` signed token scores at the token embeddings."""
    ig = IntegratedGradients(model)
    ixg = InputXGradient(model)
    return {
        "Integrated Gradients": lambda batch, labels: ig.token_scores(
            batch, labels, baseline="pad", pad_token_id=PAD_ID, n_steps=ig_steps, method="gausslegendre"
        ),
        "Input x Gradient": lambda batch, labels: ixg.token_scores(batch, labels),
    }


def top_token_hits(scores: torch.Tensor, data: TextData) -> torch.Tensor:
    """Per sentence, whether its highest (signed) token score is at the planted keyword (N,) bool;
    padding never counts."""
    masked = scores.detach().masked_fill(data.attention_mask == 0, float("-inf"))
    return masked.argmax(dim=1) == data.keyword_at


def chance_rate(data: TextData) -> float:
    """The hit rate of a uniformly random token per sentence: the mean of ``1 / length``."""
    return float((1.0 / data.lengths.double()).mean())


def keyword_check(
    model: nn.Module, data: TextData, *, ig_steps: int = 16, n_shuffled: int = 8, seed: int = 0
) -> tuple[dict[str, torch.Tensor], pd.DataFrame]:
    """Token scores of every method for ``data`` (target: the true label), and one row per method:
    ``hit_rate`` (trained model), ``shuffled_hit_rate`` (mean over ``n_shuffled`` shuffled-weight
    copies), ``shuffled_max``, ``chance``, ``n`` and ``passed`` (hit rate >= 0.9 and the shuffled
    mean below chance + 0.15)."""
    batch, labels = data.batch(), data.labels
    scores = {name: f(batch, labels).detach() for name, f in text_explainers(model, ig_steps).items()}
    shuffled: dict[str, list[float]] = {name: [] for name in scores}
    for k in range(n_shuffled):
        control = shuffled_copy(model, seed=seed + k)
        for name, f in text_explainers(control, ig_steps).items():
            shuffled[name].append(float(top_token_hits(f(batch, labels), data).double().mean()))
    chance = chance_rate(data)
    rows = []
    for name, values in scores.items():
        rate = float(top_token_hits(values, data).double().mean())
        control_mean = sum(shuffled[name]) / max(1, len(shuffled[name]))
        rows.append(
            {
                "method": name,
                "hit_rate": rate,
                "shuffled_hit_rate": control_mean,
                "shuffled_max": max(shuffled[name], default=float("nan")),
                "chance": chance,
                "n": len(data),
                "passed": bool(rate >= REQUIRED_HIT_RATE and control_mean < chance + CHANCE_MARGIN),
            }
        )
    return scores, pd.DataFrame(rows)


def run_text_demo(
    out_dir: str | Path = "runs/demo-text",
    *,
    settings: TextSettings | None = None,
    progress: bool = True,
    report: bool = True,
) -> DemoResult:
    """Train, monitor, explain and check the text transformer; write everything into ``out_dir``.

    Writes ``run.sqlite`` (training statistics, transformer probes, the check table, the token maps),
    ``text/keyword_check.csv``, ``text/token_scores.csv``, the model's state_dict
    (``text_transformer_state_dict.pt``, class :class:`~bbdecoder.demo.text.TextTransformer`),
    ``summary.json`` and ``report.html``. An existing run store in ``out_dir`` is replaced.
    """
    s = settings or TextSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fresh_store(out)
    started = time.perf_counter()
    stage(f"text: generating {s.n_train} + {s.n_test} sentences ...", enabled=progress)
    train = make_text_data(s.n_train, seed=s.seed)
    test = make_text_data(s.n_test, seed=s.seed + 10_000)
    model = _train_monitored(train, test, out, s, progress)
    accuracy = text_accuracy(model, test)
    result = DemoResult(out, accuracy)
    writer = RunWriter(out)
    try:
        stage(
            f"text: explaining {len(test)} test sentences (and {s.n_shuffled} shuffled copies) ...",
            enabled=progress,
        )
        scores, check = keyword_check(model, test, ig_steps=s.ig_steps, n_shuffled=s.n_shuffled, seed=s.seed)
        passed = bool(check["passed"].all())
        if not passed:
            import warnings

            warnings.warn(
                "text demo: the planted keyword was not the top-attributed token often enough, or the "
                "shuffled copies found it more often than chance",
                RuntimeWarning,
                stacklevel=2,
            )
        store_table(
            writer,
            "text keyword check",
            check,
            section="metrics",
            caption=f"planted-keyword task ({len(test)} test sentences, accuracy {accuracy:.3f}): share of "
            "sentences whose top-attributed token is the keyword; shuffled = mean over copies with "
            f"permuted weights; chance = mean 1/length. Passed: hit rate >= {REQUIRED_HIT_RATE} and the "
            f"shuffled mean < chance + {CHANCE_MARGIN}",
        )
        result.files += _token_maps(model, test, scores, s, writer, out)
        writer.set_meta("demo_settings", json.dumps({"text": s.__dict__}))
        writer.set_meta("test_accuracy", f"{accuracy:.4f}")
        result.metrics = {
            "text_test_accuracy": accuracy,
            **{f"text_{_slug(r.method)}_keyword_hit_rate": r.hit_rate for r in check.itertuples()},
            **{f"text_{_slug(r.method)}_shuffled_hit_rate": r.shuffled_hit_rate for r in check.itertuples()},
            "text_chance_hit_rate": chance_rate(test),
            "text_explanations_find_keyword": float(passed),
            "seconds": time.perf_counter() - started,
        }
        summary = pd.DataFrame({"quantity": list(result.metrics), "value": list(result.metrics.values())})
        store_table(writer, "demo summary", summary, section="summary", caption="text demo results")
    finally:
        writer.close()
    folder = out / "text"
    folder.mkdir(exist_ok=True)
    check.to_csv(folder / "keyword_check.csv", index=False)
    torch.save(model.state_dict(), out / MODEL_FILE)
    path = out / "summary.json"
    path.write_text(json.dumps(result.metrics, indent=2))
    result.files += [folder / "keyword_check.csv", out / MODEL_FILE, path]
    if report:
        from bbdecoder.report import build_report

        result.report = build_report(out, title="bbdecoder demo: text transformer (planted keyword)")
        result.files.append(result.report)
    return result


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_").replace("-", "")


def _train_monitored(
    train: TextData, test: TextData, out: Path, s: TextSettings, progress: bool
) -> TextTransformer:
    """The steps of :func:`~bbdecoder.demo.text.train_text_transformer`, through the Analyzer with
    :class:`~bbdecoder.monitor.transformer_probes.TransformerProbes` attached."""
    from bbdecoder.monitor import Analyzer
    from bbdecoder.monitor.transformer_probes import TransformerProbes

    torch.manual_seed(s.seed)
    model = TextTransformer()
    n_batches = -(-len(train) // s.batch_size)
    optimizer, schedule = make_optimizer(model, s.epochs * n_batches)
    with Analyzer(model, out) as analyzer, TransformerProbes(analyzer):
        analyzer.attach(optimizer)
        for epoch, batches in enumerate(training_batches(train, s.epochs, s.batch_size, s.seed)):
            model.train()
            bar = progress_bar(
                n_batches, f"text: epoch {epoch + 1}/{s.epochs}", unit="batches", enabled=progress
            )
            for part in batches:
                loss = F.cross_entropy(analyzer.forward_propagation(**part.batch()), part.labels)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()  # the attached analyzer records the step just before
                analyzer.log(loss=loss)
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            model.eval()
            with analyzer.paused():
                accuracy = text_accuracy(model, test)
            analyzer.log(epoch=epoch, test_accuracy=accuracy)
            bar.set_postfix(loss=f"{loss.item():.3f}", test_acc=f"{accuracy:.3f}")
            bar.close()
            analyzer.end_epoch()
    model.eval()
    return model


def _token_maps(
    model: nn.Module,
    test: TextData,
    scores: dict[str, torch.Tensor],
    s: TextSettings,
    writer: RunWriter,
    out: Path,
) -> list[Path]:
    k = min(s.n_show, len(test))
    with torch.no_grad():
        predicted = model(**test[:k].batch()).argmax(dim=1)
    tokens = [test.tokens(i) for i in range(k)]
    titles = [
        f"{CLASSES[int(test.labels[i])]} (pred {CLASSES[int(predicted[i])]}); keyword "
        f"{tokens[i][int(test.keyword_at[i])]!r} at {int(test.keyword_at[i])}"
        for i in range(k)
    ]
    store_token_maps(
        writer,
        "text demo token maps",
        tokens,
        {name: values[:k] for name, values in scores.items()},
        titles=titles,
        caption="test sentences of the planted-keyword task, explained for their true class at the token "
        "embeddings: IG with the pad-token baseline, and gradient x input",
    )
    rows = []
    for i in range(k):
        for position, token in enumerate(tokens[i]):
            rows.append(
                {"sentence": i, "position": position, "token": token}
                | {name: float(values[i, position]) for name, values in scores.items()}
            )
    path = out / "text" / "token_scores.csv"
    path.parent.mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return [path]


__all__ = [
    "METHODS",
    "REQUIRED_HIT_RATE",
    "TextSettings",
    "chance_rate",
    "keyword_check",
    "run_text_demo",
    "text_explainers",
    "top_token_hits",
]

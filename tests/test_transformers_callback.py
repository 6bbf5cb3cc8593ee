"""BBDecoderTrainerCallback on a tiny BERT: gradients before the Trainer's clipping, under accumulation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from bbdecoder.hooks import count_hooks  # noqa: E402
from bbdecoder.integrations.transformers import BBDecoderTrainerCallback  # noqa: E402
from bbdecoder.store import open_run  # noqa: E402


def _bert(attn: str = "sdpa") -> Any:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
        attn_implementation=attn,
    )
    return transformers.BertForSequenceClassification(config)


def _data(n: int = 20, length: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (n, length), generator=g)
    labels = (ids[:, 0] > 20).long()
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels[i]}
        for i in range(n)
    ]


class RecordingTrainer(transformers.Trainer):  # type: ignore[misc]
    """Snapshots every gradient norm right before the Trainer clips (the test's own reference)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference: list[dict[str, float]] = []

    def _clip_grad_norm(self, model: Any) -> Any:
        self.reference.append(
            {n: float(p.grad.double().norm()) for n, p in model.named_parameters() if p.grad is not None}
        )
        return super()._clip_grad_norm(model)


def _train(
    tmp_path: Path, callback: BBDecoderTrainerCallback | None, attn: str = "sdpa", **extra: Any
) -> RecordingTrainer:
    model = _bert(attn)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        num_train_epochs=2,
        learning_rate=1e-2,
        max_grad_norm=0.05,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **extra,
    )
    trainer = RecordingTrainer(
        model=model, args=args, train_dataset=_data(), callbacks=[callback] if callback else []
    )
    trainer.train()
    return trainer


def test_stored_norms_are_before_clipping_and_match_trainer_grad_norm(tmp_path: Path) -> None:
    callback = BBDecoderTrainerCallback(tmp_path / "run")
    trainer = _train(tmp_path, callback)
    # 20 samples / batch 4 = 5 micro-batches per epoch, accumulation 2: steps of 2, 2 and 1 micro-batches
    assert len(trainer.reference) == 6
    run = open_run(tmp_path / "run")
    l2 = run.scalars("l2").pivot(index="step", columns="param", values="value").sort_index()
    assert len(l2) == 6
    logged = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert len(logged) == 6
    clipped = 0
    for step, reference in enumerate(trainer.reference):
        row = l2.iloc[step]
        assert set(reference) == set(row.index)
        for name, value in reference.items():
            assert row[name] == pytest.approx(value, rel=1e-5, abs=1e-9), (step, name)
        whole = math.sqrt(sum(float(v) ** 2 for v in row))
        assert whole == pytest.approx(logged[step], rel=1e-5)
        clipped += logged[step] > 0.05
    assert clipped >= 5  # clipping was active: the stored norms are not the clipped ones (<= 0.05)
    assert set(run.epoch_scalars().epoch) == {0, 1}
    losses = run.steps()
    assert losses["loss"].notna().all()
    # the callback closed its analyzer and removed its hooks at train end
    assert callback.analyzer is not None and callback.analyzer.closed
    assert count_hooks(trainer.model) == count_hooks(_bert())


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path: Path) -> None:
    plain = _train(tmp_path / "a", None)
    watched = _train(tmp_path / "b", BBDecoderTrainerCallback(tmp_path / "run"))
    a, b = plain.model.state_dict(), watched.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    try:
        trainer = _train(tmp_path, BBDecoderTrainerCallback(tmp_path / "run"), bf16=True)
    except (ValueError, RuntimeError) as err:  # pragma: no cover - depends on the CPU
        pytest.skip(f"bf16 on this CPU: {err}")
    assert trainer.accelerator.mixed_precision == "bf16"
    l2 = open_run(tmp_path / "run").scalars("l2").pivot(index="step", columns="param", values="value")
    logged = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    for step, reference in enumerate(trainer.reference):
        for name, value in reference.items():
            assert l2.sort_index().iloc[step][name] == pytest.approx(value, rel=1e-5, abs=1e-9)
        whole = math.sqrt(sum(float(v) ** 2 for v in l2.sort_index().iloc[step]))
        assert whole == pytest.approx(logged[step], rel=1e-4)


def test_reserved_arguments() -> None:
    with pytest.raises(TypeError, match="scaler"):
        BBDecoderTrainerCallback("x", scaler=None)


def test_probes_through_the_callback(tmp_path: Path) -> None:
    trainer = _train(tmp_path, BBDecoderTrainerCallback(tmp_path / "run", probes=True), attn="eager")
    run = open_run(tmp_path / "run")
    steps = set(run.scalars("l2").step)
    assert len(steps) == len(trainer.reference) == 6
    for stat in ("act_rms", "act_kurtosis", "attn_entropy", "logit_max"):
        assert set(run.scalars(stat).step) == steps, stat
    with pytest.raises(Exception, match="eager"):
        _train(tmp_path / "sdpa", BBDecoderTrainerCallback(tmp_path / "run2", probes=True), attn="sdpa")


class _Boom(transformers.TrainerCallback):  # type: ignore[misc]
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == 2:
            raise RuntimeError("boom")


def test_a_failing_train_is_closed_by_the_context_manager(tmp_path: Path) -> None:
    callback = BBDecoderTrainerCallback(tmp_path / "run")
    model = _bert()
    baseline = count_hooks(model)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=_data(), callbacks=[callback, _Boom()]
    )
    with pytest.raises(RuntimeError, match="boom"), callback:
        trainer.train()
    assert callback.analyzer is not None and callback.analyzer.closed
    assert count_hooks(model) == baseline
    assert all(
        p._post_accumulate_grad_hooks is None or not p._post_accumulate_grad_hooks for p in model.parameters()
    )
    assert sorted(set(open_run(tmp_path / "run").scalars("l2").step)) == [0, 1]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_reentrant_gradient_checkpointing(tmp_path: Path) -> None:
    trainer = _train(
        tmp_path,
        BBDecoderTrainerCallback(tmp_path / "run"),
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": True},
    )
    l2 = open_run(tmp_path / "run").scalars("l2").pivot(index="step", columns="param", values="value")
    assert len(l2) == len(trainer.reference) == 6
    for step, reference in enumerate(trainer.reference):
        for name, value in reference.items():
            assert l2.sort_index().iloc[step][name] == pytest.approx(value, rel=1e-5, abs=1e-9), (step, name)

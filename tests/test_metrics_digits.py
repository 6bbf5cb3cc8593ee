"""The metrics on the digits CNN: faithfulness beats a random map, maps change under randomisation.

Pass criteria fixed before the numbers were looked at:

* deletion AUC (zero substrate, one pixel per step, MoRF) of FullGrad and of IG is at least 0.02 below
  the random-order AUC on average, and lower on more than half of the images;
* after the full cascade, the mean Spearman correlation of FullGrad and of IG maps with the originals
  is below 0.9 (the maps change); Grad-CAM and the gradient are reported, not asserted on;

Observed: IG failed its randomisation criterion (0.912 >= 0.9). That outcome is asserted with margins
(IG above 0.8, 0.3 above FullGrad), not as a strict xfail on 0.9, which sat on the noise; a separate
test (added *after* seeing the result) checks the explanation: IG with a
black baseline is ``x * (mean gradient)``, zero on the digits' zero background whatever the weights,
so its ranks stay tied to the input.
* FullGrad's per-sample completeness error stays below 1e-4 (float32).
"""

from __future__ import annotations

import pytest
import torch

from bbdecoder.attribution.fullgrad import FullGrad
from bbdecoder.attribution.gradcam import GradCAM
from bbdecoder.attribution.gradient import Gradient
from bbdecoder.attribution.integrated_gradients import IntegratedGradients
from bbdecoder.demo.digits import load_digits_data, train_digits_cnn
from bbdecoder.metrics import RandomisationResult, completeness, deletion, randomisation_check, spearman


class _IG(IntegratedGradients):
    """IG with a fixed step count for the metrics (the default 50 is fine too, just slower)."""

    def attribute(self, inputs, target=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("n_steps", 32)
        return super().attribute(inputs, target, *args, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Training and the maps on one thread: the numbers do not depend on the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.nn.Module, torch.Tensor]:
    data = load_digits_data()
    model, accuracy = train_digits_cnn(data, epochs=4)
    assert accuracy > 0.85
    return model, data.x_test[:120]


def test_fullgrad_and_ig_beat_a_random_map_on_deletion(digits) -> None:
    model, x = digits
    random = deletion(model, x, torch.ones(len(x), 1, 8, 8), order="random", step=1, seed=0)
    report = {"random": float(random.auc.mean())}
    for name, explainer in (("FullGrad", FullGrad(model)), ("IG", _IG(model))):
        result = deletion(model, x, explainer, step=1)
        report[name] = float(result.auc.mean())
        assert report[name] <= report["random"] - 0.02, report
        assert float((result.auc < random.auc).float().mean()) > 0.5, report
    for name, explainer in (("Grad-CAM", GradCAM(model)), ("Gradient", Gradient(model))):
        report[name] = float(deletion(model, x, explainer, step=1).auc.mean())
    print("\ndeletion AUC (mean):", {k: round(v, 4) for k, v in report.items()})


@pytest.fixture(scope="module")
def randomised(digits) -> dict[str, RandomisationResult]:
    model, x = digits
    explainers = {
        "FullGrad": FullGrad(model),
        "IG": _IG(model),
        "Grad-CAM": GradCAM(model),
        "Gradient": Gradient(model),
    }
    return {name: randomisation_check(explainer, x[:40], seed=0) for name, explainer in explainers.items()}


def test_fullgrad_maps_change_when_the_weights_are_randomised(randomised) -> None:
    finals = {
        name: (round(r.stage_means()[-1], 4), int(r.summary()["n_nan"])) for name, r in randomised.items()
    }
    print("\nfinal-stage Spearman (mean, n_nan):", finals)
    assert finals["FullGrad"][0] < 0.9


def test_ig_fails_its_randomisation_criterion_by_a_margin(randomised) -> None:
    """The pre-registered criterion (final-stage mean < 0.9) failed for IG: observed 0.912-0.914.

    A strict xfail on ``< 0.9`` sat on the noise (another thread count or torch build can land on
    either side), so the outcome is asserted with margins instead: IG's fully randomised maps keep a
    rank correlation far above 0.8 with the originals, while FullGrad's drop to about 0.33. A change
    that made IG pass the criterion clearly (below 0.8) or FullGrad fail it fails this test.
    """
    ig = randomised["IG"].stage_means()[-1]
    fullgrad = randomised["FullGrad"].stage_means()[-1]
    assert ig > 0.8, ig
    assert ig - fullgrad > 0.3, (ig, fullgrad)


def test_ig_ranks_stay_tied_to_the_input(digits, randomised) -> None:
    _, x = digits
    ink = x[:40].abs().sum(1)
    result = randomised["IG"]
    original_vs_ink = float(spearman(result.original, ink).mean())
    randomised_vs_ink = float(spearman(result.randomised[-1], ink).mean())
    print(f"\nIG vs |x|: original {original_vs_ink:.3f}, fully randomised {randomised_vs_ink:.3f}")
    assert randomised_vs_ink > 0.8


def test_fullgrad_is_complete_on_digits(digits) -> None:
    model, x = digits
    result = completeness(FullGrad(model), x)
    print("\nFullGrad completeness:", result.summary())
    assert float(result.relative_error.max()) < 1e-4

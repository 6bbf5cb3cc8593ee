"""Faithfulness metrics on the digits CNN: deletion curves and the randomisation check (docs/img/).

.venv/bin/python examples/evaluate_digits.py            # about 20 s on 2 cores
"""

from __future__ import annotations

from pathlib import Path

import torch

from bbdecoder.attribution.fullgrad import FullGrad
from bbdecoder.attribution.gradcam import GradCAM
from bbdecoder.attribution.gradient import Gradient
from bbdecoder.attribution.integrated_gradients import IntegratedGradients
from bbdecoder.demo.digits import load_digits_data, train_digits_cnn
from bbdecoder.metrics import deletion, insertion, randomisation_check
from bbdecoder.viz.metric_plots import plot_perturbation_curves, plot_randomisation

IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


def main() -> None:
    torch.set_num_threads(2)
    data = load_digits_data()
    model, accuracy = train_digits_cnn(data, epochs=4)
    x = data.x_test[:120]
    explainers = {
        "FullGrad": FullGrad(model),
        "IG": IntegratedGradients(model),
        "Grad-CAM": GradCAM(model),
        "Gradient": Gradient(model),
    }
    print(f"digits CNN test accuracy {accuracy:.3f}; {len(x)} test images, 1 pixel per step\n")
    deletions = {name: deletion(model, x, e, step=1) for name, e in explainers.items()}
    deletions["random"] = deletion(model, x, torch.ones(len(x), 1, 8, 8), order="random", step=1)
    insertions = {name: insertion(model, x, e, step=1) for name, e in explainers.items()}
    print("| map | deletion AUC (lower is better) | insertion AUC, blur (higher is better) |")
    print("|---|---|---|")
    for name, result in deletions.items():
        ins = f"{float(insertions[name].auc.mean()):.3f}" if name in insertions else "-"
        print(f"| {name} | {float(result.auc.mean()):.3f} | {ins} |")
    randomised = {name: randomisation_check(e, x[:40], seed=0) for name, e in explainers.items()}
    print("\n| map | Spearman after each stage (output layer first) | NaN (constant maps) |")
    print("|---|---|---|")
    for name, result in randomised.items():
        stages = ", ".join(f"{m:.2f}" for m in result.stage_means())
        print(f"| {name} | {stages} | {int(torch.isnan(result.spearman).sum())} |")
    IMG.mkdir(parents=True, exist_ok=True)
    plot_perturbation_curves(deletions, IMG / "digits_deletion.png")
    plot_randomisation(randomised, IMG / "digits_randomisation.png")
    print(f"\nfigures written to {IMG}")


if __name__ == "__main__":
    main()

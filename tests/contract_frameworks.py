"""What the method contract test needs from a framework: models of the zoo, inputs, a snapshot of state.

``tests/test_method_contract.py`` runs every registered method over every zoo model of every framework
in :data:`ADAPTERS` whose name is in the method's registry ``frameworks``. To add a framework, write an
adapter with the same attributes and methods as :class:`TorchAdapter` (its ``build`` reading that
framework's zoo, e.g. ``tests/zoo_keras.py``) and add it to :data:`ADAPTERS`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bbdecoder.hooks import count_hooks

from . import zoo


class TorchAdapter:
    """PyTorch: ``tests/zoo.py``'s models in float64."""

    name = "torch"
    cnn_models: tuple[str, ...] = tuple(zoo.ZOO)
    vit_models: tuple[str, ...] = tuple(zoo.VIT_ZOO)
    input_shape: tuple[int, int, int] = zoo.INPUT_SHAPE  # (C, H, W)
    num_classes = zoo.NUM_CLASSES

    def build(self, name: str, seed: int = 0) -> Any:
        """The zoo model in float64, with mixed modes and a frozen parameter (so restoring is tested)."""
        model = {**zoo.ZOO, **zoo.VIT_ZOO}[name](seed, float64=True)
        model.train()
        first = next(iter(model.children()))
        first.eval()
        next(model.parameters()).requires_grad_(False)
        return model

    def inputs(self, n: int, seed: int = 0) -> torch.Tensor:
        return zoo.zoo_input(n, seed, float64=True)

    def rows(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return x[start:stop]

    def map_shape(self, n: int) -> tuple[int, ...]:
        """The shape of a method's map of ``n`` inputs: ``(N, 1, H, W)``."""
        _, h, w = self.input_shape
        return (n, 1, h, w)

    def check_layer_map(self, shape: tuple[int, ...], n: int) -> None:
        """A CAM's ``layer_map`` / a rollout's patch grid: ``(N, 1, h, w)`` with h <= H, w <= W."""
        _, h, w = self.input_shape
        assert len(shape) == 4 and shape[:2] == (n, 1) and shape[2] <= h and shape[3] <= w, shape

    def patch_mask(self, patch: int = 4) -> torch.Tensor:
        """Integer feature ids ``(1, 1, H, W)``: one feature per ``patch x patch`` square."""
        _, h, w = self.input_shape
        rows = torch.arange(h).div(patch, rounding_mode="floor").view(-1, 1)
        cols = torch.arange(w).div(patch, rounding_mode="floor").view(1, -1)
        return (rows * -(-w // patch) + cols).view(1, 1, h, w)

    def to_numpy(self, value: Any) -> np.ndarray:
        return value.detach().cpu().numpy()  # type: ignore[no-any-return]

    def snapshot(self, model: Any) -> dict[str, Any]:
        return {
            "hooks": count_hooks(model),
            "modes": [(name, m.training) for name, m in model.named_modules()],
            "requires_grad": [(name, p.requires_grad) for name, p in model.named_parameters()],
            "grads": [(name, p.grad is None) for name, p in model.named_parameters()],
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "modules": [(name, type(m)) for name, m in model.named_modules()],
        }

    def assert_untouched(self, model: Any, before: dict[str, Any]) -> None:
        after = self.snapshot(model)
        assert after["hooks"] == before["hooks"] == 0, "a hook was left on the model"
        assert after["modules"] == before["modules"], "a module was replaced"
        assert after["modes"] == before["modes"], "train/eval modes not restored"
        assert after["requires_grad"] == before["requires_grad"], "requires_grad not restored"
        assert after["grads"] == before["grads"], "parameter .grad touched"
        assert after["state"].keys() == before["state"].keys(), "state_dict keys changed"
        for key, value in before["state"].items():
            assert torch.equal(after["state"][key], value), f"state_dict[{key!r}] changed"


ADAPTERS: dict[str, Any] = {"torch": TorchAdapter()}


class KerasAdapter:
    """Keras: the twins of ``tests/zoo_keras.py`` (PyTorch weights copied) in float64, channels last."""

    name = "keras"
    cnn_models: tuple[str, ...] = tuple(zoo.ZOO)
    vit_models: tuple[str, ...] = ()
    input_shape: tuple[int, int, int] = zoo.INPUT_SHAPE  # (C, H, W) of the PyTorch twin
    num_classes = zoo.NUM_CLASSES

    def build(self, name: str, seed: int = 0) -> Any:
        from . import zoo_keras

        return zoo_keras.twin(name, zoo.ZOO[name](seed, float64=True), float64=True)

    def inputs(self, n: int, seed: int = 0) -> np.ndarray:
        from . import zoo_keras

        return zoo_keras.nhwc(zoo.zoo_input(n, seed, float64=True))

    def rows(self, x: np.ndarray, start: int, stop: int) -> np.ndarray:
        return x[start:stop]

    def map_shape(self, n: int) -> tuple[int, ...]:
        """``(N, H, W, 1)``: channels last."""
        _, h, w = self.input_shape
        return (n, h, w, 1)

    def check_layer_map(self, shape: tuple[int, ...], n: int) -> None:
        _, h, w = self.input_shape
        assert len(shape) == 4 and shape[0] == n and shape[3] == 1 and shape[1] <= h and shape[2] <= w, shape

    def patch_mask(self, patch: int = 4) -> np.ndarray:
        """Feature ids ``(1, H, W, 1)``, the PyTorch adapter's mask channels last."""
        return np.ascontiguousarray(TorchAdapter().patch_mask(patch).permute(0, 2, 3, 1).numpy())

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)

    def snapshot(self, model: Any) -> dict[str, Any]:
        from bbdecoder.keras.layers import all_layers

        layers = all_layers(model)
        return {
            "layers": [(layer.name, type(layer)) for layer in layers],
            "shadowed": [layer.name for layer in layers if "call" in vars(layer)],
            "activations": [(layer.name, vars(layer).get("activation")) for layer in layers],
            "trainable": [(layer.name, layer.trainable) for layer in layers],
            "weights": [(w.path, np.array(w.numpy())) for w in model.weights],
        }

    def assert_untouched(self, model: Any, before: dict[str, Any]) -> None:
        after = self.snapshot(model)
        assert after["shadowed"] == before["shadowed"] == [], "a layer's call was left intercepted"
        assert after["layers"] == before["layers"], "a layer was replaced"
        assert after["activations"] == before["activations"], "a layer's activation was not restored"
        assert after["trainable"] == before["trainable"], "trainable flags changed"
        assert [p for p, _ in after["weights"]] == [p for p, _ in before["weights"]], "weights changed"
        for (path, value), (_, old) in zip(after["weights"], before["weights"], strict=True):
            assert np.array_equal(value, old), f"weight {path} changed"


def _keras_adapter() -> dict[str, Any]:
    try:
        import tensorflow  # noqa: F401
    except ImportError:  # the Keras port is optional
        return {}
    return {"keras": KerasAdapter()}


ADAPTERS.update(_keras_adapter())

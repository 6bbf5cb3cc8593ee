"""Process-wide settings for the test suite, applied before any test module imports TensorFlow."""

import os

import pytest

# TensorFlow 2.21's oneDNN gradient of a 1x1 stride-2 convolution corrupts the heap on odd float32
# batches (reproduced with a bare tf.nn.conv2d; see docs/keras.md). A crash there would take the
# whole pytest process down at random, so the suite runs TensorFlow's reference kernels.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


@pytest.fixture(params=["fused", "numpy"])
def cpu_passes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test with the monitor's CPU passes in the fused C kernels, then in NumPy."""
    from bbdecoder.monitor import cpu_reductions

    if request.param == "numpy":
        monkeypatch.setattr(cpu_reductions, "FUSED", None)
    elif not cpu_reductions.fused_kernels():
        pytest.skip("the fused kernels are not built here (no C compiler at install)")
    return str(request.param)

"""Process-wide settings for the test suite, applied before any test module imports TensorFlow."""

import os
from collections.abc import Iterator

import pytest

# TensorFlow 2.21's oneDNN gradient of a 1x1 stride-2 convolution corrupts the heap on odd float32
# batches (reproduced with a bare tf.nn.conv2d; see docs/keras.md). A crash there would take the
# whole pytest process down at random, so the suite runs TensorFlow's reference kernels.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


@pytest.fixture(params=["fused", "fused-threads", "numpy"])
def cpu_passes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Runs a test with the monitor's CPU passes in the fused C kernels on one of torch's threads,
    on two, then in NumPy; gives "fused" or "numpy"."""
    import torch

    from bbdecoder.monitor import cpu_reductions

    if request.param == "numpy":
        monkeypatch.setattr(cpu_reductions, "FUSED", None)
        yield "numpy"
        return
    if not cpu_reductions.fused_kernels():
        pytest.skip("the fused kernels are not built here (no C compiler at install)")
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if request.param == "fused-threads" else 1)
    try:
        yield "fused"
    finally:
        torch.set_num_threads(threads)

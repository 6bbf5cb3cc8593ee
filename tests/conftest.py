"""Process-wide settings for the test suite, applied before any test module imports TensorFlow."""

import os

# TensorFlow 2.21's oneDNN gradient of a 1x1 stride-2 convolution corrupts the heap on odd float32
# batches (reproduced with a bare tf.nn.conv2d; see docs/keras.md). A crash there would take the
# whole pytest process down at random, so the suite runs TensorFlow's reference kernels.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

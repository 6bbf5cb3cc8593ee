"""TensorFlow stays optional: `import bbdecoder` never imports it, and `bbdecoder.keras` without it
fails with the install command."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_importing_bbdecoder_does_not_import_tensorflow() -> None:
    result = _run("import sys, bbdecoder; print('tensorflow' in sys.modules, 'keras' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_bbdecoder_keras_without_tensorflow_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['tensorflow'] = None\n"
        "try:\n    import bbdecoder.keras\nexcept ImportError as error:\n    print(error)\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert "pip install bbdecoder[tensorflow]" in result.stdout

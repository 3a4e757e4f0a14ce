"""The README's quickstart runs offline on a clean machine and writes its images."""

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_writes_images(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path / "out")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "chat:" in result.stdout
    generated = Image.open(tmp_path / "out" / "generated.png")
    edited = Image.open(tmp_path / "out" / "edited.png")
    assert generated.size == (256, 256) and generated.mode == "RGB"
    # Editing keeps the VAE-resized size of its input (256 -> 512 by the reference's minimum side).
    assert edited.size == (512, 512)
    assert len(generated.getcolors(maxcolors=1 << 24)) > 1  # a real picture, not a constant

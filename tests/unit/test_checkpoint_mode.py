"""A saved checkpoint gets the file mode that open() would give it, not mkstemp's private 0600."""

import os
import stat
from pathlib import Path

from models import create_model, save_checkpoint


def test_saved_checkpoint_mode_follows_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = tmp_path / "m.safetensors"
        save_checkpoint(create_model("resnet20", num_classes=2), path, class_names=["a", "b"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644

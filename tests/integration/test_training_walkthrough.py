"""docs/training.md's walkthrough, run as written: own folders → fine-tune → serve → audit → evaluate → export.

The commands are read from the doc (the ``bash`` blocks between the walkthrough markers) and run in
one bash script, in a folder holding a tiny synthetic ``data/flowers``. Only what cannot run here is
changed, and each change must find its text, so the doc cannot drift from what is tested: torchvision
weights are random (no download), one epoch instead of 30, a free port instead of 8000, and the
service is started in the background and waited for instead of left running in another terminal.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.integration.live_stack import free_port

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "training.md"
CLASSES = {"daisy": (250, 250, 250), "rose": (200, 20, 40), "tulip": (240, 200, 20)}


def draw(path: Path, colour: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A 200×150 photo-like JPEG: a coloured disc on a noisy green ground; returns the disc's box."""
    ground = rng.normal((60, 120, 50), 20, (150, 200, 3)).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(ground)
    r = int(rng.integers(20, 40))
    x, y = int(rng.integers(r, 200 - r)), int(rng.integers(r, 150 - r))
    ImageDraw.Draw(image).ellipse((x - r, y - r, x + r, y + r), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=90)
    return x - r, y - r, x + r + 1, y + r + 1


def make_folders(work: Path) -> None:
    """``data/flowers/{train,val}/<class>``, boxes for val, and a flat ``data/new_photos``."""
    rng = np.random.default_rng(0)
    rows = ["image,x0,y0,x1,y1"]
    for name, colour in CLASSES.items():
        for i in range(4):
            draw(work / "data/flowers/train" / name / f"{i}.jpg", colour, rng)
        for i in range(2):
            box = draw(work / "data/flowers/val" / name / f"{i}.jpg", colour, rng)
            rows.append(f"{name}/{i}.jpg," + ",".join(map(str, box)))
        if name != "rose":
            draw(work / "data/new_photos" / name / "0.jpg", colour, rng)
    (work / "data/flowers/val_boxes.csv").write_text("\n".join(rows) + "\n")


def walkthrough_blocks() -> list[str]:
    text = DOC.read_text()
    section = text[text.index("<!-- walkthrough: begin -->"):text.index("<!-- walkthrough: end -->")]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def substitute(script: str, old: str, new: str) -> str:
    assert old in script, f"docs/training.md no longer has {old!r}: update this test with the doc"
    return script.replace(old, new)


def runnable(blocks: list[str], port: int) -> str:
    script = "\n".join(blocks)
    script = substitute(script, "weights='IMAGENET1K_V1'", "weights=None")
    script = substitute(script, "--epochs 30", "--epochs 1")
    script = substitute(script, "127.0.0.1:8000", f"127.0.0.1:{port}")
    serve = next(line for line in script.splitlines() if line.startswith("python -m service "))
    background = (f"{serve} --port {port} > service.log 2>&1 &\nSERVICE_PID=$!\ntrap 'kill $SERVICE_PID' EXIT\n"
                  f"for _ in $(seq 1 300); do curl -sf http://127.0.0.1:{port}/readyz > /dev/null && break; "
                  f"sleep 1; done\ncurl -sf http://127.0.0.1:{port}/readyz > /dev/null")
    return "set -euo pipefail\n" + substitute(script, serve, background)



@pytest.mark.slow
@pytest.mark.e2e
def test_the_documented_walkthrough_runs_as_written(tmp_path):
    make_folders(tmp_path)
    script = runnable(walkthrough_blocks(), free_port())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "MACULA_COMPILE": "off", "OMP_NUM_THREADS": "2"}
    process = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
    (tmp_path / "walkthrough.log").write_text(output)
    log = (tmp_path / "service.log").read_text() if (tmp_path / "service.log").exists() else ""
    assert process.returncode == 0, output[-6000:] + "\n--- service.log ---\n" + log[-3000:]

    run = tmp_path / "runs/flowers"
    assert {"model.safetensors", "curves.png", "attention.png", "metrics.json", "confusion.png"} <= \
        {p.name for p in run.iterdir()}
    assert "images: train 12 (daisy 4, rose 4, tulip 4); val 6 (daisy 2, rose 2, tulip 2)" in output
    assert "param group backbone " in output and "lr head" in output
    answer = json.loads((tmp_path / "answer.json").read_text())
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["id"] == answer["id"] and record["model"]["name"] == "flowers"
    assert [m["module"] for m in record["images"][0]["attention"]][0] == "layer1.0.cbam"
    assert "on imagefolder:data/flowers val, 6 images" in output and "confusion (rows: true" in output
    assert "on imagefolder:data/new_photos all, 2 images" in output
    assert "(6 images with boxes)" in output and "layer4.1.cbam" in output
    assert (tmp_path / "flowers.onnx").is_file()
    last = output.strip().splitlines()[-1]  # the onnxruntime snippet: class, first mask names, mask shape
    assert last.split()[0] in CLASSES and "['layer1.0.cbam', 'layer1.1.cbam'] (1, 1, 40, 40)" in last

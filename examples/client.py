"""Classify an image with a running Macula service and show where the model looked.

    .venv/bin/python examples/client.py examples/digit-7.png --out digit-7-attention.png

Prints the prediction's id and its top-k labels with their scores, then writes the last attention module's
mask (the one nearest the classifier) over the input image as a PNG. Needs httpx, numpy, Pillow and
matplotlib, which ``make install`` installs.
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

import httpx
import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageOps


def classify(image: Path, url: str, model: str | None, top_k: int, api_key: str | None) -> dict:
    """POST the file as multipart to the predict route, asking for the attention masks; the JSON answer."""
    route = f"/v1/models/{model}/predict" if model else "/v1/predict"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.post(url + route, params={"top_k": top_k, "attention": "true"}, headers=headers,
                              files={"file": (image.name, image.read_bytes())}, timeout=60)
    except httpx.HTTPError as exc:
        raise SystemExit(f"cannot reach {url}: {exc}") from exc
    if response.is_error:  # the service answers {"detail", "code"}
        raise SystemExit(f"{response.status_code} {response.text}")
    return response.json()


def overlay(image: Image.Image, mask_png: str, input_box: list[int] | None = None, alpha: float = 0.5) -> Image.Image:
    """The mask (8-bit, at its module's resolution) in the 'jet' colormap, stretched over ``input_box``.

    The mask covers what the model saw, the prediction's ``input_box`` ([x0, y0, x1, y1) in the image's pixels):
    the whole image for a model that stretches its input (the demo model does), the centre crop for one that
    crops. Outside the box the image is left as it is: the model saw nothing there.
    """
    scale = max(1, 384 // max(image.size))  # enlarge small inputs (the 48x48 canvases) so they can be seen
    x0, y0, x1, y1 = (v * scale for v in (input_box or (0, 0, image.width, image.height)))
    image = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    mask = Image.open(io.BytesIO(base64.b64decode(mask_png))).resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR)
    heat = Image.fromarray((colormaps["jet"](np.asarray(mask) / 255.0)[..., :3] * 255).astype(np.uint8))
    out = image.copy()
    out.paste(Image.blend(image.crop((x0, y0, x1, y1)), heat, alpha), (x0, y0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Classify an image with a Macula service; draw its attention.")
    parser.add_argument("image", type=Path, help="a PNG, JPEG or WebP file")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the service (default: %(default)s)")
    parser.add_argument("--model", help="a served model's name (default: the service's default model)")
    parser.add_argument("--top-k", type=int, default=3, help="how many classes to print (default: %(default)s)")
    parser.add_argument("--api-key", help="the service's MACULA_API_KEY, if it has one")
    parser.add_argument("--out", type=Path, help="where to write the overlay (default: IMAGE-attention.png here)")
    args = parser.parse_args()

    answer = classify(args.image, args.url.rstrip("/"), args.model, args.top_k, args.api_key)
    (prediction,) = answer["predictions"]
    print(f"prediction {answer['id']} by {answer['model']['name']} (version {answer['model']['version']})")
    for entry in prediction["top_k"]:
        print(f"  {entry['label']:>12}  {entry['score']:.4f}")
    if "familiar" in prediction:  # models whose checkpoint carries an unfamiliar-input detector
        verdict = "yes" if prediction["familiar"] else "NO: unlike the training data, do not trust the label"
        print(f"  familiar: {verdict} (familiarity {prediction['familiarity']:.3f})")
    if not prediction.get("attention"):
        print("this model has no attention modules: no overlay")
        return
    last = prediction["attention"][-1]
    out = args.out or Path(f"{args.image.stem}-attention.png")
    overlay(ImageOps.exif_transpose(Image.open(args.image)), last["png"], prediction.get("input_box")).save(out)
    print(f"attention of {last['module']} ({last['height']}x{last['width']}) over the image: {out}")


if __name__ == "__main__":
    main()

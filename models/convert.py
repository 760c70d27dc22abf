"""``python -m models.convert``: turn ResNet weights trained elsewhere into a servable Macula checkpoint.

    python -m models.convert --from official|timm|torchvision SRC --arch NAME --attention cbam|bam|none
                             [--classes imagenet|FILE] --out model_store/NAME.safetensors

Every source keeps torchvision's keys for the backbone (``conv1``, ``bn1``, ``layerK.i.*``, ``fc``), so
only the attention modules are renamed:

* ``official``: the BAM/CBAM authors' released checkpoints (a ``.pth.tar`` dict whose ``state_dict``
  keys carry ``module.``). CBAM: ``cbam.ChannelGate.mlp.{1,3}`` → ``cbam.channel_gate.mlp.{0,2}``,
  ``cbam.SpatialGate.spatial.{conv,bn}`` → ``cbam.spatial_gate.{conv,bn}``. BAM loads into
  ``bam_variant="official"``: ``bamK.channel_att.gate_c.*`` → ``bamK.channel_gate.mlp.*`` and
  ``bamK.spatial_att.gate_s.*`` → ``bamK.spatial_gate.body.*`` (see ``OFFICIAL_RENAMES``).
* ``timm``: ``block_args=dict(attn_layer="cbam")`` ResNets. ``se.channel.fc{1,2}`` (1×1 convs without
  bias) → ``cbam.channel_gate.mlp.{0,2}`` (Linear, zero bias); ``se.spatial.conv.{conv,bn}`` →
  ``cbam.spatial_gate.{conv,bn}``, the conv's two input channels swapped (timm pools [mean, max],
  Macula [max, mean] like the authors).
* ``torchvision``: a plain ResNet state dict fills the backbone; attention modules keep their
  initialisation (a starting point for fine-tuning, as ``--init-from`` is for training).

Files are read by :mod:`models.weights` (safetensors, or ``torch.load(weights_only=True)``). A source
that does not fit the requested architecture is refused with the missing and unexpected keys.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import Preprocessing, save_checkpoint
from .registry import create_model
from .resnet import IMAGENET_DEPTHS
from .weights import Weights, WeightsError, read_weights

SOURCES = ("official", "timm", "torchvision")
ATTENTIONS = ("cbam", "bam", "none")
SHOWN_KEYS = 8  # keys listed per kind in a mismatch message

OFFICIAL_RENAMES: tuple[tuple[str, str], ...] = (
    (".cbam.ChannelGate.mlp.1.", ".cbam.channel_gate.mlp.0."),
    (".cbam.ChannelGate.mlp.3.", ".cbam.channel_gate.mlp.2."),
    (".cbam.SpatialGate.spatial.conv.", ".cbam.spatial_gate.conv."),
    (".cbam.SpatialGate.spatial.bn.", ".cbam.spatial_gate.bn."),
    (".channel_att.gate_c.gate_c_fc_0.", ".channel_gate.mlp.0."),
    (".channel_att.gate_c.gate_c_bn_1.", ".channel_gate.mlp.1."),
    (".channel_att.gate_c.gate_c_fc_final.", ".channel_gate.mlp.3."),
    (".spatial_att.gate_s.gate_s_conv_reduce0.", ".spatial_gate.body.0."),
    (".spatial_att.gate_s.gate_s_bn_reduce0.", ".spatial_gate.body.1."),
    (".spatial_att.gate_s.gate_s_conv_di_0.", ".spatial_gate.body.3."),
    (".spatial_att.gate_s.gate_s_bn_di_0.", ".spatial_gate.body.4."),
    (".spatial_att.gate_s.gate_s_conv_di_1.", ".spatial_gate.body.6."),
    (".spatial_att.gate_s.gate_s_bn_di_1.", ".spatial_gate.body.7."),
    (".spatial_att.gate_s.gate_s_conv_final.", ".spatial_gate.body.9."),
)
TIMM_RENAMES: tuple[tuple[str, str], ...] = (
    (".se.channel.fc1.", ".cbam.channel_gate.mlp.0."),
    (".se.channel.fc2.", ".cbam.channel_gate.mlp.2."),
    (".se.spatial.conv.conv.", ".cbam.spatial_gate.conv."),
    (".se.spatial.conv.bn.", ".cbam.spatial_gate.bn."),
)


class ConvertError(ValueError):
    """The source cannot become the requested checkpoint; the message says why."""


# ------------------------------------------------------------------------------------------ key maps


def rename_key(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        key = key.replace(old, new)
    return key


def rename(state: dict[str, torch.Tensor], renames: tuple[tuple[str, str], ...]) -> dict[str, torch.Tensor]:
    return {rename_key(k, renames): v for k, v in state.items()}


def from_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The authors' keys → Macula's; tensors unchanged (their modules compute what ours do)."""
    return rename(state, OFFICIAL_RENAMES)


def from_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's CBAM keys → Macula's: 1×1 convs become Linear (zero bias), spatial inputs swapped."""
    out = rename(state, TIMM_RENAMES)
    for key in [k for k in out if ".cbam.channel_gate.mlp." in k and k.endswith(".weight")]:
        out[key] = out[key].flatten(1)  # (out, in, 1, 1) → (out, in)
        out.setdefault(key[: -len("weight")] + "bias", torch.zeros(out[key].shape[0], dtype=out[key].dtype))
    for key in [k for k in out if k.endswith(".cbam.spatial_gate.conv.weight")]:
        out[key] = out[key].flip(1)  # input channels [mean, max] → [max, mean]
    return out


def from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(state)


KEY_MAPS: dict[str, Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]] = {
    "official": from_official, "timm": from_timm, "torchvision": from_torchvision}
RENAMES = {"official": OFFICIAL_RENAMES, "timm": TIMM_RENAMES, "torchvision": ()}


def is_attention_key(key: str) -> bool:
    return ".cbam." in key or key.startswith("bam")


def attention_in(keys: set[str]) -> str:
    """Which attention a (renamed) state dict carries: ``cbam``, ``bam`` or ``none``."""
    if any(".cbam." in k for k in keys):
        return "cbam"
    return "bam" if any(k.startswith("bam") for k in keys) else "none"


# --------------------------------------------------------------------------------------------- fitting


def num_classes_of(state: dict[str, torch.Tensor], src: str) -> int:
    head = state.get("fc.weight")
    if head is None or head.dim() != 2:
        raise ConvertError(f"{src}: no classifier 'fc.weight' (N, features) among its tensors; "
                           f"is it a ResNet state dict?")
    return int(head.shape[0])


class KeyMismatch(ConvertError):
    """The renamed source and the model disagree on keys or shapes."""

    def __init__(self, missing: list[str], unexpected: list[str], wrong: list[str]) -> None:
        super().__init__(f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong shapes")
        self.missing, self.unexpected, self.wrong = missing, unexpected, wrong

    def describe(self, src: str, what: str, file_key: dict[str, str]) -> str:
        """The message; ``file_key`` maps a renamed key back to the file's own name for it."""
        unexpected = sorted(file_key[k] for k in self.unexpected if k in file_key)  # not the zero biases we added

        def listing(label: str, keys: list[str]) -> str:
            more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
            return f"\n  {label} ({len(keys)}): {', '.join(keys[:SHOWN_KEYS])}{more}" if keys else ""

        return (f"{src} does not fit {what}:"
                + listing("missing keys (the model has them, the file does not)", self.missing)
                + listing("unexpected keys (the file has them, the model does not)", unexpected)
                + listing("wrong shapes (file vs model)", self.wrong))


def fit_state(model: nn.Module, state: dict[str, torch.Tensor], *, attention_at_init: bool = False
              ) -> dict[str, torch.Tensor]:
    """``model``'s state dict with every tensor taken from ``state``; :class:`KeyMismatch` if they differ.

    ``attention_at_init``: attention tensors that ``state`` lacks keep the model's initialisation. A
    missing BatchNorm ``num_batches_tracked`` (files older than PyTorch 0.4.1) keeps the model's, as
    ``load_state_dict`` does.
    """
    own = model.state_dict()
    fill = {k for k in own if k.endswith("num_batches_tracked") or (attention_at_init and is_attention_key(k))}
    missing = sorted(set(own) - set(state) - fill)
    unexpected = sorted(set(state) - set(own))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise KeyMismatch(missing, unexpected, wrong)
    return {k: state[k].to(v.dtype) if k in state else v for k, v in own.items()}


def layout_of(keys: set[str]) -> str | None:
    """Whose attention keys these are (before renaming): ``official``, ``timm`` or ``None``."""
    if any(".ChannelGate." in k or ".channel_att." in k for k in keys):
        return "official"
    return "timm" if any(".se.channel." in k or ".se.spatial." in k for k in keys) else None


def hint(raw: dict[str, torch.Tensor], renamed: dict[str, torch.Tensor], source: str, attention: str) -> str:
    """Suggest the --from or --attention that the file's keys point to, if either differs from the request."""
    layout = layout_of(set(raw))
    if layout is not None and layout != source:
        return f"\n  its attention keys are laid out like --from {layout}"
    found = attention_in(set(renamed))
    if found == attention or (source == "torchvision" and found == "none"):  # a plain backbone fits any attention
        return ""
    return f"\n  the file carries attention={found}: try --attention {found}"


# ------------------------------------------------------------------------------------------ class names


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, from torchvision's weight metadata (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def class_names_for(spec: str | None, num_classes: int) -> list[str]:
    """``imagenet``, a text file with one name per line, or (``None``) ImageNet's for 1000 classes, else indices."""
    if spec is None:
        names = imagenet_class_names() if num_classes == 1000 else [str(i) for i in range(num_classes)]
    elif spec == "imagenet":
        names = imagenet_class_names()
    else:
        try:
            names = [line.strip() for line in Path(spec).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ConvertError(f"--classes {spec}: cannot read it as a text file ({exc})") from exc
    if len(names) != num_classes:
        raise ConvertError(f"--classes {spec or 'default'}: {len(names)} class names for a classifier with "
                           f"{num_classes} outputs")
    return names


# ----------------------------------------------------------------------------------------------- convert


@dataclass(frozen=True)
class Converted:
    path: Path
    version: str
    num_classes: int


def convert(source: str, src: str | os.PathLike, *, arch: str, attention: str, out: str | os.PathLike,
            classes: str | None = None, preprocessing: Preprocessing | None = None) -> Converted:
    """Read ``src`` (laid out as ``source``), check it fits ``arch`` + ``attention``, write ``out``."""
    if source not in SOURCES:
        raise ConvertError(f"--from must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "timm" and attention == "bam":
        raise ConvertError("timm has no BAM ResNets: use --attention cbam or none with --from timm")
    try:
        weights = read_weights(src)
    except WeightsError as exc:
        raise ConvertError(str(exc)) from exc
    state = KEY_MAPS[source](weights.state_dict)
    num_classes = num_classes_of(state, str(src))
    variant = "official" if source == "official" and attention == "bam" else "paper"
    model = build(arch, attention, variant, num_classes)
    try:
        state = fit_state(model, state, attention_at_init=source == "torchvision")
    except KeyMismatch as exc:
        what = f"{arch} + attention={attention}" + (" (the authors' BAM layout)" if variant == "official" else "")
        file_key = {rename_key(k, RENAMES[source]): k for k in weights.state_dict}
        advice = hint(weights.state_dict, state, source, attention)
        raise ConvertError(exc.describe(str(src), what, file_key) + advice) from exc
    model.load_state_dict(state, strict=True)
    names = class_names_for(classes, num_classes)
    version = save_checkpoint(model, out, class_names=names, preprocessing=preprocessing or Preprocessing(),
                              training=summary(source, Path(src), weights))
    return Converted(Path(out), version, num_classes)


def build(arch: str, attention: str, bam_variant: str, num_classes: int) -> nn.Module:
    if arch not in IMAGENET_DEPTHS:
        raise ConvertError(f"--arch must be one of {', '.join(IMAGENET_DEPTHS)} (ImageNet ResNets), got {arch!r}")
    if attention not in ATTENTIONS:
        raise ConvertError(f"--attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    with torch.random.fork_rng(devices=[]):  # the same source always gives the same tensors
        torch.manual_seed(0)
        return create_model(arch, attention=None if attention == "none" else attention, num_classes=num_classes,
                            bam_variant=bam_variant)


def summary(source: str, src: Path, weights: Weights) -> dict[str, Any]:
    """The checkpoint's ``training`` entry: where the weights came from, and what their file said."""
    with src.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"imported_from": source, "source_file": src.name, "source_sha256": digest,
            **{f"source_{k}": v for k, v in weights.info.items()}}


# ------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models.convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", nargs=2, metavar=("FORMAT", "SRC"), required=True,
                        help="official | timm | torchvision, then the weights file")
    parser.add_argument("--arch", required=True, choices=list(IMAGENET_DEPTHS))
    parser.add_argument("--attention", required=True, choices=ATTENTIONS)
    parser.add_argument("--classes", help="imagenet, or a text file with one class name per line "
                                          "(default: imagenet for 1000 outputs, else 0..N-1)")
    parser.add_argument("--out", required=True, help="the Macula checkpoint to write (*.safetensors)")
    args = parser.parse_args(argv)
    if args.source[0] not in SOURCES:
        parser.error(f"--from: FORMAT must be one of {', '.join(SOURCES)}, got {args.source[0]!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    (source, src) = args.source
    try:
        done = convert(source, src, arch=args.arch, attention=args.attention, classes=args.classes, out=args.out)
    except ConvertError as exc:
        print(f"models.convert: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {done.path} (version {done.version}, {done.num_classes} classes): "
          f"serve it with python -m service --model-dir {done.path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

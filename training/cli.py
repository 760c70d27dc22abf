"""``python -m training``: train a BAM/CBAM ResNet and write a servable checkpoint.

    python -m training --arch resnet20 --attention cbam --dataset cluttered-mnist --epochs 15 --out runs/demo
    torchrun --nproc_per_node 2 -m training ...            # DDP: gloo on CPU, nccl on GPU
    python -m training --resume runs/demo --epochs 30      # continue (optionally for longer)

Options left out keep their defaults; with ``--resume`` they keep the values the run was started
with, and only options given again are changed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from models import CheckpointError, list_models

from . import distributed
from .config import AUGMENTS, RESIZE_MODES, ConfigError, TrainConfig
from .data import DATASET_NAMES, DatasetError
from .pretrained import InitFromError
from .trainer import Trainer, load_last

USER_ERRORS = (DatasetError, InitFromError, CheckpointError, ConfigError, FileNotFoundError)


def normalisation(text: str) -> tuple[float, ...] | str:
    """``auto`` or comma-separated numbers, one per channel (``0.5`` or ``0.485,0.456,0.406``)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or comma-separated numbers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0],
                                argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", choices=list_models(), metavar="NAME",
                   help=f"network: {', '.join(list_models())}; default {d.arch}")
    p.add_argument("--attention", type=lambda s: None if s.lower() == "none" else s,
                   help=f"none, bam or cbam; default {d.attention}")
    p.add_argument("--bam-variant", choices=["paper", "official"], help="BAM channel-gate layout")
    p.add_argument("--init", choices=["macula", "official"], help="starting weights: Macula's rule or the "
                   f"BAM/CBAM authors' (docs/training.md); default {d.init}")
    p.add_argument("--zero-init-residual", action="store_true", help="start each residual block as its "
                   "shortcut (last BN weight 0, as torchvision's option)")
    p.add_argument("--dataset", help=f"one of {', '.join(DATASET_NAMES)}; default {d.dataset}")
    p.add_argument("--out", help=f"output folder; default {d.out}")
    p.add_argument("--resume", metavar="OUT", help="continue the run saved in OUT (OUT/last)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    opt.add_argument("--batch-size", type=int, help=f"per process; default {d.batch_size}")
    opt.add_argument("--lr", type=float, help=f"peak learning rate; default {d.lr}")
    opt.add_argument("--momentum", type=float, help=f"default {d.momentum}")
    opt.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    opt.add_argument("--schedule", choices=["cosine", "step"], help=f"default {d.schedule}")
    opt.add_argument("--warmup-epochs", type=float, help="linear warmup length (fractions allowed); default 0")
    opt.add_argument("--label-smoothing", type=float, help="default 0")
    opt.add_argument("--clip-grad", type=float, help="clip the gradient norm to this; default off")
    opt.add_argument("--init-from", metavar="torchvision:PATH", help="start the backbone from a torchvision "
                     "ResNet state dict file")
    opt.add_argument("--backbone-lr-scale", type=float, help="lr multiplier for tensors loaded by --init-from")
    opt.add_argument("--patience", type=int, metavar="EPOCHS",
                     help="stop after this many epochs without a better validation accuracy; default off")
    speed = p.add_argument_group("speed and reproducibility")
    speed.add_argument("--amp", choices=["none", "fp16", "bf16"], help="mixed precision; default none")
    speed.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    speed.add_argument("--workers", type=int, help=f"data loader processes; default {d.workers}")
    speed.add_argument("--device", help="cpu, cuda, cuda:1 ...; default cuda:LOCAL_RANK if available")
    speed.add_argument("--seed", type=int, help=f"default {d.seed}")
    speed.add_argument("--log-interval", type=int, help="batches between log lines off a terminal")
    speed.add_argument("--no-calibration", dest="calibrate", action="store_false", help="skip fitting the "
                       "temperature and unfamiliar-input detector at the end (training.calibration)")
    data = p.add_argument_group("data")
    data.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    data.add_argument("--limit-train", type=int, help="use only this many training images (tiny runs)")
    data.add_argument("--limit-val", type=int, help="use only this many validation/test images")
    data.add_argument("--image-size", type=int, help=f"imagefolder input size; default {d.image_size}")
    data.add_argument("--resize-mode", choices=RESIZE_MODES,
                      help="imagefolder: center_crop (shorter side to size x 256/224, centre crop; default) or "
                           "stretch (the whole image, squeezed to size x size)")
    data.add_argument("--augment", choices=AUGMENTS,
                      help="training augmentation; default standard (imagefolder, CIFAR), none (digits)")
    data.add_argument("--mean", type=normalisation, metavar="auto|M[,M,M]",
                      help="normalisation mean per channel, or auto (measured on the training split); "
                           "default: the dataset's (ImageNet's for imagefolder)")
    data.add_argument("--std", type=normalisation, metavar="auto|S[,S,S]", help="as --mean, for the std")
    data.add_argument("--canvas-size", type=int, help=f"cluttered-mnist canvas side; default {d.canvas_size}")
    data.add_argument("--clutter", type=int, help=f"cluttered-mnist fragments per canvas; default {d.clutter}")
    return p


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict | None]:
    """A fresh config from the given flags, or the saved one (flags given again override it) to resume."""
    given = vars(args)
    resume_dir = given.pop("resume", None)
    if resume_dir is None:
        return TrainConfig(**given), None
    state = load_last(resume_dir)
    saved = {**state["config"], **given, "out": given.get("out", resume_dir)}
    return TrainConfig.from_dict(saved), state


def user_message(exc: BaseException) -> str:
    """The exception's own message, without the traceback a DataLoader worker wraps around it."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    info = distributed.DistInfo()
    try:
        config, state = config_from_args(args)
        config.validate()
        info = distributed.setup(config.device)
        logging.basicConfig(level=logging.INFO if info.is_main else logging.WARNING,
                            format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
        Trainer(config, info, resume=state).fit()
    except USER_ERRORS as exc:
        print(f"error: {user_message(exc)}", file=sys.stderr)
        return 2
    finally:
        distributed.teardown(info)
    return 0

"""python -m training.evaluate on users' folders: which split, folders without train/, confusion, boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models import Preprocessing, create_model, save_checkpoint
from tests.conftest import make_checkpoint
from training.boxes import input_box, read_boxes
from training.data import DatasetError
from training.evaluate import confusion_lines, main
from training.folders import evaluation_folder

CLASSES = ["class_0", "class_1", "class_2"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """resnet20 + CBAM, 3 classes, RGB 32×32 stretch, random weights."""
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "three.safetensors", num_classes=3, color="RGB")


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """resnet20, classes "0".."9", grayscale 28×28 stretch like mnist5k, random weights."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "digits.safetensors"
    pre = Preprocessing(input_size=(28, 28), resize_mode="stretch", resize_size=28, mean=(0.13,), std=(0.31,),
                        color="L")
    save_checkpoint(create_model("resnet20", attention="cbam", num_classes=10, in_chans=1), path,
                    class_names=[str(d) for d in range(10)], preprocessing=pre, training={"dataset": "mnist5k"})
    return path


def write_split(root: Path, classes=CLASSES, per_class: int = 2, size=(48, 36)) -> Path:
    rng = np.random.default_rng(1)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def report_of(capsys, *args: str) -> dict:
    assert main([*args, "--json", "-"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_folder_with_only_val_or_test_or_only_class_folders_is_scored(tmp_path, checkpoint, capsys):
    write_split(tmp_path / "only_val" / "val")
    report = report_of(capsys, str(checkpoint), "--dataset", f"imagefolder:{tmp_path / 'only_val'}")
    assert report["split"] == "val" and report["images"] == 6
    write_split(tmp_path / "both" / "val")
    write_split(tmp_path / "both" / "test", per_class=1)
    assert report_of(capsys, str(checkpoint), "--dataset", f"imagefolder:{tmp_path / 'both'}")["images"] == 3
    flat = write_split(tmp_path / "flat", per_class=3)
    report = report_of(capsys, str(checkpoint), "--dataset", f"imagefolder:{flat}")
    assert report["split"] == "all" and report["images"] == 9


def test_split_is_honoured_or_refused(tmp_path, checkpoint, capsys):
    write_split(tmp_path / "data" / "val", per_class=1)
    write_split(tmp_path / "data" / "test", per_class=2)
    spec = f"imagefolder:{tmp_path / 'data'}"
    assert report_of(capsys, str(checkpoint), "--dataset", spec, "--split", "val")["images"] == 3
    assert report_of(capsys, str(checkpoint), "--dataset", spec, "--split", "test")["images"] == 6
    assert main([str(checkpoint), "--dataset", spec, "--split", "train"]) == 2
    assert "no train/ folder to score (it has val/, test/)" in capsys.readouterr().err
    write_split(tmp_path / "flat")
    assert main([str(checkpoint), "--dataset", f"imagefolder:{tmp_path / 'flat'}", "--split", "test"]) == 2
    assert "flat folder of class folders" in capsys.readouterr().err


def test_mnist_test_split_is_scored_when_asked(digits_checkpoint, capsys):
    common = [str(digits_checkpoint), "--limit", "8"]
    assert report_of(capsys, *common)["split"] == "test"
    assert report_of(capsys, *common, "--split", "val")["split"] == "val"


def test_evaluation_folders_are_labelled_by_the_checkpoint_classes(tmp_path):
    root = write_split(tmp_path / "some", classes=["class_2"])  # only one of the three classes
    split, folder = evaluation_folder(str(root), None, CLASSES, transform=None)
    assert split == "all" and folder.classes == CLASSES and {label for _, label in folder.samples} == {2}
    write_split(tmp_path / "extra", classes=["class_0", "zebra"])
    with pytest.raises(DatasetError, match="zebra are not classes of the model"):
        evaluation_folder(str(tmp_path / "extra"), None, CLASSES, transform=None)
    (tmp_path / "only_train" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match="--split train"):
        evaluation_folder(str(tmp_path / "only_train"), None, CLASSES, transform=None)


def test_confusion_matrix_is_reported_printed_and_drawn(tmp_path, checkpoint, capsys):
    root = write_split(tmp_path / "flat", classes=["class_0", "class_2"], per_class=3)
    png = tmp_path / "confusion.png"
    report = report_of(capsys, str(checkpoint), "--dataset", f"imagefolder:{root}", "--confusion-png", str(png))
    matrix = np.array(report["confusion"]["matrix"])
    assert report["confusion"]["labels"] == CLASSES and matrix.shape == (3, 3)
    assert matrix.sum(1).tolist() == [3, 0, 3]  # rows: true classes
    assert report["top1"] == pytest.approx(np.trace(matrix) / 6)
    assert report["per_class"]["class_1"] is None
    assert report["per_class"]["class_0"] == pytest.approx(matrix[0, 0] / 3)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(checkpoint), "--dataset", f"imagefolder:{root}"]) == 0
    text = capsys.readouterr().out
    assert "confusion (rows: true, columns: predicted)" in text and "class_1 -" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("class_2 ") and "-" not in line)
    assert [int(v) for v in row.split()[1:]] == matrix[2].tolist()


def test_many_classes_print_the_most_frequent_confusions():
    labels = [f"c{i}" for i in range(30)]
    matrix = [[0] * 30 for _ in range(30)]
    matrix[3][7], matrix[5][5], matrix[1][2] = 9, 50, 4
    lines = confusion_lines(labels, matrix)
    assert lines[1:] == ["    c3 -> c7: 9", "    c1 -> c2: 4"]


# -------------------------------------------------------------------------------------- boxes


def box_mask_after_transform(pre: Preprocessing, size: tuple[int, int], box: tuple[int, int, int, int]):
    """Where a white box on a black image lands after the eval transform (the bounding box of bright pixels)."""
    image = np.zeros((size[1], size[0], 3), np.uint8)
    image[box[1]:box[3], box[0]:box[2]] = 255
    tensor = pre.eval_transform()(Image.fromarray(image))[0]
    ys, xs = torch.nonzero(tensor > 0.5, as_tuple=True)
    return (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)


@pytest.mark.parametrize("mode", ["center_crop", "stretch"])
@pytest.mark.parametrize(("size", "box"), [((640, 427), (300, 100, 420, 260)), ((300, 500), (20, 200, 120, 330)),
                                           ((97, 61), (10, 10, 40, 50))])
def test_input_box_follows_the_eval_transform(mode, size, box):
    pre = Preprocessing(input_size=(64, 64), resize_mode=mode, resize_size=73, mean=(0.0,) * 3, std=(1.0,) * 3)
    seen = box_mask_after_transform(pre, size, box)
    mapped = input_box(box, size, pre)
    assert mapped is not None and all(abs(a - b) <= 1 for a, b in zip(mapped, seen, strict=True)), (mapped, seen)


def test_a_box_outside_the_centre_crop_is_none():
    pre = Preprocessing(input_size=(64, 64), resize_mode="center_crop", resize_size=73)
    assert input_box((600, 10, 639, 400), (640, 427), pre) is None  # right edge: cropped away
    assert input_box((600, 10, 639, 400), (640, 427), Preprocessing(input_size=(64, 64), resize_mode="stretch",
                                                                    resize_size=64)) is not None


def test_boxes_file_errors_name_the_line(tmp_path):
    path = tmp_path / "boxes.csv"
    path.write_text("image,x0,y0,x1,y1\ncat/1.png,1,2,30,40\ncat/2.png,5,5,1,9\n")
    with pytest.raises(DatasetError, match=r"boxes.csv:3: need x0 < x1"):
        read_boxes(path)
    path.write_text("file,left,top\n")
    with pytest.raises(DatasetError, match="header must be image,x0,y0,x1,y1"):
        read_boxes(path)
    path.write_text("image,x0,y0,x1,y1\ncat/1.png,1,2,30,40\n")
    assert read_boxes(path) == {"cat/1.png": (1.0, 2.0, 30.0, 40.0)}


def test_localisation_on_a_folder_with_boxes(tmp_path, checkpoint, digits_checkpoint, capsys):
    root = write_split(tmp_path / "flat", per_class=2, size=(64, 32))
    lines = ["image,x0,y0,x1,y1", "class_0/0.png,8,4,40,28", "class_1/1.png,0,0,64,32", "class_2/0.png,50,0,64,10",
             "class_2/9.png,1,1,5,5"]  # the last one is not in the folder
    (tmp_path / "boxes.csv").write_text("\n".join(lines) + "\n")
    report = report_of(capsys, str(checkpoint), "--dataset", f"imagefolder:{root}", "--boxes",
                       str(tmp_path / "boxes.csv"))
    assert report["boxed_images"] == 3 and report["boxes_outside_input"] == 0  # stretch: nothing is cropped
    assert list(report["localisation"]) == [f"layer{s}.{b}.cbam" for s in (1, 2, 3) for b in range(3)]
    # 32x32 input: boxes 16x24, the whole image, 7x10 (x 50..64 -> 25..32, y 0..10 -> 0..10)
    assert report["box_share"] == pytest.approx((16 * 24 + 32 * 32 + 7 * 10) / 3 / 1024)
    assert all(0.0 <= v <= 1.0 for v in [*report["localisation"].values(), *report["pointing"].values()])
    assert main([str(digits_checkpoint), "--boxes", str(tmp_path / "boxes.csv")]) == 2
    assert "--boxes is for imagefolder" in capsys.readouterr().err

"""``python -m models.convert``: what it writes (servable, ImageNet names, preprocessing) and how it refuses."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from models import Preprocessing, load_checkpoint
from models.convert import main


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tv") / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def run(capsys, *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_writes_a_servable_imagenet_checkpoint(torchvision_file, tmp_path, capsys):
    out = tmp_path / "model_store" / "resnet18.safetensors"
    code, stdout, _ = run(capsys, "--from", "torchvision", torchvision_file, "--arch", "resnet18",
                          "--attention", "cbam", "--classes", "imagenet", "--out", out)
    assert code == 0
    model, meta = load_checkpoint(out)
    assert meta.version in stdout and str(out.parent) in stdout
    assert model.config["attention"] == "cbam" and meta.num_classes == 1000
    assert (meta.class_names[0], meta.class_names[999]) == ("tench", "toilet tissue")
    assert meta.preprocessing == Preprocessing()  # ImageNet: shorter side 256, centre crop 224, ImageNet mean/std
    assert meta.preprocessing.input_size == (224, 224) and meta.preprocessing.resize_size == 256
    assert meta.training["imported_from"] == "torchvision"
    assert meta.training["source_sha256"] == hashlib.sha256(torchvision_file.read_bytes()).hexdigest()


def test_the_same_source_gives_the_same_tensors(torchvision_file, tmp_path, capsys):
    """Attention modules start from a fixed seed (the file's bytes still differ: safetensors orders metadata freely)."""
    states = []
    for name in ("a", "b"):
        assert run(capsys, "--from", "torchvision", torchvision_file, "--arch", "resnet18", "--attention", "bam",
                   "--out", tmp_path / f"{name}.safetensors")[0] == 0
        states.append(load_checkpoint(tmp_path / f"{name}.safetensors")[0].state_dict())
    assert all(torch.equal(value, states[1][key]) for key, value in states[0].items())


def test_classes_file_names_the_outputs(tmp_path, capsys):
    torch.manual_seed(0)
    src = tmp_path / "birds.safetensors"
    save_file(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), str(src))
    (tmp_path / "classes.txt").write_text("sparrow\nblue tit\nrobin\n\n")
    out = tmp_path / "birds-macula.safetensors"
    assert run(capsys, "--from", "torchvision", src, "--arch", "resnet18", "--attention", "none",
               "--classes", tmp_path / "classes.txt", "--out", out)[0] == 0
    assert load_checkpoint(out)[1].class_names == ["sparrow", "blue tit", "robin"]
    (tmp_path / "two.txt").write_text("a\nb\n")
    code, _, err = run(capsys, "--from", "torchvision", src, "--arch", "resnet18", "--attention", "none",
                       "--classes", tmp_path / "two.txt", "--out", tmp_path / "bad.safetensors")
    assert code == 2 and "2 class names for a classifier with 3 outputs" in err
    assert not (tmp_path / "bad.safetensors").exists()


def test_wrong_depth_lists_the_missing_keys(torchvision_file, tmp_path, capsys):
    code, _, err = run(capsys, "--from", "torchvision", torchvision_file, "--arch", "resnet34", "--attention", "none",
                       "--out", tmp_path / "x.safetensors")
    assert code == 2
    assert "does not fit resnet34 + attention=none" in err
    assert "missing keys (the model has them, the file does not) (80): layer1.2.bn1.bias" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_wrong_attention_lists_the_unexpected_keys_and_suggests_the_right_one(tmp_path, capsys):
    torch.manual_seed(0)
    src = tmp_path / "timm.safetensors"
    save_file(timm.create_model("resnet18", block_args=dict(attn_layer="cbam")).state_dict(), str(src))
    code, _, err = run(capsys, "--from", "timm", src, "--arch", "resnet18", "--attention", "none",
                       "--out", tmp_path / "x.safetensors")
    assert code == 2
    assert "unexpected keys (the file has them, the model does not) (64): layer1.0.se.channel.fc1.weight" in err
    assert "try --attention cbam" in err
    code, _, err = run(capsys, "--from", "official", src, "--arch", "resnet18", "--attention", "cbam",
                       "--out", tmp_path / "x.safetensors")
    assert code == 2 and "laid out like --from timm" in err


class Payload:
    """Unpickling this would create a file: a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_refused_and_never_runs(tmp_path, capsys):
    marker, src = tmp_path / "ran", tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}, "hook": Payload(marker)}, src)
    with pytest.raises(pickle.UnpicklingError):  # the file does carry the payload
        torch.load(src, weights_only=True)
    code, _, err = run(capsys, "--from", "official", src, "--arch", "resnet18", "--attention", "cbam",
                       "--out", tmp_path / "x.safetensors")
    assert code == 2 and "not a weights-only torch file" in err
    assert not marker.exists()


def test_unreadable_sources_are_clear_errors(tmp_path, capsys):
    code, _, err = run(capsys, "--from", "timm", tmp_path / "absent.safetensors", "--arch", "resnet50",
                       "--attention", "cbam", "--out", tmp_path / "x.safetensors")
    assert code == 2 and "no such file" in err
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    code, _, err = run(capsys, "--from", "timm", tmp_path / "junk.safetensors", "--arch", "resnet50",
                       "--attention", "cbam", "--out", tmp_path / "x.safetensors")
    assert code == 2 and "not a readable safetensors file" in err
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, str(tmp_path / "headless.safetensors"))
    code, _, err = run(capsys, "--from", "torchvision", tmp_path / "headless.safetensors", "--arch", "resnet50",
                       "--attention", "none", "--out", tmp_path / "x.safetensors")
    assert code == 2 and "no classifier 'fc.weight'" in err
    code, _, err = run(capsys, "--from", "timm", tmp_path / "headless.safetensors", "--arch", "resnet50",
                       "--attention", "bam", "--out", tmp_path / "x.safetensors")
    assert code == 2 and "timm has no BAM" in err


@pytest.mark.parametrize("bad", [["--from", "caffe", "x.pth", "--arch", "resnet18"],  # unknown source
                                 ["--from", "timm", "x.pth", "--arch", "resnet20"]])  # a CIFAR ResNet
def test_usage_errors_exit_2(tmp_path, bad):
    with pytest.raises(SystemExit) as exc:
        main([*bad, "--attention", "cbam", "--out", str(tmp_path / "x.safetensors")])
    assert exc.value.code == 2

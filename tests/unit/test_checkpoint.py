"""The safetensors checkpoint: round trip, version, and a clear CheckpointError for each bad file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models import CheckpointError, Preprocessing, create_model, load_checkpoint, save_checkpoint
from tests.conftest import make_checkpoint


def read_raw(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def rewrite(src: Path, dst: Path, *, metadata: dict | None = None, tensors: dict | None = None) -> Path:
    raw_meta, raw_tensors = read_raw(src)
    save_file(tensors if tensors is not None else raw_tensors, str(dst), metadata={**raw_meta, **(metadata or {})})
    return dst


@pytest.mark.parametrize(("attention", "variant"), [(None, "paper"), ("cbam", "paper"), ("bam", "paper"),
                                                    ("bam", "official")])
def test_round_trip(tmp_path: Path, attention: str | None, variant: str) -> None:
    torch.manual_seed(1)
    model = create_model("resnet20", attention=attention, bam_variant=variant, num_classes=4, in_chans=1)
    model.train()
    with torch.no_grad():  # move BN statistics away from their defaults
        model(torch.randn(8, 1, 32, 32))
    model.eval()
    pre = Preprocessing(input_size=(32, 32), resize_mode="stretch", resize_size=32, mean=(0.1,), std=(0.3,),
                        color="L")
    path = tmp_path / "m.safetensors"
    version = save_checkpoint(model, path, class_names=["a", "b", "c", "d"], preprocessing=pre,
                              training={"epochs": 3, "val_acc": 0.5}, note="hello")
    assert version == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    assert meta.version == version
    assert meta.arch == model.config and meta.num_classes == 4
    assert meta.class_names == ["a", "b", "c", "d"]
    assert meta.preprocessing == pre
    assert meta.training == {"epochs": 3, "val_acc": 0.5}
    assert meta.extra == {"note": "hello"}
    x = torch.randn(3, 1, 32, 32)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))
        _, maps = loaded.forward_with_attention(x)
    assert len(maps) == {None: 0, "cbam": 9, "bam": 2}[attention]


def test_fixtures_load(gray_checkpoint: Path, rgb_checkpoint: Path) -> None:
    model, meta = load_checkpoint(gray_checkpoint)
    assert meta.arch["attention"] == "cbam" and meta.preprocessing.color == "L"
    model, meta = load_checkpoint(rgb_checkpoint)
    assert meta.arch["attention"] == "bam" and meta.num_classes == 5


def test_no_pickle_in_file(gray_checkpoint: Path) -> None:
    meta, tensors = read_raw(gray_checkpoint)
    assert meta["format"] == "macula.checkpoint"
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())


def test_save_refuses_wrong_class_names(tmp_path: Path) -> None:
    model = create_model("resnet20", num_classes=3)
    with pytest.raises(CheckpointError, match="2 class names for a model with 3 classes"):
        save_checkpoint(model, tmp_path / "x.safetensors", class_names=["a", "b"])
    assert not (tmp_path / "x.safetensors").exists()


def test_save_refuses_model_without_config(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="create_model"):
        save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x.safetensors", class_names=["a", "b"])


# ------------------------------------------------------------------------------------------ bad files


def test_truncated_file(tmp_path: Path) -> None:
    good = make_checkpoint(tmp_path / "good.safetensors")
    data = good.read_bytes()
    for cut in (len(data) // 2, 20, 5):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"cut\d+\.safetensors: not a readable safetensors file"):
            load_checkpoint(bad)


def test_pickle_file_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    torch.save(create_model("resnet20", num_classes=10).state_dict(), bad)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(bad)


def test_tensors_do_not_match_metadata(tmp_path: Path) -> None:
    good = make_checkpoint(tmp_path / "good.safetensors", attention="cbam")
    # metadata says "no attention", tensors carry CBAM weights
    arch = json.loads(read_raw(good)[0]["arch"]) | {"attention": None}
    bad = rewrite(good, tmp_path / "bad.safetensors", metadata={"arch": json.dumps(arch)})
    with pytest.raises(CheckpointError, match=r"tensors do not match .*unexpected \['layer1\.0\.cbam"):
        load_checkpoint(bad)
    # a tensor missing
    _, tensors = read_raw(good)
    del tensors["fc.bias"]
    bad = rewrite(good, tmp_path / "missing.safetensors", tensors=tensors)
    with pytest.raises(CheckpointError, match=r"tensors do not match .*missing \['fc\.bias'\]"):
        load_checkpoint(bad)


def test_wrong_class_count(tmp_path: Path) -> None:
    good = make_checkpoint(tmp_path / "good.safetensors", num_classes=10)
    # metadata num_classes disagrees with the fc tensors
    arch = json.loads(read_raw(good)[0]["arch"]) | {"num_classes": 12}
    names = json.dumps([str(i) for i in range(12)])
    bad = rewrite(good, tmp_path / "classes.safetensors", metadata={"arch": json.dumps(arch), "class_names": names})
    with pytest.raises(CheckpointError, match=r"wrong shapes \['fc\.weight: file \(10, 64\) vs model \(12, 64\)"):
        load_checkpoint(bad)
    # class names disagree with num_classes
    bad = rewrite(good, tmp_path / "names.safetensors", metadata={"class_names": json.dumps(["a", "b"])})
    with pytest.raises(CheckpointError, match="lists 2 class names but num_classes=10"):
        load_checkpoint(bad)


def test_unknown_arch(tmp_path: Path) -> None:
    good = make_checkpoint(tmp_path / "good.safetensors")
    arch = json.loads(read_raw(good)[0]["arch"]) | {"name": "resnet9000"}
    bad = rewrite(good, tmp_path / "arch.safetensors", metadata={"arch": json.dumps(arch)})
    with pytest.raises(CheckpointError, match="unknown architecture 'resnet9000'"):
        load_checkpoint(bad)


def test_not_a_macula_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad))
    with pytest.raises(CheckpointError, match="not a Macula checkpoint"):
        load_checkpoint(bad)
    good = make_checkpoint(tmp_path / "good.safetensors")
    bad = rewrite(good, tmp_path / "meta.safetensors", metadata={"arch": "{not json"})
    with pytest.raises(CheckpointError, match="malformed metadata"):
        load_checkpoint(bad)


def test_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path)  # a directory


def test_atomic_save_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_checkpoint(tmp_path / "m.safetensors")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("models.checkpoint.save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint(create_model("resnet20", num_classes=10), path, class_names=[str(i) for i in range(10)])
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]

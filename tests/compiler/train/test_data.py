import re

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from yoloprune.compiler.train.data import (
    DataError,
    YoloDataset,
    _hsv_jitter,
    collate,
    label_path,
    letterbox,
    read_data_yaml,
)
from yoloprune.compiler.train.synthetic import SyntheticSpec, generate, render


def write_image(path, size=(64, 48), color=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_labels(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def messy(tmp_path):
    """One image of each kind of trouble val.py reports."""
    images = tmp_path / "images" / "val"
    good, missing, empty = images / "good.png", images / "missing.png", images / "empty.png"
    for p in (good, missing, empty):
        write_image(p)
    write_labels(label_path(good), "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n")
    write_labels(label_path(empty), "")
    bad_coords, bad_class, bad_cols = images / "coords.png", images / "cls.png", images / "cols.png"
    for p in (bad_coords, bad_class, bad_cols):
        write_image(p)
    write_labels(label_path(bad_coords), "0 1.5 0.5 0.2 0.2\n")
    write_labels(label_path(bad_class), "7 0.5 0.5 0.2 0.2\n")
    write_labels(label_path(bad_cols), "0 0.5 0.5\n")
    nan, latin = images / "nan.png", images / "latin.png"
    for p in (nan, latin):
        write_image(p)
    write_labels(label_path(nan), "0 nan 0.5 0.2 0.2\n")
    label_path(latin).write_bytes("0 0.5 0.5 0.2 0.2 \xe9\n".encode("latin-1"))
    corrupt = images / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    write_labels(label_path(corrupt), "0 0.5 0.5 0.2 0.2\n")
    data = {"path": str(tmp_path), "val": "images/val", "names": ["a", "b"]}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    return tmp_path


def test_bad_samples_are_counted_not_fatal(messy):
    config = read_data_yaml(messy / "data.yaml")
    dataset = YoloDataset(config.val, config.nc, 64)
    counts = dataset.check.counts
    assert (counts["found"], counts["missing"], counts["empty"]) == (2, 1, 1)
    assert counts["corrupt"] == 6 and counts["duplicates"] == 1
    assert sorted(p.name for p in dataset.files) == ["empty.png", "good.png", "missing.png"]
    messages = "\n".join(dataset.check.messages)
    for name, why in [
        ("coords.txt", "outside [0, 1]"),
        ("cls.txt", "class ids"),
        ("cols.txt", "5 columns"),
        ("corrupt.png", "corrupt image"),
        ("nan.txt", "non-finite values"),
        ("latin.txt", "not UTF-8 text"),
    ]:
        assert name in messages and why in messages
    good = dataset.labels[[p.name for p in dataset.files].index("good.png")]
    assert len(good) == 2  # the duplicate row was removed


def test_data_yaml_errors(tmp_path):
    with pytest.raises(DataError, match="data YAML not found"):
        read_data_yaml(tmp_path / "nope.yaml")
    (tmp_path / "d.yaml").write_text("names: [a]\n")
    with pytest.raises(DataError, match="needs 'val' and 'names'"):
        read_data_yaml(tmp_path / "d.yaml")
    (tmp_path / "d.yaml").write_text("names: {0: a, x: b}\nval: .\n")  # mixed key types
    with pytest.raises(DataError, match="'names' as a mapping must be keyed 0, 1"):
        read_data_yaml(tmp_path / "d.yaml")
    (tmp_path / "val").mkdir()
    (tmp_path / "d.yaml").write_text("names: [a]\nval: val\ntrain: [val, gone/images]\n")
    missing = tmp_path / "gone" / "images"
    message = f"d.yaml: 'train' names {missing}, which does not exist; fix it in this data YAML"
    with pytest.raises(DataError, match=re.escape(message)):  # the YAML named, and the source
        read_data_yaml(tmp_path / "d.yaml")


def test_letterbox_geometry_and_label_mapping(tmp_path):
    image = tmp_path / "images" / "x.png"
    write_image(image, size=(100, 50))  # w=100, h=50 -> scaled 64x32, padded 16 top and bottom
    write_labels(label_path(image), "0 0.5 0.5 0.2 0.4\n")
    dataset = YoloDataset((tmp_path / "images",), 1, 64)
    tensor, labels, meta = dataset[0]
    assert tensor.shape == (3, 64, 64) and meta["ratio"] == 0.64 and meta["pad"] == (0, 16)
    assert torch.allclose(labels, torch.tensor([[0, 0.5, 0.5, 0.2, 0.2]]))
    assert tensor[:, 0, 0].tolist() == pytest.approx([114 / 255] * 3)  # padding colour
    boxed, ratio, pad = letterbox(np.zeros((50, 100, 3), np.uint8), 64)
    assert boxed.shape == (64, 64, 3) and ratio == 0.64 and pad == (0, 16)


def test_collate_indexes_targets_by_image(messy):
    config = read_data_yaml(messy / "data.yaml")
    dataset = YoloDataset(config.val, config.nc, 64)
    images, targets, metas = collate([dataset[i] for i in range(len(dataset))])
    assert images.shape == (3, 3, 64, 64) and len(metas) == 3
    good = [m["file"].endswith("good.png") for m in metas].index(True)
    assert (targets[:, 0] == good).sum() == 2 and targets.shape[1] == 6


def test_augmentation_keeps_boxes_on_their_objects(tmp_path):
    path = generate(tmp_path / "syn", SyntheticSpec(train=6, val=2, imgsz=128), progress=False)
    config = read_data_yaml(path)
    plain = YoloDataset(config.train, config.nc, 128)
    augmented = YoloDataset(config.train, config.nc, 128, augment=True, seed=3)
    for i in range(len(plain)):
        image, labels, _ = augmented[i]
        assert image.shape == (3, 128, 128)
        assert ((labels[:, 1:] >= 0) & (labels[:, 1:] <= 1)).all()
        assert len(labels) <= len(plain[i][1])
    # deterministic per (seed, epoch, index)
    assert torch.equal(augmented[0][0], augmented[0][0])


def test_synthetic_is_deterministic_and_labelled(tmp_path):
    spec = SyntheticSpec(train=4, val=2, imgsz=96, seed=5)
    a_img, a_lab = render(spec, "train", 3)
    b_img, b_lab = render(spec, "train", 3)
    assert np.array_equal(a_img, b_img) and a_lab == b_lab
    c_img, _ = render(SyntheticSpec(train=4, val=2, imgsz=96, seed=6), "train", 3)
    assert not np.array_equal(a_img, c_img)
    path = generate(tmp_path / "syn", spec, progress=False)
    config = read_data_yaml(path)
    assert config.names[:3] == ("circle", "rectangle", "triangle")
    dataset = YoloDataset(config.train, config.nc, 96)
    assert len(dataset) == 4 and dataset.check.counts["corrupt"] == 0
    assert sum(len(lb) for lb in dataset.labels) > 0


def test_synthetic_files_are_the_same_from_worker_processes(tmp_path, monkeypatch):
    """With workers, large splits are written by spawned processes; every file is byte for byte
    the one a serial run writes, and the pool really ran."""
    from yoloprune.compiler.train import synthetic

    monkeypatch.setattr(synthetic, "PARALLEL_FROM", 4)
    pools = []
    real_pool = synthetic.ProcessPoolExecutor

    def counted_pool(*args, **kwargs):
        pools.append(args)
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(synthetic, "ProcessPoolExecutor", counted_pool)
    spec = SyntheticSpec(train=40, val=2, imgsz=48, seed=3)
    serial = generate(tmp_path / "serial", spec, progress=False).parent
    assert pools == []
    parallel = generate(tmp_path / "parallel", spec, progress=False, workers=2).parent
    assert pools == [(2,)]  # the train split; val (2 images) stays in this process

    def files(root):
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())

    assert files(serial) == files(parallel) and len(files(serial)) == 2 * 42 + 1
    for name in files(serial):
        if name.name != "data.yaml":  # it names its own folder
            assert (serial / name).read_bytes() == (parallel / name).read_bytes(), name
    image, _ = render(spec, "train", 39)
    assert np.array_equal(np.asarray(Image.open(parallel / "images/train/000039.png")), image)


def test_hsv_jitter_tables_give_the_per_pixel_float_arithmetic_exactly():
    def per_pixel(hsv, gains):  # the form before the lookup tables
        hsv = hsv.astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] * gains[0]) % 256
        hsv[..., 1:] = np.clip(hsv[..., 1:] * gains[1:], 0, 255)
        return hsv.astype(np.uint8)

    every_level = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1).reshape(16, 16, 3)
    rng = np.random.default_rng(0)
    for _ in range(500):
        gains = rng.uniform(-1, 1, 3) * (0.015, 0.7, 0.4) + 1
        assert np.array_equal(_hsv_jitter(every_level, gains), per_pixel(every_level, gains))


def test_generate_replaces_only_an_earlier_dataset_and_never_a_foreign_folder(tmp_path, capsys):
    """An earlier dataset is replaced; a folder holding anything else, or a file, is refused
    with one line and left exactly as it was."""
    from yoloprune.compiler.cli import main

    spec = SyntheticSpec(train=2, val=1, imgsz=64)
    root = tmp_path / "set"
    generate(root, spec, progress=False)
    again = generate(root, SyntheticSpec(train=3, val=1, imgsz=64), progress=False)
    assert len(list((again.parent / "images" / "train").iterdir())) == 3  # replaced
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "notes.txt").write_text("mine")
    (precious / "sub" / "a.txt").write_text("mine too")
    afile = tmp_path / "afile.txt"
    afile.write_text("a file")
    for out, message in ((precious, "holds files that are not an earlier"), (afile, "is a file")):
        assert main(["data", "--out", str(out), "--train", "2", "--val", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and str(out) in err
    assert (precious / "notes.txt").read_text() == "mine"
    assert (precious / "sub" / "a.txt").read_text() == "mine too" and afile.read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile.txt", "precious", "set"]
    assert main(["data", "--out", str(tmp_path / "x"), "--seed", "-1"]) == 2

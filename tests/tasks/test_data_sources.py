"""Data without Python: image folders (with or without split folders) and .npz arrays."""
import numpy as np
import pytest
import torch
from PIL import Image

from automl.errors import ConfigError
from automl.tasks.data import LoaderTask, data_task, parse_data
from automl.validate import Where

WHERE = Where("space.yaml", "data")


def images(root, classes=3, per_class=10, size=(12, 10), mode="RGB"):
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            shape = (size[0], size[1], 3) if mode == "RGB" else size
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def task_of(data):
    return data_task(parse_data(data, WHERE))


def test_class_folders_split_by_fraction_stratified_and_resized(tmp_path):
    images(tmp_path, classes=3, per_class=10)
    task = task_of({"path": str(tmp_path), "input_size": [8, 8], "val_fraction": 0.2, "test_fraction": 0.2,
                    "mean": 0.5, "std": 0.25})
    sizes = {s: len(task.datasets[s]) for s in ("train", "val", "test")}
    assert sizes == {"train": 18, "val": 6, "test": 6}
    assert task.num_classes == 3 and task.input_shape == (3, 8, 8)
    labels = [int(task.datasets["val"][i][1]) for i in range(6)]
    assert sorted(labels) == [0, 0, 1, 1, 2, 2]
    x, _ = task.datasets["train"][0]
    assert x.shape == (3, 8, 8) and x.min() >= -2.0 - 1e-6 and x.max() <= 2.0 + 1e-6  # (x - 0.5) / 0.25
    files = {s: set(task.datasets[s].files) for s in ("train", "val", "test")}
    assert not (files["train"] & files["val"]) and not (files["val"] & files["test"])
    batch = next(iter(task.train_loader(batch_size=4, seed=0)))
    assert batch[0].shape == (4, 3, 8, 8) and batch[1].dtype == torch.long


def test_split_folders_are_used_as_they_are_and_test_defaults_to_val(tmp_path):
    images(tmp_path / "train", classes=2, per_class=6, mode="L")
    images(tmp_path / "val", classes=2, per_class=3, mode="L")
    task = task_of({"path": str(tmp_path), "channels": 1})
    assert len(task.datasets["train"]) == 12 and len(task.datasets["val"]) == 6
    assert task.datasets["test"] is task.datasets["val"]
    assert task.input_shape == (1, 12, 10)  # the first image's size


def test_npz_arrays_with_and_without_splits(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8), np.repeat(np.arange(5), 10)
    np.savez(tmp_path / "a.npz", x=x, y=y)
    task = task_of({"path": str(tmp_path / "a.npz"), "layout": "nhwc", "val_fraction": 0.2})
    assert task.input_shape == (3, 8, 8) and task.num_classes == 5
    assert len(task.splits["train"][0]) == 40 and len(task.splits["val"][0]) == 10
    assert float(task.splits["train"][0].max()) <= 1.0  # uint8 scaled to [0, 1]
    np.savez(tmp_path / "b.npz", x_train=rng.normal(size=(20, 6)).astype(np.float32), y_train=np.arange(20) % 2,
             x_val=rng.normal(size=(4, 6)).astype(np.float32), y_val=np.array([0, 1, 0, 1]))
    task = task_of({"path": str(tmp_path / "b.npz")})
    assert len(task.splits["train"][0]) == 20 and len(task.splits["val"][0]) == 4
    assert torch.equal(task.splits["test"][0], task.splits["val"][0])


@pytest.mark.parametrize("setup, data, words", [
    (None, {"path": "nowhere"}, "data not found"),
    ("one_class", {}, "at least two class folders"),
    ("object_npz", {}, "without unpickling"),
    ("bad_keys_npz", {}, "needs arrays x and y"),
    ("float_labels_npz", {}, "labels must be a 1-D array"),
    ("folder", {"val_fraction": 0}, "no validation split"),
    ("folder", {"mean": [0.1, 0.2]}, "one value or one per channel"),
    ("folder", {"input_size": [0, 3]}, "input_size is"),
    ("folder", {"colour": 3}, "unknown key"),
])
def test_bad_data_is_one_paragraph_naming_the_key(tmp_path, setup, data, words):
    path = tmp_path / "d"
    if setup == "one_class":
        images(path, classes=1)
    elif setup == "folder":
        images(path, classes=2, per_class=4)
    elif setup and setup.endswith("npz"):
        path = tmp_path / "d.npz"
        arrays = {"object_npz": {"x": np.array([{"a": 1}], dtype=object), "y": np.array([0])},
                  "bad_keys_npz": {"inputs": np.zeros((2, 3))},
                  "float_labels_npz": {"x": np.zeros((4, 3)), "y": np.array([0.5, 1, 0, 1])}}[setup]
        np.savez(path, **arrays)
    with pytest.raises(ConfigError, match=words) as info:
        task_of({"path": str(path), **data})
    assert str(info.value).startswith("space.yaml: data") and "Fix:" in str(info.value)


def test_loader_task_uses_the_callers_loaders():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.randn(20, 4), torch.arange(20) % 3
    train = DataLoader(TensorDataset(x, y), batch_size=5)
    task = LoaderTask(train, DataLoader(TensorDataset(x[:6], y[:6]), batch_size=4))
    assert task.train_loader(batch_size=128, seed=0) is train
    assert task.input_shape == (4,) and task.example_input(5).shape == (5, 4)
    with pytest.raises(ConfigError, match="pairs of tensors"):
        LoaderTask([{"x": 1}], train)


def test_hidden_files_are_not_images_and_an_unreadable_image_is_named(tmp_path):
    images(tmp_path, classes=2, per_class=4)
    (tmp_path / "class_0" / "._0.png").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    (tmp_path / "class_1" / ".cache").mkdir()
    (tmp_path / "class_1" / ".cache" / "x.png").write_bytes(b"")
    task = task_of({"path": str(tmp_path), "val_fraction": 0.25})
    files = [f for s in ("train", "val") for f in task.datasets[s].files]
    assert len(files) == 8 and not any("/." in f for f in files)
    (tmp_path / "class_1" / "broken.png").write_bytes(b"not a png")
    task = task_of({"path": str(tmp_path), "val_fraction": 0.25, "split_seed": 1})
    broken = [i for s in ("train", "val") for i, f in enumerate(task.datasets[s].files) if f.endswith("broken.png")]
    split = "train" if any(f.endswith("broken.png") for f in task.datasets["train"].files) else "val"
    with pytest.raises(ConfigError, match="cannot read the image") as info:
        task.datasets[split][broken[0]]
    assert info.value.value.endswith("broken.png") and info.value.key == "data.path"



def test_truncated_images_are_found_before_a_search_not_in_its_trials(tmp_path):
    from automl.tasks.data import check_images

    images(tmp_path, classes=2, per_class=6, size=(64, 64))
    task = task_of({"path": str(tmp_path), "val_fraction": 0.25})
    check_images(task)  # all decode
    good = tmp_path / "class_0" / "0.png"
    Image.open(good).save(tmp_path / "class_1" / "photo.jpg", quality=90)
    for path in (good, tmp_path / "class_1" / "photo.jpg"):  # headers intact, pixels cut off
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    task = task_of({"path": str(tmp_path), "val_fraction": 0.25})
    with pytest.raises(ConfigError, match="2 image file.s. of the data cannot be decoded") as info:
        check_images(task)
    assert info.value.key == "data.path" and "0.png" in str(info.value) and "photo.jpg" in str(info.value)
    split = next(s for s in ("train", "val") if str(good) in task.datasets[s].files)
    with pytest.raises(ConfigError, match="cannot read the image"):  # and in a trial: named, not PIL's traceback
        task.datasets[split][task.datasets[split].files.index(str(good))]

def test_an_empty_class_folder_is_refused_rather_than_shifting_the_labels(tmp_path):
    images(tmp_path, classes=3, per_class=4)
    for f in (tmp_path / "class_1").iterdir():
        f.unlink()
    with pytest.raises(ConfigError, match="class folder 'class_1' holds no images") as info:
        task_of({"path": str(tmp_path)})
    assert "Fix:" in str(info.value)


def test_array_layouts(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 10)
    for name, x, layout, shape in [("nhwc_auto", rng.integers(0, 256, (20, 8, 6, 3), dtype=np.uint8), None, (3, 8, 6)),
                                   ("nchw_auto", rng.normal(size=(20, 3, 8, 6)).astype(np.float32), None, (3, 8, 6)),
                                   ("grey", rng.normal(size=(20, 8, 6)).astype(np.float32), None, (1, 8, 6)),
                                   ("sequence", rng.normal(size=(20, 4, 16)).astype(np.float32), "as_is", (4, 16)),
                                   ("forced", rng.normal(size=(20, 3, 8, 3)).astype(np.float32), "nhwc", (3, 3, 8))]:
        np.savez(tmp_path / f"{name}.npz", x=x, y=y)
        task = task_of({"path": str(tmp_path / f"{name}.npz"), **({"layout": layout} if layout else {})})
        assert task.input_shape == shape, name
    with pytest.raises(ConfigError, match="layout"):
        task_of({"path": str(tmp_path / "grey.npz"), "layout": "chw"})


def test_few_samples_split_without_stratifying_and_too_few_are_refused(tmp_path):
    images(tmp_path / "few", classes=10, per_class=3, size=(8, 8))  # 6 held out < 10 classes: not stratified
    task = task_of({"path": str(tmp_path / "few"), "val_fraction": 0.2})
    assert len(task.datasets["val"]) == 6 and len(task.datasets["train"]) == 24
    images(tmp_path / "two", classes=2, per_class=1, size=(8, 8))
    with pytest.raises(ConfigError, match="would hold out 1 of the 1 left") as info:
        task_of({"path": str(tmp_path / "two"), "val_fraction": 0.2, "test_fraction": 0.5})
    assert info.value.key.endswith("fraction")

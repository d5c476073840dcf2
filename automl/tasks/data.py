"""Data without writing Python: a folder of images per class, or an ``.npz`` of arrays.

A ``data:`` section (space or recipe) or ``--data PATH`` describes it::

    data:
      path: data/                # a folder, or arrays.npz
      input_size: [32, 32]       # images are resized to H x W (default: the first image's size)
      channels: 3                # 3 (RGB) or 1 (grey) for images
      mean: [0.5, 0.5, 0.5]      # normalisation after scaling pixels to [0, 1]; one value or one per channel
      std: [0.25, 0.25, 0.25]
      val_fraction: 0.2          # held out of train when the data has no validation split
      test_fraction: 0.0         # held out of train when the data has no test split (0: test = validation)
      split_seed: 0

Folders: ``path/train/<class>/*.png`` with optional ``path/val/`` and ``path/test/`` (same class
names), or ``path/<class>/*.png`` and the fractions split it (stratified, seeded). Classes are the
sorted folder names. Images are decoded lazily, so large folders do not have to fit in memory.

``.npz`` (read with ``allow_pickle=False``): ``x_train, y_train`` with optional ``x_val, y_val``,
``x_test, y_test``, or ``x, y`` split by the fractions. ``layout``: ``auto`` (default) reads a 4-D x as
(N, C, H, W), or as (N, H, W, C) when only its last axis has 1, 3 or 4 values (image channels);
``nchw`` / ``nhwc`` say which. A 3-D x is (N, H, W) grey images, a 2-D one (N, F) features; ``as_is``
hands x to the model with the shape it has (e.g. sequences (N, C, L)). uint8 inputs are scaled to
[0, 1] before ``mean`` / ``std``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from automl.errors import ConfigError
from automl.tasks.base import DatasetTask, TensorClassificationTask
from automl.validate import Where, expect_choice, expect_keys, expect_mapping, expect_range, expect_type

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = ("train", "val", "test")
LAYOUTS = ("auto", "nchw", "nhwc", "as_is")
IMAGE_CHANNELS = (1, 3, 4)
KEYS = ("path", "format", "input_size", "channels", "mean", "std", "layout", "val_fraction", "test_fraction",
        "split_seed")


@dataclass(frozen=True)
class DataSpec:
    path: str
    format: str = "auto"                       # auto | folder | npz
    input_size: Optional[Tuple[int, int]] = None
    channels: int = 3
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()
    layout: str = "auto"                       # auto | nchw | nhwc | as_is
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    split_seed: int = 0
    source: Optional[str] = field(default=None, compare=False)

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"path": self.path, "format": self.format}
        if self.input_size:
            out["input_size"] = list(self.input_size)
        out.update(channels=self.channels, layout=self.layout, val_fraction=self.val_fraction,
                   test_fraction=self.test_fraction, split_seed=self.split_seed)
        if self.mean:
            out["mean"] = list(self.mean)
        if self.std:
            out["std"] = list(self.std)
        return out


def _numbers(value, where: Where, kind=float) -> Tuple:
    value = value if isinstance(value, list) else [value]
    return tuple(expect_type(v, where / i, kind) for i, v in enumerate(value))


def parse_data(data: Any, where: Where) -> DataSpec:
    """A validated DataSpec from a ``data:`` mapping (or a bare path string)."""
    if isinstance(data, str):
        data = {"path": data}
    data = expect_mapping(data, where)
    expect_keys(data, where, KEYS, required=("path",))
    path = Path(expect_type(data["path"], where / "path", str)).expanduser()
    fmt = expect_choice(data.get("format", "auto"), where / "format", ("auto", "folder", "npz"))
    size = data.get("input_size")
    if size is not None:
        size = _numbers(size, where / "input_size", int)
        size = size * 2 if len(size) == 1 else size
        if len(size) != 2 or min(size) < 1:
            raise (where / "input_size").error("input_size is [height, width] of positive integers",
                                               data["input_size"], "write e.g. input_size: [32, 32]")
    channels = expect_choice(data.get("channels", 3), where / "channels", (1, 3))
    stats = {}
    for key in ("mean", "std"):
        stats[key] = _numbers(data[key], where / key) if key in data else ()
    if any(v <= 0 for v in stats["std"]):
        raise (where / "std").error("std must be positive", data["std"], "write e.g. std: [0.25, 0.25, 0.25]")
    fractions = {k: expect_range(expect_type(data.get(k, d), where / k, float), where / k, 0.0, 0.9)
                 for k, d in (("val_fraction", 0.2), ("test_fraction", 0.0))}
    if sum(fractions.values()) > 0.9:
        raise (where / "val_fraction").error("val_fraction + test_fraction must be at most 0.9",
                                             sum(fractions.values()), "hold out less data")
    seed = expect_range(expect_type(data.get("split_seed", 0), where / "split_seed", int), where / "split_seed", 0)
    layout = expect_choice(data.get("layout", "auto"), where / "layout", LAYOUTS)
    return DataSpec(path=str(path.resolve()), format=fmt, input_size=size, channels=channels, layout=layout,
                    split_seed=seed, source=where.file, **stats, **fractions)


# -- splitting ------------------------------------------------------------------------------------------
def _split(labels: np.ndarray, fraction: float, seed: int, where: Where, given: float) -> Tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices, stratified by label when every class has at least two samples and
    both sides can hold one of each class. ``given``: the fraction as the user wrote it (of all the data)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    if fraction <= 0:
        return index, index[:0]
    held = int(np.ceil(fraction * len(labels)))
    if held < 1 or held >= len(labels):
        raise where.error(f"too few samples: this split would hold out {held} of the {len(labels)} left", given,
                          "give more samples, or val/ and test/ splits of your own")
    counts = np.bincount(labels)
    classes = int((counts > 0).sum())
    stratify = labels if counts[counts > 0].min() >= 2 and min(held, len(labels) - held) >= classes else None
    return train_test_split(index, test_size=held, random_state=seed, stratify=stratify)


def _carve(train: Dict[str, np.ndarray], spec: DataSpec, have: set, where: Where) -> Dict[str, Dict[str, np.ndarray]]:
    """Test and validation splits cut from ``train`` (a dict of equal-length arrays) where the data has
    none; fractions are shares of everything ``train`` held."""
    if "val" not in have and spec.val_fraction <= 0:
        raise (where / "val_fraction").error("the data has no validation split and val_fraction is 0", 0.0,
                                             "add a val/ split (val arrays) or set val_fraction, e.g. 0.2")
    out, used = {}, 0.0
    for split, fraction in (("test", spec.test_fraction), ("val", spec.val_fraction)):
        if split in have or fraction <= 0:
            continue
        keep, held = _split(train["y"], fraction / (1.0 - used), spec.split_seed, where / f"{split}_fraction",
                            fraction)
        used += fraction
        out[split] = {k: v[held] for k, v in train.items()}
        train = {k: v[keep] for k, v in train.items()}
    out["train"] = train
    return out


# -- image folders --------------------------------------------------------------------------------------
class ImageFiles(Dataset):
    """Images decoded on access: resized, scaled to [0, 1] and normalised."""

    def __init__(self, files: List[str], labels: np.ndarray, spec: DataSpec, size: Tuple[int, int]):
        self.files, self.labels, self.size = list(files), np.asarray(labels, dtype=np.int64), size
        self.mode = "RGB" if spec.channels == 3 else "L"
        self.mean = torch.tensor(spec.mean or (0.0,), dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(spec.std or (1.0,), dtype=torch.float32).view(-1, 1, 1)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        try:
            with Image.open(self.files[i]) as image:
                image = image.convert(self.mode)  # decodes: a truncated file fails here
        except (OSError, ValueError, SyntaxError) as exc:
            raise ConfigError(f"cannot read the image ({type(exc).__name__})", key="data.path", value=self.files[i],
                              fix="remove or replace the file") from None
        if image.size != (self.size[1], self.size[0]):
            image = image.resize((self.size[1], self.size[0]), Image.BILINEAR)
        array = np.asarray(image, dtype=np.float32) / 255.0
        x = torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1).transpose(2, 0, 1).copy())
        return (x - self.mean) / self.std, int(self.labels[i])

    def unreadable(self) -> List[str]:
        """The files PIL cannot decode (JPEGs decoded at reduced scale: one pass costs less than an epoch)."""
        from PIL import Image

        bad = []
        for path in self.files:
            try:
                with Image.open(path) as image:
                    image.draft(self.mode, (self.size[1], self.size[0]))
                    image.load()
            except Exception:  # OSError, SyntaxError, DecompressionBombError ...: all mean "not usable"
                bad.append(path)
        return bad


def check_images(task) -> None:
    """Every image of an image-folder task decodes, checked once before a search: a bad file would
    otherwise fail every trial in its first epoch, one after the other."""
    datasets = {id(d): d for d in getattr(task, "datasets", {}).values() if isinstance(d, ImageFiles)}
    bad = [path for d in datasets.values() for path in d.unreadable()]
    if bad:
        listed = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise ConfigError(f"{len(bad)} image file(s) of the data cannot be decoded", key="data.path", value=bad[0],
                          fix=f"remove or replace them: {listed}")


def _class_files(root: Path) -> Dict[str, List[str]]:
    """{class folder: its image files}, hidden files and folders left out (macOS's ._name.png are not
    images); a folder without images maps to []."""
    classes = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        classes[folder.name] = sorted(
            str(f) for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
            and not any(part.startswith(".") for part in f.relative_to(folder).parts))
    return classes


def _image_task(spec: DataSpec, where: Where) -> DatasetTask:
    root = Path(spec.path)
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise (where / "path").error("the folder has val/ or test/ but no train/", spec.path,
                                     "add a train/ folder of class folders")
    tree = {s: _class_files(d) for s, d in split_dirs.items()} if split_dirs else {"train": _class_files(root)}
    empty = [c for c, files in tree["train"].items() if not files]
    if empty:  # dropping it would shift every later class's label
        raise (where / "path").error(f"class folder {empty[0]!r} holds no images", str(root / empty[0]),
                                     "add its images, or move the folder out of the data folder")
    tree = {s: {c: files for c, files in classes.items() if files} for s, classes in tree.items()}
    names = sorted(tree["train"])
    if len(names) < 2:
        raise (where / "path").error("an image folder needs at least two class folders holding images "
                                     f"({', '.join(IMAGE_SUFFIXES)})", spec.path,
                                     "lay it out as <path>/<class>/<image> or <path>/train/<class>/<image>")
    for split, classes in tree.items():
        extra = sorted(set(classes) - set(names))
        if extra:
            raise (where / "path").error(f"{split}/ has classes that train/ lacks", extra[:5],
                                         "use the same class folder names in every split")
    arrays = {s: {"f": np.array([f for c in names for f in classes.get(c, [])]),
                  "y": np.array([i for i, c in enumerate(names) for _ in classes.get(c, [])], dtype=np.int64)}
              for s, classes in tree.items()}
    splits = {**_carve(arrays["train"], spec, set(arrays), where), **{s: a for s, a in arrays.items() if s != "train"}}
    size = spec.input_size or _first_size(splits["train"]["f"][0])
    _check_stats(spec, spec.channels, where)
    sets = {s: ImageFiles(a["f"], a["y"], spec, size) for s, a in splits.items()}
    return DatasetTask(sets["train"], sets["val"], sets.get("test"), num_classes=len(names),
                       input_shape=(spec.channels, *size), name=f"data:{root.name}")


def _first_size(path: str) -> Tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size[1], image.size[0]


def _check_stats(spec: DataSpec, channels: int, where: Where):
    for key in ("mean", "std"):
        values = getattr(spec, key)
        if values and len(values) not in (1, channels):
            raise (where / key).error(f"give one value or one per channel ({channels})", list(values),
                                      f"write {channels} values")


# -- arrays ---------------------------------------------------------------------------------------------
def _npz_task(spec: DataSpec, where: Where) -> TensorClassificationTask:
    try:
        with np.load(spec.path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except ValueError as exc:  # object arrays need pickle, which we never load
        raise (where / "path").error(f"cannot read the .npz without unpickling ({exc})", spec.path,
                                     "save plain numeric arrays (np.savez with float/uint8 x and integer y)") from None
    except Exception as exc:
        raise (where / "path").error(f"cannot read the .npz: {exc}", spec.path,
                                     "give a file written by np.savez") from None
    pairs = {s: (f"x_{s}", f"y_{s}") for s in SPLITS}
    if "x" in arrays and "y" in arrays:
        pairs = {"train": ("x", "y")}
    elif not {"x_train", "y_train"} <= set(arrays):
        raise (where / "path").error("the .npz needs arrays x and y, or x_train and y_train (optionally x_val, "
                                     "y_val, x_test, y_test)", sorted(arrays), "save the arrays under those names")
    have = {s: {"x": _inputs(arrays[x], spec, where / x), "y": _labels(arrays[y], where / y)}
            for s, (x, y) in pairs.items() if x in arrays and y in arrays}
    for s, a in have.items():
        if len(a["x"]) != len(a["y"]):
            raise (where / s).error(f"x_{s} and y_{s} hold different numbers of samples", (len(a["x"]), len(a["y"])),
                                    "give one label per input")
    splits = {**_carve(have["train"], spec, set(have), where), **{s: a for s, a in have.items() if s != "train"}}
    val = splits["val"]
    test = splits.get("test", val)
    task = TensorClassificationTask(splits["train"]["x"], splits["train"]["y"], val["x"], val["y"], test["x"],
                                    test["y"])
    task.name = f"data:{Path(spec.path).name}"
    return task


def _inputs(x: np.ndarray, spec: DataSpec, where: Where) -> np.ndarray:
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 2:
        raise where.error("inputs must be a numeric array of shape (N, ...)", f"{x.dtype} {x.shape}",
                          "save x as float32 or uint8 (N, C, H, W), (N, H, W) or (N, F)")
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    x = x.astype(np.float32) / scale
    if x.ndim == 3 and spec.layout != "as_is":
        x = x[:, None]
    elif x.ndim == 4 and (spec.layout == "nhwc" or (spec.layout == "auto" and x.shape[3] in IMAGE_CHANNELS
                                                    and x.shape[1] not in IMAGE_CHANNELS)):
        x = x.transpose(0, 3, 1, 2)
    channels = x.shape[1]
    _check_stats(spec, channels, Where(where.file, "data"))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if spec.mean:
        x = x - np.asarray(spec.mean, dtype=np.float32).reshape(shape)
    if spec.std:
        x = x / np.asarray(spec.std, dtype=np.float32).reshape(shape)
    return np.ascontiguousarray(x)


def _labels(y: np.ndarray, where: Where) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or (len(y) and y.min() < 0):
        raise where.error("labels must be a 1-D array of non-negative integers", f"{y.dtype} {y.shape}",
                          "save y as int64 class indices 0..K-1")
    return y.astype(np.int64)


def data_task(spec: DataSpec) -> DatasetTask:
    """The task a DataSpec describes (files are checked now, images decoded when read)."""
    where = Where(spec.source, "data")
    path = Path(spec.path)
    if not path.exists():
        raise (where / "path").error("data not found", spec.path,
                                     "give a folder of class folders (or train/val/test folders) or an .npz file")
    fmt = spec.format if spec.format != "auto" else ("npz" if path.suffix == ".npz" else "folder")
    if fmt == "npz":
        if not path.is_file():
            raise (where / "path").error("format npz needs a file", spec.path, "give the .npz file")
        return _npz_task(spec, where)
    if not path.is_dir():
        raise (where / "path").error("format folder needs a directory", spec.path,
                                     "give a folder of class folders, or an .npz file")
    return _image_task(spec, where)


class LoaderTask(DatasetTask):
    """A task over DataLoaders the caller built (the Python API). Their batch size and shuffling are
    used as they are: ``train.batch_size`` does not apply."""

    def __init__(self, train_loader, val_loader, test_loader=None, *, num_classes: Optional[int] = None,
                 name: str = "loaders"):
        self.loaders = {"train": train_loader, "val": val_loader, "test": test_loader or val_loader}
        for split, loader in self.loaders.items():
            batch = next(iter(loader), None)
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor)):
                raise ConfigError(f"the {split} loader must yield (inputs, labels) pairs of tensors",
                                  key=f"{split}_loader", value=type(batch).__name__,
                                  fix="wrap your dataset so that it returns (x, y)")
        super().__init__(None, None, None, num_classes=num_classes, name=name)

    def _loader(self, split, batch_size, shuffle, seed=0):
        return self.loaders[split]


def spec_from_mapping(data: Mapping, source: Optional[str] = None) -> DataSpec:
    return parse_data(dict(data), Where(source, "data"))

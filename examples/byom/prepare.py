"""Make the example's inputs as a user would have them: scikit-learn's digits written as a folder of
PNG images per class (32x32 RGB), and a model trained on them, saved as a state_dict.

    python examples/byom/prepare.py --out examples/byom/work       # about 20 s on 2 cores
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).parent))
from models import build  # noqa: E402


def write_images(root: Path, per_class: int):
    digits = load_digits()
    counts = {}
    for image, label in zip(digits.images, digits.target):
        if counts.get(label, 0) >= per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        pixels = (image / 16.0 * 255).astype(np.uint8).repeat(4, 0).repeat(4, 1)
        folder = root / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.stack([pixels] * 3, axis=-1)).save(folder / f"{counts[label]:03d}.png")


def train(data: Path, epochs: int, out: Path):
    """The user's own training script; it splits and normalises the images as space.yaml says."""
    from automl.io import load_yaml
    from automl.tasks.data import data_task, parse_data
    from automl.validate import Where

    torch.manual_seed(0)
    spec = {**load_yaml(Path(__file__).parent / "space.yaml")["data"], "path": str(data)}
    task = data_task(parse_data(spec, Where("space.yaml", "data")))
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(epochs):
        task.train_epoch(model, optimizer, task.train_loader(batch_size=32, seed=epoch))
        print(f"epoch {epoch + 1}/{epochs}: val accuracy {task.evaluate(model, task.val_loader()):.4f}", flush=True)
    torch.save(model.state_dict(), out)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="examples/byom/work")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    write_images(out / "data", args.per_class)
    train(out / "data", args.epochs, out / "weights.pt")
    print(f"wrote {out / 'data'} and {out / 'weights.pt'}")


if __name__ == "__main__":
    main()

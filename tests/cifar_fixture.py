"""A tiny CIFAR-10 in the official on-disk format (cifar-10-batches-py/: five data batches, test_batch, batches.meta).

Images carry their label as a colour (plus noise), so that a few steps of training must lower the loss well below
chance.
"""

import pickle
from pathlib import Path

import numpy as np

# one colour per class, far apart in RGB: learnable in a handful of steps whatever the crop
PALETTE = np.array(
    [
        [230, 25, 25],
        [25, 230, 25],
        [25, 25, 230],
        [230, 230, 25],
        [230, 25, 230],
        [25, 230, 230],
        [128, 128, 128],
        [250, 250, 250],
        [0, 0, 0],
        [128, 30, 200],
    ],
    dtype=np.int16,
)


def make_images(labels, rng):
    n = len(labels)
    noise = rng.integers(-20, 21, size=(n, 3, 32, 32), dtype=np.int16)
    x = np.clip(PALETTE[np.asarray(labels)][:, :, None, None] + noise, 0, 255).astype(np.uint8)
    return x.reshape(n, 3072)


# fastvit-train arguments for a one-block model small enough for the CPU (8x8 patches of 32x32 images)
TINY = [
    "--model-arg",
    "depth=1",
    "--model-arg",
    "dim=32",
    "--model-arg",
    "heads=2",
    "--model-arg",
    "mlp_dim=64",
    "--model-arg",
    "patch_size=8",
]


def write_cifar10(root, per_batch=20, test=40, seed=0, str_keys=False) -> Path:
    """The official layout; str_keys=True pickles the batches as Python 3 tools do (str keys, not bytes)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        labels = rng.integers(0, 10, size=n).tolist()
        d = {
            b"batch_label": name.encode(),
            b"labels": labels,
            b"data": make_images(labels, rng),
            b"filenames": [f"img{i}.png".encode() for i in range(n)],
        }
        if str_keys:
            d = {k.decode(): v for k, v in d.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_vis": 3072}, f)
    return Path(root)

"""CIFAR-10 from its official on-disk format, and a data pipeline that lives on the GPU.

At 15-60k images/s a CPU DataLoader is the bottleneck of a ViT step this small, so the whole dataset sits on the
device as uint8 (150 MB for the training set) and each batch is cropped, flipped and normalised there.
"""

import pickle
from pathlib import Path

import torch
import torch.nn.functional as F

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


class DatasetError(RuntimeError):
    """CIFAR-10 is missing or damaged; the message says which file and what to do."""


def _entry(d: dict, key: str):
    """d[key] whichever way the batch was pickled: the official Python 2 files give bytes keys under
    encoding='bytes', files pickled by Python 3 (CIFAR-format subsets made with Python 3 tools) give str keys."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DatasetError(f"no '{key}' entry (keys: {', '.join(map(repr, list(d)[:8]))})")


def _read_batch(path: Path):
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated or otherwise unreadable pickle
        raise DatasetError(
            f"{path} is not a readable pickle ({type(e).__name__}: {e}): the file is damaged; "
            f"delete the '{FOLDER}' folder and download it again (--download)"
        ) from e
    try:
        if not isinstance(d, dict):
            raise DatasetError(f"a pickled {type(d).__name__}, not a dict")
        data, labels = _entry(d, "data"), _entry(d, "labels")
        images = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, 3, 32, 32)
        labels = torch.as_tensor(labels, dtype=torch.int64)
    except Exception as e:  # a readable pickle that is not a CIFAR-10 batch: wrong keys, wrong sizes
        raise DatasetError(f"{path} is not a CIFAR-10 batch: {e}") from e
    if len(images) != len(labels) or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise DatasetError(f"{path}: {len(images)} images but {len(labels)} labels in 0..9; the file is damaged")
    return images, labels


def cifar10_folder(data_dir) -> Path:
    """The folder holding the batches: data_dir/cifar-10-batches-py, or data_dir itself when it is that folder."""
    root = Path(data_dir)
    if not (root / FOLDER).is_dir() and (root / TEST_FILES[0]).is_file():
        return root
    return root / FOLDER


def load_cifar10(data_dir, train: bool):
    """(images uint8 [N, 3, 32, 32], labels int64 [N]) from data_dir/cifar-10-batches-py (or data_dir itself)."""
    root = cifar10_folder(data_dir)
    if not root.is_dir():
        raise DatasetError(
            f"CIFAR-10 not found: looked for the folder {root.resolve()} (the official python "
            f"version, with data_batch_1..5 and test_batch). Pass --data-dir to where it is, or "
            f"--download to fetch it with torchvision."
        )
    parts = []
    for name in TRAIN_FILES if train else TEST_FILES:
        path = root / name
        if not path.is_file():
            raise DatasetError(f"CIFAR-10 is incomplete: {path} is missing. Download it again (--download).")
        parts.append(_read_batch(path))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def download_cifar10(data_dir) -> None:
    import torchvision

    for train in (True, False):
        torchvision.datasets.CIFAR10(root=str(data_dir), train=train, download=True)


def batch_generator(seed: int, epoch: int, index: int, device) -> torch.Generator:
    """The augmentation RNG of one batch: a function of (seed, epoch, batch), so a resumed run draws the same crops."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + epoch * 10_007 + index) % (2**63))
    return g


class DeviceLoader:
    """Batches of (images float [B, 3, S, S], labels) from a uint8 dataset held on `device`.

    Training batches get a random 32x32 crop of the 4-pixel zero-padded image and a random horizontal flip; all
    batches are normalised, and upsampled (bilinear) when the model's image size is not 32. With `world_size` > 1
    each rank takes every world_size-th index of the same shuffled order.
    """

    def __init__(
        self, images, labels, batch_size, device, *, train, seed=0, image_size=32, rank=0, world_size=1, drop_last=None
    ):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.device, self.train, self.seed = batch_size, torch.device(device), train, seed
        self.image_size, self.rank, self.world_size = image_size, rank, world_size
        self.drop_last = train if drop_last is None else drop_last
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255
        self.epoch = 0

    def _indices(self):
        n = len(self.labels)
        if self.train:
            g = batch_generator(self.seed, self.epoch, -1, self.device)
            order = torch.randperm(n, device=self.device, generator=g)
        else:
            order = torch.arange(n, device=self.device)
        return order[self.rank :: self.world_size]

    def __len__(self):
        n = len(range(self.rank, len(self.labels), self.world_size))
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batch(self, order, i):
        idx = order[i * self.batch_size : (i + 1) * self.batch_size]
        x = self.images[idx]
        if self.train:
            x = self._augment(x, batch_generator(self.seed, self.epoch, i, self.device))
        x = (x.float() - self.mean) / self.std
        if self.image_size != 32:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x, self.labels[idx]

    def __iter__(self):
        order = self._indices()
        for i in range(len(self)):
            yield self.batch(order, i)

    @staticmethod
    def _augment(x, g):
        B, C, H, W = x.shape
        padded = F.pad(x, (4, 4, 4, 4))  # (B, C, H + 8, W + 8), zeros as torchvision's RandomCrop(padding=4)
        oy = torch.randint(0, 9, (B,), device=x.device, generator=g)
        ox = torch.randint(0, 9, (B,), device=x.device, generator=g)
        flip = torch.rand(B, device=x.device, generator=g) < 0.5
        ys = (oy[:, None] + torch.arange(H, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
        xs = torch.arange(W, device=x.device).expand(B, W)
        xs = torch.where(flip[:, None], W - 1 - xs, xs) + ox[:, None]  # flipping = reading the columns backwards
        b = torch.arange(B, device=x.device)[:, None, None, None]
        c = torch.arange(C, device=x.device)[None, :, None, None]
        return padded[b, c, ys, xs[:, None, None, :]]  # (B, C, H, W)

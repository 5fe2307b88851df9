"""Semi-supervised data (Kingma et al. 2014; Jang et al. 2017, Section 4.3): every training image unlabelled, plus
a small labelled subset of the training split, balanced over the classes.

Training batches are (unlabelled images (B, C, H, W), labelled images (B_l, C, H, W), labels (B_l,)); validation
and test batches are (images (B, C, H, W), labels (B,)) as in :mod:`catvae.data`. The labelled subset is a seeded
draw of ``n_labelled / K`` images of each of the K classes; the unlabelled stream is all training images (the
labelled ones included), as in the paper's 100 labels + 50,000 unlabelled images. With ``label_classes=K`` every
label is replaced by a seeded uniform draw from {0..K-1}, so that models with any number of classes K can be timed
on the same images (the speed-vs-K measurement); accuracies are then meaningless.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from catvae.data import EpochSampler, MNISTDataModule, SyntheticDataModule, TensorBatchLoader
from catvae.validation import check_integer

#: Added to the labelled sampler's seeds so that its stream never coincides with the unlabelled sampler's.
LABELLED_STREAM = 2**40


class CyclingSampler(EpochSampler):
    """``n_batches`` batches of ``batch_size`` indices into a small set of ``size`` examples per epoch: seeded
    permutations of the set, one after the other, cut into batches, so every example is drawn equally often
    (up to the last permutation). Seeded by (seed, epoch) like :class:`EpochSampler`, on a stream of its own."""

    def __init__(self, size: int, batch_size: int, n_batches: int, seed: int, device: torch.device | str = "cpu"):
        super().__init__(size, batch_size, shuffle=True, drop_last=False, seed=seed, device=device)
        self.n_batches = n_batches

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(LABELLED_STREAM + self.seed * 1_000_003 + self.epoch)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self) -> Iterator[Tensor]:
        generator = self.generator()
        n_permutations = -(-self.n_batches * self.batch_size // self.size)  # ceil
        order = torch.cat([torch.randperm(self.size, generator=generator) for _ in range(n_permutations)])
        order = order.to(self.device)
        for i in range(self.n_batches):
            yield order[i * self.batch_size:(i + 1) * self.batch_size]


class SemiSupervisedLoader:
    """Iterable of (unlabelled images (B, C, H, W), labelled images (B_l, C, H, W), labels (B_l,)): the unlabelled
    loader's batches zipped with as many batches of the labelled loader (whose sampler cycles the labelled set).

    Lightning calls ``set_epoch`` on ``sampler`` (the unlabelled sampler); the labelled sampler follows it. Resumable
    like :class:`TensorBatchLoader`: the saved position applies to both loaders, which skip the same batches.
    """

    batch_sampler = None

    def __init__(self, unlabelled: TensorBatchLoader, labelled: TensorBatchLoader):
        self.unlabelled, self.labelled = unlabelled, labelled
        self.sampler = unlabelled.sampler

    def __len__(self) -> int:
        return len(self.unlabelled)

    def state_dict(self) -> dict[str, int]:
        return self.unlabelled.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.unlabelled.load_state_dict(state)
        self.labelled.load_state_dict(state)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        self.labelled.sampler.set_epoch(self.sampler.epoch)
        for (x, _), (x_labelled, labels) in zip(self.unlabelled, self.labelled):
            yield x, x_labelled, labels


def balanced_subset(labels: Tensor, n_labelled: int, n_classes: int, generator: torch.Generator) -> Tensor:
    """Indices of n_labelled / K examples of each class, drawn without replacement: (n_labelled,), class by class."""
    if n_labelled % n_classes:
        raise ValueError(f"data.n_labelled={n_labelled} must be a multiple of the number of classes K={n_classes} "
                         f"(a balanced draw takes n_labelled / K labels per class)")
    if n_labelled > len(labels):
        raise ValueError(f"data.n_labelled={n_labelled} exceeds the {len(labels)} training images available")
    per_class = n_labelled // n_classes
    chosen = []
    for k in range(n_classes):
        members = (labels == k).nonzero().squeeze(1)  # (n_k,)
        if len(members) < per_class:
            raise ValueError(f"data.n_labelled={n_labelled} needs {per_class} labels of each class, but class {k} "
                             f"has only {len(members)} training images")
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen)


class SemiSupervised:
    """Mixin for an :class:`~catvae.data.ArrayDataModule`: a labelled subset and the semi-supervised training loader.

    n_labelled:          labels kept, n_labelled / K per class (K = the number of classes of the labels).
    labelled_batch_size: B_l, labelled images per training batch (the labelled set is cycled through).
    label_classes:       None keeps the dataset's labels; K replaces every label (all splits) by a uniform draw
                         from {0..K-1}.
    labelled_seed:       seeds the random labels and the labelled draw (``seed`` keeps seeding binarization and order).
    After :meth:`setup`: ``n_classes`` (K), ``labelled_index`` (n_labelled,) into the training split.
    """

    def __init__(self, n_labelled: int = 100, labelled_batch_size: int = 100, label_classes: int | None = None,
                 labelled_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.n_labelled = check_integer("data.n_labelled", n_labelled)
        self.labelled_batch_size = check_integer("data.labelled_batch_size", labelled_batch_size)
        self.label_classes = None if label_classes is None else check_integer("data.label_classes", label_classes, 2)
        self.labelled_seed = check_integer("data.labelled_seed", labelled_seed, minimum=0)
        self.n_classes: int | None = None
        self.labelled_index: Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.labelled_index is not None:
            return
        super().setup(stage)
        generator = torch.Generator().manual_seed(self.labelled_seed)
        if self.label_classes is not None:
            self.splits = {split: (images, torch.randint(self.label_classes, labels.shape, generator=generator))
                           for split, (images, labels) in self.splits.items()}
        train_labels = self.splits["train"][1]
        self.n_classes = self.label_classes or int(train_labels.max()) + 1
        self.labelled_index = balanced_subset(train_labels, self.n_labelled, self.n_classes, generator)

    def train_batches(self) -> SemiSupervisedLoader:
        unlabelled = self._loader("train", train=True)
        images, labels = self.resident("train")
        index = self.labelled_index.to(images.device)
        sampler = CyclingSampler(len(index), self.labelled_batch_size, len(unlabelled), self.seed, images.device)
        labelled = TensorBatchLoader(images[index], labels[index], sampler, dynamic=self.binarization == "dynamic")
        return SemiSupervisedLoader(unlabelled, labelled)


class SemiSupervisedMNIST(SemiSupervised, MNISTDataModule):
    """Binarized MNIST (50k/10k/10k, :class:`~catvae.data.MNISTDataModule`) with ``n_labelled`` balanced labels."""


class SemiSupervisedSynthetic(SemiSupervised, SyntheticDataModule):
    """The tiny synthetic images (:class:`~catvae.data.SyntheticDataModule`, labels = the first factor's level,
    K = n_levels) with ``n_labelled`` balanced labels, for tests."""

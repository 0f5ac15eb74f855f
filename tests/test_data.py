"""Datamodules: splits, shapes, normalisation, probe-set determinism, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pl_i2f.data import DATAMODULES, build_datamodule
from pl_i2f.errors import ConfigError, DataUnavailableError


def nearest_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each row of ``a``, the exact L1 distance to its nearest row of ``b`` (no cdist round-off)."""
    return (a.flatten(1)[:, None, :] - b.flatten(1)[None, :, :]).abs().sum(-1).min(dim=1).values


def test_digits_splits_are_stratified_disjoint_and_complete():
    dm = build_datamodule("digits")
    dm.setup()
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sum(sizes) == 1797
    assert sizes[1] == sizes[2] == 270
    # stratified: every class is present in every split in roughly the global proportion
    for split in (dm.train_set, dm.val_set, dm.test_set):
        counts = torch.bincount(split.tensors[1], minlength=10).float()
        assert counts.min() > 0
        assert (counts / counts.sum() - 0.1).abs().max() < 0.02
    # disjoint: no image appears in two splits
    images = [s.tensors[0] for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert nearest_distance(images[1], images[0]).min() > 0
    assert nearest_distance(images[2], images[0]).min() > 0


def test_digits_shapes_and_normalisation():
    dm = build_datamodule("digits", size=12)
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (dm.batch_size, 1, 12, 12)
    assert dm.input_shape == (1, 12, 12) and dm.num_classes == 10
    train_x = dm.train_set.tensors[0]
    assert abs(float(train_x.mean())) < 1e-4 and abs(float(train_x.std()) - 1) < 1e-3
    pixels = dm.denormalize(train_x)
    assert pixels.min() >= 0 and pixels.max() <= 1
    assert torch.allclose(dm.normalize(pixels), train_x, atol=1e-5)


def test_probe_set_is_fixed_held_out_and_seeded():
    a, b = build_datamodule("digits"), build_datamodule("digits")
    xa, ya = a.probe_batch()
    xb, yb = b.probe_batch()
    assert xa.shape == (32, 1, 16, 16) and torch.equal(xa, xb) and torch.equal(ya, yb)
    # the probe comes from the validation split, never from training
    assert nearest_distance(xa, a.val_set.tensors[0]).max() == 0
    assert nearest_distance(xa, a.train_set.tensors[0]).min() > 0
    # a smaller probe is a prefix of the default one; another seed draws other samples
    assert torch.equal(a.probe_batch(8)[0], xa[:8])
    other = build_datamodule("digits", seed=1).probe_batch()[0]
    assert not torch.equal(other, xa)


def test_probe_draw_leaves_global_rng_alone():
    dm = build_datamodule("digits")
    dm.setup()
    state = torch.get_rng_state()
    dm.probe_batch()
    assert torch.equal(state, torch.get_rng_state())


def test_fake_data_is_deterministic_and_shaped():
    a = build_datamodule("fake", input_shape=(3, 8, 8), num_classes=4, num_samples=100, batch_size=8)
    b = build_datamodule("fake", input_shape=(3, 8, 8), num_classes=4, num_samples=100, batch_size=8)
    a.setup()
    b.setup()
    xa, ya = a.train_set[0]
    xb, yb = b.train_set[0]
    assert xa.shape == (3, 8, 8) and torch.equal(xa, xb) and ya == yb
    assert len(a.train_set) + len(a.val_set) + len(a.test_set) == 100
    assert a.probe_batch(5)[0].shape == (5, 3, 8, 8)


def test_poisson_sampling_gives_an_opacus_loader():
    from opacus.data_loader import DPDataLoader

    dm = build_datamodule("fake", input_shape=(1, 4, 4), num_samples=100, batch_size=10, poisson_sampling=True)
    assert isinstance(dm.train_dataloader(), DPDataLoader)
    assert dm.sample_rate == pytest.approx(10 / len(dm.train_set))


def test_batch_larger_than_train_split_is_rejected():
    dm = build_datamodule("digits", batch_size=5000)
    with pytest.raises(ConfigError, match="larger than the digits train split"):
        dm.setup()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"size": 2}, "size"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "val_fraction"),
        ({"probe_size": 0}, "probe_size"),
    ],
)
def test_bad_digits_options(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        build_datamodule("digits", **kwargs)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown dataset 'imagenet'; valid: .*cifar10.*digits"):
        build_datamodule("imagenet")


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "cifar100"])
def test_missing_torchvision_files_without_download(tmp_path, name):
    dm = build_datamodule(name, root=str(tmp_path), download=False)
    with pytest.raises(DataUnavailableError, match=f"{name} files not found under .*download is off"):
        dm.setup()


def test_torchvision_datamodule_reads_local_files(tmp_path):
    """The MNIST path works when the raw files are present (written here in MNIST's IDX format)."""
    import gzip
    import struct

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)

    def write(name: str, count: int) -> None:
        images = torch.randint(0, 256, (count, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.arange(count, dtype=torch.uint8) % 10
        with gzip.open(raw / f"{name}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, count, 28, 28) + images.numpy().tobytes())
        with gzip.open(raw / f"{name}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, count) + labels.numpy().tobytes())
        for suffix in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            with gzip.open(raw / f"{name}-{suffix}.gz") as src:
                (raw / f"{name}-{suffix}").write_bytes(src.read())

    write("train", 120)
    write("t10k", 30)
    dm = build_datamodule("mnist", root=str(tmp_path), download=False, val_size=20, batch_size=16, probe_size=8)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (100, 20, 30)
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 28, 28)
    assert dm.probe_batch()[0].shape == (8, 1, 28, 28)


def test_registry_lists_the_documented_datasets():
    assert {"digits", "fake", "mnist", "fashion_mnist", "cifar10", "cifar100"} <= set(DATAMODULES)


@pytest.mark.parametrize("poisson", [False, True])
def test_data_order_is_a_function_of_seed_and_epoch(poisson):
    """Lightning's per-epoch hook reaches the sampler; each epoch draws new batches, and a fresh loader set to
    epoch e (a resumed run) draws exactly what the first loader drew in epoch e."""
    from lightning_fabric.utilities.data import _set_sampler_epoch

    def epoch_batches(loader, epoch):
        _set_sampler_epoch(loader, epoch)
        return [y.tolist() for _, y in loader]

    dm = build_datamodule("fake", input_shape=(1, 4, 4), num_samples=100, batch_size=10, poisson_sampling=poisson,
                          seed=5)
    first = dm.train_dataloader()
    run = [epoch_batches(first, e) for e in range(3)]
    assert run[0] != run[1] != run[2]
    resumed = build_datamodule("fake", input_shape=(1, 4, 4), num_samples=100, batch_size=10,
                               poisson_sampling=poisson, seed=5).train_dataloader()
    assert epoch_batches(resumed, 2) == run[2]
    assert epoch_batches(resumed, 1) == run[1]


def test_failed_download_leaves_no_new_data_root(tmp_path, monkeypatch):
    """A download that fails after torchvision created the folders removes the root this run created."""
    import torchvision

    root = tmp_path / "new_root"

    class FailingMNIST:
        def __init__(self, root, train, download, transform):
            (Path(root) / "MNIST" / "raw").mkdir(parents=True)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "MNIST", FailingMNIST)
    with pytest.raises(DataUnavailableError, match="the download failed"):
        build_datamodule("mnist", root=str(root), download=True).setup()
    assert not root.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(DataUnavailableError):
        build_datamodule("mnist", root=str(existing), download=True).setup()
    assert existing.exists()  # a root the user had is never removed


def test_unknown_datamodule_options_are_named_but_a_bug_inside_keeps_its_traceback(monkeypatch):
    with pytest.raises(ConfigError, match=r"dataset 'digits' got unknown options \['colour'\]; valid: .*size"):
        build_datamodule("digits", colour="blue")  # digits forwards **kwargs to its base: checked there too

    def broken_init(self, size=16, **kwargs):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(DATAMODULES["digits"], "__init__", broken_init)
    with pytest.raises(TypeError, match="unsupported operand"):
        build_datamodule("digits", size=8)

"""LightningDataModules: the embedded digits (default), torchvision image sets, and generated data.

Every datamodule exposes what analysis needs besides the loaders:

* ``mean`` / ``std`` (per channel), ``num_classes``, ``input_shape`` ``(C, H, W)``;
* ``probe_batch()``: a fixed, seeded set of held-out **validation** samples (``probe_size``, default 32)
  that leakage callbacks analyse — never a training batch;
* ``denormalize(x)``: back to [0, 1] pixels, clamped, for reconstruction metrics.

``poisson_sampling=True`` makes ``train_dataloader`` an Opacus ``DPDataLoader`` (DP-SGD's sampling).

Data order is a pure function of ``(seed, epoch)``: the training samplers reseed themselves in ``set_epoch``
(which Lightning calls at the start of every epoch), so a run resumed from an end-of-epoch checkpoint draws
the same batches — Poisson draws included — as an uninterrupted one; a sampler's ``skip`` makes the next pass
start that many items in (a mid-epoch resume: :func:`pl_i2f.preemption.fast_forward`). Under
``torch.distributed`` every rank draws the same global order (same seed) and keeps its own share of each batch
(:mod:`pl_i2f.sampling`).
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from pl_i2f.errors import ConfigError, DataUnavailableError, check_options, unknown_name
from pl_i2f.sampling import EpochPoissonSampler as EpochPoissonSampler  # re-exported: pl_i2f.data's samplers
from pl_i2f.sampling import EpochShuffleSampler, distributed_rank, poisson_loader

if TYPE_CHECKING:
    from pl_i2f.calibrated import GaussianPrior


def check_finite_images(dataset: Dataset, split: str, name: str) -> None:
    """One-line error when a split holds NaN or infinite pixels (training on them gives NaN losses)."""
    tensors = getattr(dataset, "tensors", None)
    if tensors is None and isinstance(dataset, Subset):
        tensors = getattr(dataset.dataset, "tensors", None)
    if not tensors or not tensors[0].is_floating_point():
        return  # files decoded from 8-bit images cannot hold NaN
    bad = ~torch.isfinite(tensors[0].flatten(1)).all(dim=1)
    if bad.any():
        raise ConfigError(f"data: the {name} {split} images hold NaN/inf pixels ({int(bad.sum())} samples, "
                          f"first at index {int(bad.nonzero()[0])}); clean the data or check data.noise")


class ImageDataModule(pl.LightningDataModule):
    """Shared behaviour: loaders, probe set, de-normalisation, validation of sizes."""

    name: str = "images"
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        probe_size: int = 32,
        seed: int = 0,
        poisson_sampling: bool = False,
    ):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        if eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size must be >= 1, got {eval_batch_size}")
        if probe_size < 1:
            raise ConfigError(f"data.probe_size must be >= 1, got {probe_size}")
        if num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.probe_size = probe_size
        self.seed = seed
        self.poisson_sampling = poisson_sampling
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._probe: tuple[Tensor, Tensor] | None = None

    # -- subclasses fill the three splits --------------------------------------------------------
    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        """(train, val, test) datasets; every concrete datamodule defines it."""
        raise TypeError(f"{type(self).__name__} must define _build_splits() returning (train, val, test)")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_set, val_set, test_set = self._build_splits()
        if self.batch_size > len(train_set):
            raise ConfigError(
                f"data.batch_size={self.batch_size} is larger than the {self.name} train split "
                f"({len(train_set)} samples)"
            )
        for split, dataset in (("train", train_set), ("validation", val_set), ("test", test_set)):
            check_finite_images(dataset, split, self.name)
        self.train_set, self.val_set, self.test_set = train_set, val_set, test_set

    # -- loaders -------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches (per-epoch permutation), or Poisson batches under ``poisson_sampling``: each
        sample joins each batch independently with rate ≈ batch_size / N (what DP-SGD's accountant assumes;
        the expected batch size stays data.batch_size). Sharded over ranks under torch.distributed (the
        trainer's own distributed sampler is off then: ``trainer=ddp``)."""
        self.setup("fit")
        if self.poisson_sampling:
            return poisson_loader(self.train_set, self.batch_size, self.seed, self.num_workers)
        rank, world_size = distributed_rank()
        if self.batch_size % world_size:
            raise ConfigError(f"data.batch_size={self.batch_size} (the global batch) must be divisible by the "
                              f"{world_size} training processes")
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size // world_size,
            sampler=EpochShuffleSampler(len(self.train_set), self.seed, rank, world_size),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        return self._loader(self.val_set, shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        self.setup("test")
        return self._loader(self.test_set, shuffle=False, batch_size=self.eval_batch_size)

    @property
    def sample_rate(self) -> float:
        """Probability that a sample is in a given batch (DP-SGD's q).

        Under Poisson sampling this is the rate Opacus' ``DPDataLoader`` (and so its accountant) uses,
        1 / ⌈N / batch_size⌉ — slightly below batch_size / N when N is not a multiple of the batch size.
        """
        self.setup("fit")
        if self.poisson_sampling:
            return 1.0 / math.ceil(len(self.train_set) / self.batch_size)
        return self.batch_size / len(self.train_set)

    # -- analysis helpers ----------------------------------------------------------------------
    def probe_batch(self, size: int | None = None) -> tuple[Tensor, Tensor]:
        """A fixed, seeded batch of held-out validation samples (the first ``size`` of one fixed draw).

        The same seed gives the same samples in every run, so leakage curves compare across runs.
        """
        self.setup("validate")
        size = self.probe_size if size is None else size
        if size > len(self.val_set):
            raise ConfigError(f"probe size {size} exceeds the {self.name} validation split ({len(self.val_set)})")
        if self._probe is None or self._probe[0].shape[0] < size:
            order = torch.randperm(len(self.val_set), generator=torch.Generator().manual_seed(self.seed + 1))
            samples = [self.val_set[int(i)] for i in order[: max(size, self.probe_size)]]
            xs = torch.stack([s[0] for s in samples])
            ys = torch.as_tensor([int(s[1]) for s in samples])
            self._probe = (xs, ys)
        return self._probe[0][:size].clone(), self._probe[1][:size].clone()

    def data_prior(self, full: bool | None = None) -> GaussianPrior:
        """The Gaussian prior of the training inputs in the model's input space (mean, covariance), formed once:
        :func:`pl_i2f.calibrated.prior_from_dataset` (full covariance up to a few thousand values, PPCA beyond)."""
        if getattr(self, "_data_prior", None) is None or full is not None:
            from pl_i2f.calibrated import prior_from_dataset

            self.setup("fit")
            self._data_prior = prior_from_dataset(self.train_set, full=full)
        return self._data_prior

    def normalize(self, x: Tensor) -> Tensor:
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalised images back to [0, 1] pixels, clamped."""
        mean, std = self._stats(x)
        return (x * std + mean).clamp(0.0, 1.0)

    def pixel_bounds(self) -> tuple[Tensor, Tensor]:
        """Per-channel lower/upper bounds of valid normalised pixels, shaped (C, 1, 1)."""
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (0 - mean) / std, (1 - mean) / std

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = (-1, 1, 1) if x.dim() == 3 else (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return mean, std

    def describe(self) -> dict:
        """Essentials for run configs and summaries."""
        self.setup("fit")
        return {
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "train_size": len(self.train_set),
            "val_size": len(self.val_set),
            "test_size": len(self.test_set),
            "batch_size": self.batch_size,
        }


def _split_fractions(val_fraction: float, test_fraction: float) -> None:
    for label, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 < value < 1:
            raise ConfigError(f"data.{label} must be in (0, 1), got {value}")
    if val_fraction + test_fraction >= 1:
        raise ConfigError("data.val_fraction + data.test_fraction must be < 1")


class DigitsDataModule(ImageDataModule):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 real images, 10 classes; no download),
    resized to ``size`` x ``size`` (bilinear), normalised, and split train/val/test stratified by class
    with a fixed seed."""

    name = "digits"
    num_classes = 10

    def __init__(self, size: int = 16, val_fraction: float = 0.15, test_fraction: float = 0.15, **kwargs):
        super().__init__(**kwargs)
        if size < 4:
            raise ConfigError(f"data.size must be >= 4, got {size}")
        _split_fractions(val_fraction, test_fraction)
        self.size = size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.input_shape = (1, size, size)
        self.mean, self.std = (0.0,), (1.0,)  # replaced from the train split in _build_splits

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        if self.size != 8:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        images = images.clamp(0, 1)
        labels = torch.tensor(digits.target, dtype=torch.long)
        index = list(range(len(labels)))
        held_out = self.val_fraction + self.test_fraction
        train_idx, rest_idx = train_test_split(
            index, test_size=held_out, stratify=labels.numpy(), random_state=self.seed
        )
        val_idx, test_idx = train_test_split(
            rest_idx,
            test_size=self.test_fraction / held_out,
            stratify=labels[rest_idx].numpy(),
            random_state=self.seed,
        )
        train_pixels = images[train_idx]
        self.mean = (float(train_pixels.mean()),)
        self.std = (float(train_pixels.std()),)
        normalised = self.normalize(images)
        return tuple(TensorDataset(normalised[idx], labels[idx]) for idx in (train_idx, val_idx, test_idx))


class FakeDataModule(ImageDataModule):
    """Deterministic generated images of any shape and class count, for tests and benchmarks.

    Each class has a fixed random template; a sample is its class template plus noise, so the data is
    learnable. Pixels are in [0, 1] and normalised with mean 0.5, std 0.25.
    """

    name = "fake"

    def __init__(
        self,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int = 10,
        num_samples: int = 512,
        noise: float = 0.15,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ConfigError(f"data.input_shape must be three positive sizes (C, H, W), got {list(input_shape)}")
        if num_classes < 2:
            raise ConfigError(f"data.num_classes must be >= 2, got {num_classes}")
        _split_fractions(val_fraction, test_fraction)
        if num_samples * min(val_fraction, test_fraction) < 1:
            raise ConfigError(f"data.num_samples={num_samples} is too small for the requested splits")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes = int(num_classes)
        self.num_samples = int(num_samples)
        self.noise = noise
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.mean = (0.5,) * self.input_shape[0]
        self.std = (0.25,) * self.input_shape[0]

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        g = torch.Generator().manual_seed(self.seed)
        templates = torch.rand(self.num_classes, *self.input_shape, generator=g)
        labels = torch.arange(self.num_samples) % self.num_classes
        labels = labels[torch.randperm(self.num_samples, generator=g)]
        pixels = (templates[labels] + self.noise * torch.randn(self.num_samples, *self.input_shape, generator=g))
        dataset = TensorDataset(self.normalize(pixels.clamp(0, 1)), labels)
        n_val = max(1, round(self.val_fraction * self.num_samples))
        n_test = max(1, round(self.test_fraction * self.num_samples))
        n_train = self.num_samples - n_val - n_test
        return (
            Subset(dataset, range(n_train)),
            Subset(dataset, range(n_train, n_train + n_val)),
            Subset(dataset, range(n_train + n_val, self.num_samples)),
        )


# --- torchvision datasets ---------------------------------------------------------------------

_TORCHVISION = {
    # name: (torchvision class name, input shape, classes, mean, std)
    "mnist": ("MNIST", (1, 28, 28), 10, (0.1307,), (0.3081,)),
    "fashion_mnist": ("FashionMNIST", (1, 28, 28), 10, (0.2860,), (0.3530,)),
    "cifar10": ("CIFAR10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("CIFAR100", (3, 32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class TorchvisionDataModule(ImageDataModule):
    """MNIST, Fashion-MNIST, CIFAR-10/100 from torchvision. The validation split is carved from the
    official training set with a fixed seed; the official test set is the test split."""

    def __init__(self, dataset: str, root: str = "data", download: bool = True, val_size: int = 5000, **kwargs):
        super().__init__(**kwargs)
        if dataset not in _TORCHVISION:
            raise unknown_name("torchvision dataset", dataset, _TORCHVISION)
        self.name = dataset
        self.root = str(Path(root).expanduser())
        self.download = download
        if val_size < 1:
            raise ConfigError(f"data.val_size must be >= 1, got {val_size}")
        self.val_size = val_size
        self._class_name, self.input_shape, self.num_classes, self.mean, self.std = _TORCHVISION[dataset]

    def _open(self, train: bool) -> Dataset:
        import torchvision
        from torchvision import transforms

        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])
        cls = getattr(torchvision.datasets, self._class_name)
        root_existed = Path(self.root).exists()
        try:
            return cls(self.root, train=train, download=self.download, transform=transform)
        except Exception as exc:
            if not root_existed:  # a failed download leaves no directory the user did not have
                shutil.rmtree(self.root, ignore_errors=True)
            how = (
                "the download failed" if self.download else "download is off (data.download=false)"
            )
            raise DataUnavailableError(
                f"{self.name} files not found under {self.root!r} and {how} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                f"place the torchvision {self._class_name} files there, or set data.root to where they are"
            ) from None

    def prepare_data(self) -> None:
        self._open(train=True)
        self._open(train=False)

    def _build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        full_train = self._open(train=True)
        test = self._open(train=False)
        if self.val_size >= len(full_train):
            raise ConfigError(f"data.val_size={self.val_size} leaves no training data")
        order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(self.seed)).tolist()
        val = Subset(full_train, order[: self.val_size])
        train = Subset(full_train, order[self.val_size :])
        return train, val, test


DATAMODULES = {"digits": DigitsDataModule, "fake": FakeDataModule, **{k: TorchvisionDataModule for k in _TORCHVISION}}


def build_datamodule(name: str, **kwargs) -> ImageDataModule:
    """Build a registered datamodule by name (``digits``, ``fake``, ``mnist``, ``cifar10`` …)."""
    if name not in DATAMODULES:
        raise unknown_name("dataset", name, DATAMODULES)
    if DATAMODULES[name] is TorchvisionDataModule:
        return TorchvisionDataModule(dataset=name, **kwargs)
    check_options(DATAMODULES[name], kwargs, f"dataset {name!r}", forwards_to=ImageDataModule)
    return DATAMODULES[name](**kwargs)


def steps_per_epoch(datamodule: ImageDataModule) -> int:
    """Optimizer steps per epoch (expected, under Poisson sampling)."""
    datamodule.setup("fit")
    return math.ceil(len(datamodule.train_set) / datamodule.batch_size)

"""Reconstruction metrics: conventions (de-normalised [0,1], per-image PSNR, torchmetrics SSIM) and matching."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from pl_i2f import metrics as M
from pl_i2f.data import build_datamodule
from pl_i2f.errors import ConfigError
from pl_i2f.metrics import PSNR_CAP, match, per_image_metrics, reconstruction_metrics, to_unit_range


@pytest.fixture(scope="module")
def batch():
    dm = build_datamodule("digits")
    x, _ = dm.probe_batch(4)
    noisy = x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return dm, x, noisy


def test_perfect_reconstruction(batch):
    dm, x, _ = batch
    out = reconstruction_metrics(x, x, denormalize=dm.denormalize)
    assert out == {"mse": 0.0, "rmse": 0.0, "psnr": PSNR_CAP, "ssim": pytest.approx(1.0, abs=1e-6)}


def test_matched_metrics_are_invariant_to_reconstruction_order(batch):
    dm, x, noisy = batch
    base = reconstruction_metrics(noisy, x, denormalize=dm.denormalize)
    for seed in range(3):
        perm = torch.randperm(4, generator=torch.Generator().manual_seed(seed))
        assert reconstruction_metrics(noisy[perm], x, denormalize=dm.denormalize) == pytest.approx(base, rel=1e-6)
    shuffled = noisy[torch.tensor([1, 2, 3, 0])]
    assert reconstruction_metrics(shuffled, x, denormalize=dm.denormalize, matched=False)["mse"] > 2 * base["mse"]


def test_match_recovers_a_known_permutation(batch):
    dm, x, noisy = batch
    perm = torch.tensor([3, 0, 2, 1])
    recon = to_unit_range(noisy[perm], dm.denormalize)
    order = match(recon, to_unit_range(x, dm.denormalize))
    assert torch.equal(recon[order], to_unit_range(noisy, dm.denormalize))
    per = per_image_metrics(noisy[perm], x, denormalize=dm.denormalize)
    assert torch.equal(per["order"], order)


def test_psnr_is_per_image_then_mean_and_rmse_is_root_mse(batch):
    dm, x, noisy = batch
    r, o = to_unit_range(noisy, dm.denormalize), to_unit_range(x, dm.denormalize)
    mse_i = (r - o).pow(2).flatten(1).mean(1)
    out = reconstruction_metrics(noisy, x, denormalize=dm.denormalize, matched=False)
    assert out["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse_i)).mean()), rel=1e-5)
    assert out["psnr"] != pytest.approx(float(10 * torch.log10(1 / mse_i.mean())), rel=1e-4)  # not batch PSNR
    assert out["mse"] == pytest.approx(float(mse_i.mean()), rel=1e-6)
    assert out["rmse"] == pytest.approx(math.sqrt(out["mse"]))
    ssim = structural_similarity_index_measure(r, o, data_range=1.0)
    assert out["ssim"] == pytest.approx(float(ssim), rel=1e-5)


def test_denormalize_and_mean_std_agree_and_images_are_clamped(batch):
    dm, x, noisy = batch
    a = reconstruction_metrics(noisy, x, denormalize=dm.denormalize)
    b = reconstruction_metrics(noisy, x, mean=dm.mean, std=dm.std)
    assert a == pytest.approx(b, rel=1e-6)
    wild = torch.full((1, 1, 16, 16), 5.0)
    assert float(to_unit_range(wild).max()) == 1.0
    ones = torch.ones(1, 1, 16, 16)
    assert reconstruction_metrics(wild, ones)["mse"] == 0.0  # clamped to [0, 1] before comparing


def test_single_image_without_batch_dimension(batch):
    dm, x, noisy = batch
    single = reconstruction_metrics(noisy[0], x[0], denormalize=dm.denormalize)
    as_batch = reconstruction_metrics(noisy[:1], x[:1], denormalize=dm.denormalize)
    assert single == pytest.approx(as_batch)


def test_bad_inputs_raise_config_errors(batch):
    dm, x, noisy = batch
    with pytest.raises(ConfigError, match="differs"):
        reconstruction_metrics(noisy[:3], x)
    with pytest.raises(ConfigError, match="either denormalize or mean/std"):
        reconstruction_metrics(noisy, x, denormalize=dm.denormalize, mean=dm.mean, std=dm.std)
    with pytest.raises(ConfigError, match="larger than 5x5"):
        reconstruction_metrics(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4))


def test_lpips_is_skipped_with_a_note_when_weights_are_absent(batch, tmp_path, monkeypatch):
    dm, x, noisy = batch
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache: nothing local
    monkeypatch.setattr(M, "_LPIPS_NOTED", set())
    with pytest.warns(UserWarning, match="LPIPS skipped"):
        out = reconstruction_metrics(noisy, x, denormalize=dm.denormalize, lpips=True)
    assert set(out) == {"mse", "rmse", "psnr", "ssim"}

"""No credential from the environment ends up in a run's files (configs, summaries, logs, W&B offline run)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra

from conftest import ROOT

SECRETS = {
    "WANDB_API_KEY": "fakewandbkey0123456789abcdef0123456789abcd",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-Zq8vX2",
    "HF_TOKEN": "hf_fakeTokenForTheSecretsTest",
    "GITHUB_TOKEN": "ghp_fakeTokenForTheSecretsTest",
    "PL_I2F_TEST_PASSWORD": "fake-password-9f3c",
}


def test_environment_credentials_are_not_written_into_run_files(tmp_path: Path, monkeypatch, capsys):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", [
        str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", "logger=many", "callbacks=default",
        "~callbacks.i2f_monitor", "~callbacks.progress_bar", "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "data=fake", "data.input_shape=[1,6,6]", "data.num_samples=100", "data.probe_size=4", "model=mlp",
        "model.hidden=[8]", "defense=dpsgd", "data.batch_size=16",
    ])
    monkeypatch.chdir(ROOT)
    GlobalHydra.instance().clear()
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")  # python train.py ..., in this process
    GlobalHydra.instance().clear()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"summary.json", "config.yaml", "last.ckpt"} <= names, names  # the run wrote what it should
    assert any(p.suffix == ".wandb" for p in files), names
    leaks = [(p, name) for p in files for name, value in SECRETS.items() if value.encode() in p.read_bytes()]
    assert not leaks, leaks

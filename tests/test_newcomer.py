"""What a new user trips over first: each mistake ends in one line that says what to do."""

from __future__ import annotations

import hydra
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from test_bad_input import _assert_no_run_left, _cli_in_process

from pl_i2f.errors import one_line, unexpected_argument
from pl_i2f.report import main as report_main


def test_unknown_trainer_argument_names_the_closest_valid_one(tmp_path, monkeypatch, capsys):
    # `+trainer.max_epoch=1` is what Hydra's own "Could not override" message suggests for the typo
    code, err = _cli_in_process(tmp_path, ["+trainer.max_epoch=1"], monkeypatch, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == ["error: unknown argument trainer.max_epoch: Trainer takes no argument 'max_epoch'; did you "
                     "mean trainer.max_epochs?"], err
    assert "TypeError" not in err and "Traceback" not in err
    _assert_no_run_left(tmp_path)


def test_unknown_argument_without_a_close_name_lists_the_valid_ones():
    cfg = OmegaConf.create({"cb": {"_target_": "pl_i2f.rng.analysis_generator", "zzz": 1}})
    with pytest.raises(Exception) as info:
        hydra.utils.instantiate(cfg.cb)
    message = one_line(info.value)
    assert message.startswith("unknown argument cb.zzz: analysis_generator takes no argument 'zzz'; valid: ")
    assert unexpected_argument("some other error") is None


def test_a_text_file_as_ckpt_path_is_not_a_checkpoint(tmp_path, monkeypatch, capsys):
    notes = tmp_path / "notes.ckpt"
    notes.write_text("my notes about the run\n")
    code, err = _cli_in_process(tmp_path, [f"ckpt_path={notes}"], monkeypatch, capsys)
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and f"ckpt_path {notes} is not a checkpoint (a text file starting 'my notes" in lines[0]
    assert "KeyError" not in err
    _assert_no_run_left(tmp_path)


def test_binary_garbage_as_ckpt_path_is_not_a_checkpoint(tmp_path):
    from pl_i2f.checkpoint import load_checkpoint
    from pl_i2f.errors import CheckpointError

    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(bytes(range(7, 40)))  # not text: the unpickler's own complaint, on one line
    with pytest.raises(CheckpointError, match=r"cannot be read as a PyTorch checkpoint \(UnpicklingError"):
        load_checkpoint(junk)
    junk.write_bytes(b"'\n" + bytes(range(128, 256)))  # a printable first line, binary after it: still not text
    with pytest.raises(CheckpointError, match=r"cannot be read as a PyTorch checkpoint"):
        load_checkpoint(junk)
    blank = tmp_path / "blank.ckpt"
    blank.write_text("\n\n  \n")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(blank)
    assert "a text file" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("make", "message"), [
    (lambda tmp: tmp / "no" / "such" / "run", "error: no such folder: "),
    (lambda tmp: (tmp / "summary.txt").write_text("x") and tmp / "summary.txt", "is a file; give a run or"),
])
def test_report_on_a_missing_folder_says_so(tmp_path, capsys, make, message):
    root = make(tmp_path)
    with pytest.raises(SystemExit) as info:
        report_main([str(root)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and str(root) in err and "summary.json" not in err


# -- anisotropic: the checkpoint carries the weights of the last refresh, not the directions ----------------
# 4 steps per epoch, a refresh every 3: the epoch-1 checkpoint (step 4) comes after the refresh of step 3, so a
# resume from it must rebuild those directions to continue bit for bit
ANISOTROPIC_RUN = [
    "trainer.max_epochs=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
    "trainer.deterministic=true", "logger=none", "callbacks=default", "~callbacks.i2f_monitor",
    "~callbacks.progress_bar", "data=fake", "data.input_shape=[1,6,6]", "data.num_samples=200",
    "data.batch_size=30", "data.probe_size=4", "trainer.limit_train_batches=4", "model=mlp", "model.hidden=[8]",
    "optim=sgd", "optim.lr=0.05", "defense=anisotropic", "defense.sigma=0.05", "defense.reference_size=2",
    "defense.refresh_every=3", "seed=7",
]


class CrashAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def test_anisotropic_checkpoint_has_no_directions_and_resumes_bitwise(tmp_path):
    import train
    from conftest import compose_config
    from pl_i2f.checkpoint import load_checkpoint

    whole = tmp_path / "whole"
    train.run(compose_config(ANISOTROPIC_RUN, whole))
    last = load_checkpoint(whole / "checkpoints" / "last.ckpt")
    state = last["defense"]["anisotropic"]
    assert "vectors" not in state and "eigenvalues" not in state
    assert state["refreshed_at"] == 6 and set(state["refresh_weights"]) == {
        k[len("model."):] for k in last["state_dict"] if k.startswith("model.")}

    crashed = tmp_path / "crashed"
    crash = ["+callbacks.crash._target_=test_newcomer.CrashAt", "+callbacks.crash.step=5"]
    with pytest.raises(RuntimeError, match="simulated crash at step 5"):
        train.run(compose_config([*ANISOTROPIC_RUN, *crash], crashed))
    epoch_1 = load_checkpoint(crashed / "checkpoints" / "last.ckpt")
    assert epoch_1["global_step"] == 4 and epoch_1["defense"]["anisotropic"]["refreshed_at"] == 3
    resumed = tmp_path / "resumed"
    train.run(compose_config([*ANISOTROPIC_RUN, f"ckpt_path={crashed / 'checkpoints' / 'last.ckpt'}"], resumed))
    resumed = load_checkpoint(resumed / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == last["global_step"] == 8
    for key, value in last["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_report_says_a_run_without_noise_gives_its_input_away(tmp_path, capsys):
    import json

    from pl_i2f.report import PANELS, load_runs

    for name, leakage in (("none", 0.0), ("gaussian", 0.2)):
        (tmp_path / name).mkdir()
        final = {"val/acc": 0.9, "leakage/expected_pixel_rmse": leakage}
        (tmp_path / name / "summary.json").write_text(json.dumps({"final": final, "defense": {"name": name}}))
    runs = {r.defense: r for r in load_runs(tmp_path)}
    assert runs["none"].leakage == 0 and runs["gaussian"].leakage == 0.2
    report_main([str(tmp_path), "--wandb", "off"])
    table = (tmp_path / "tradeoff.md").read_text()
    assert "| none | none | 0.9 | — | 0 (no noise: the gradient gives the input away) |" in table
    assert "| gaussian | gaussian | 0.9 | — | 0.2 |" in table
    assert "[0,1] pixels" in PANELS[0][1] and "without noise" in PANELS[0][1]


# -- the autopilot says whether the target was met and why σ is not the required one ------------------------
def test_why_sigma_differs_names_each_reason():
    from callbacks.autopilot import WHY_SIGMA_DIFFERS, why_sigma_differs
    from pl_i2f.autopilot import Decision

    def decision(**kw):
        return Decision(**{"measured_step": 10, "effective_step": 11, "sigma_measured": 1.0, "sigma": 2.0,
                           "sigma_required": 2.0, **kw})

    assert why_sigma_differs(decision()) == ""
    assert why_sigma_differs(decision(sigma=1.5, limited_by="rate")) == "rate"
    assert why_sigma_differs(decision(sigma=1.0, applied=False)) == "recorded_only"  # the final evaluation
    assert why_sigma_differs(decision(sigma=1.0, applied=False, limited_by="too_few_probes")) == "too_few_probes"
    assert why_sigma_differs(decision(sigma=3.0)) == "planned"  # memory / extrapolation above the requirement
    assert why_sigma_differs(decision(measured_step=-1, sigma=4.0, limited_by="epsilon_cap")) == "epsilon_cap"
    assert {"rate", "sigma_min", "sigma_max", "epsilon_cap", "too_few_probes"} <= set(WHY_SIGMA_DIFFERS)


def test_autopilot_logs_target_met_and_why_sigma_differs(tmp_path, caplog):
    import logging

    from test_autopilot import DIGITS

    import train
    from conftest import compose_config

    with caplog.at_level(logging.INFO):
        metrics = train.run(compose_config([*DIGITS, "defense=gaussian", "trainer.max_epochs=1",
                                            "trainer.limit_train_batches=12"], tmp_path))
    assert metrics["autopilot/target_met"] in (0.0, 1.0)
    flags = {k: v for k, v in metrics.items() if k.startswith("autopilot/limited_by/")}
    assert len(flags) == 7 and sum(flags.values()) <= 1
    # the last decision is the final evaluation's, recorded only: σ is not set from it
    assert flags["autopilot/limited_by/recorded_only"] == 1.0
    line = next(r.getMessage() for r in caplog.records if "last measurement (step" in r.getMessage())
    assert "target 20 dB" in line and ("met" in line) and "nothing left to apply it to" in line

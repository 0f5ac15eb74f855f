"""Every ``python train.py`` command of the README's "Two commands" and "Usage" sections, run as a user would
(from a fresh working directory, the repository's train.py) with only shortening overrides added: one epoch of
two batches, a 4-sample probe, short attacks. A command the README marks with ``# needs …`` (data files, a GPU)
is skipped here. A README command that fails is a failing test.

The commands run one after another in one helper process (``readme_driver.py``: each exactly as
``python train.py …`` runs, via ``runpy``), so torch and Lightning are imported once for all of them.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

README = ROOT / "README.md"

# shortening only: fewer epochs/batches/probes/attack iterations, nothing that changes what a command does
SHORTEN = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "data.probe_size=4",
    "attack.iterations=5",
]
# notices every run used to print that say nothing about the user's run (silenced where they arise)
NOISE = ["litlogger", "litmodels", "anonymous setting", "LeafSpec", "torch.jit.script", "Full backward hook"]
SHORTEN_AUDIT = ["callbacks.attack_audit.n_samples=1"]
# the anisotropic defense's directions come from J on a reference batch: 8 digits cost minutes under load
SHORTEN_ANISOTROPIC = ["defense.reference_size=2"]


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end > 0 else None]


def readme_commands() -> list[tuple[str, list[str], str | None]]:
    """``(id, argv after train.py, needs)`` for each ``python train.py`` line of the two sections."""
    text = README.read_text()
    commands = []
    for heading in ("## Two commands", "## Usage"):
        for block in re.findall(r"```bash\n(.*?)```", _section(text, heading), flags=re.S):
            for line in block.splitlines():
                match = re.search(r"python train\.py(.*?)(?:\s+#\s*(.*))?$", line)
                if not match:
                    continue
                argv = shlex.split(match.group(1))
                comment = match.group(2) or ""
                needs = comment if comment.startswith("needs") else None
                commands.append((" ".join(argv) or "(default)", argv, needs))
    return commands


COMMANDS = readme_commands()
DEFAULT_ID = "(default)"


def test_the_readme_has_the_commands_this_module_runs():
    ids = [c[0] for c in COMMANDS]
    assert DEFAULT_ID in ids and len(ids) >= 12
    assert any(argv[:1] == ["-m"] or "hparams_search=" in " ".join(argv) for _, argv, _ in COMMANDS)
    assert any("<run>" in " ".join(argv) for _, argv, _ in COMMANDS)


def _shortened(argv: list[str]) -> list[str]:
    extra = [*SHORTEN, *(SHORTEN_AUDIT if "callbacks=audit" in argv else []),
             *(SHORTEN_ANISOTROPIC if "defense=anisotropic" in argv else [])]
    return [*argv, *extra]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    """Run every runnable README command once; the resume command runs where the default run left its
    checkpoint (the README's ``<run>``)."""
    root = tmp_path_factory.mktemp("readme")
    plan = []
    for index, (cid, argv, needs) in enumerate(COMMANDS):
        if needs:
            continue
        resumes = any("<run>" in a for a in argv)
        cwd = root / ("cmd_default" if resumes or cid == DEFAULT_ID else f"cmd_{index:02d}")
        plan.append({"id": cid, "cwd": str(cwd), "argv": _shortened(argv), "after_default": resumes})
    # the default run first, so its checkpoint exists for the resume command
    plan.sort(key=lambda item: (item["id"] != DEFAULT_ID, item["after_default"]))
    (root / "plan.json").write_text(json.dumps(plan))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("readme_driver.py")), str(root / "plan.json"),
         str(root / "results.json")],
        cwd=root, env=env, capture_output=True, text=True, timeout=540,
    )
    assert (root / "results.json").exists(), proc.stderr[-3000:]
    found = json.loads((root / "results.json").read_text())
    return {cid: {**r, "cwd": Path(next(p["cwd"] for p in plan if p["id"] == cid))} for cid, r in found.items()}


def _swept_values(argv: list[str]) -> int:
    """How many jobs a sweep command launches: the product of its comma lists (or of its hparams_search's)."""
    from omegaconf import OmegaConf

    lists = [a.split("=", 1)[1] for a in argv if "," in a]
    for a in argv:
        if a.startswith("hparams_search="):
            search = ROOT / "conf" / "hparams_search" / f"{a.split('=', 1)[1]}.yaml"
            params = OmegaConf.load(search).hydra.sweeper.params
            lists += [str(v) for v in params.values()]
    count = 1
    for values in lists:
        count *= len(values.split(","))
    return count


def _job_dirs(cwd: Path) -> list[Path]:
    """The folders of the runs a command made under its working directory (one per multirun job)."""
    return sorted(p.parent for p in (cwd / "logs").rglob(".hydra"))


@pytest.mark.parametrize(("cid", "argv", "needs"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_readme_command_works(results, cid, argv, needs):
    if needs:
        pytest.skip(f"the README says this {needs}")
    result = results[cid]
    assert result["returncode"] == 0, f"`python train.py {cid}` failed:\n{result['output']}"
    assert "Traceback" not in result["output"], result["output"]
    assert not [n for n in NOISE if n in result["output"]], result["output"]
    jobs = _job_dirs(result["cwd"])
    assert jobs, f"no run folder under {result['cwd']}"
    for job in jobs:
        # every job: the console log in train.log, the resolved config beside Hydra's
        log = (job / "train.log").read_text()
        assert "pl_i2f run summary" in log, f"{job}/train.log:\n{log[-2000:]}"
        resolved = (job / ".hydra" / "resolved_config.yaml").read_text()
        assert "${" not in resolved and "threat_model:" in resolved
    multirun = argv[:1] == ["-m"] or any(a.startswith("hparams_search=") for a in argv)
    if multirun:
        # one job per swept value, each with its own summary and W&B run
        values = _swept_values(argv)
        job_folders = [j for j in jobs if "multiruns" in j.parts]
        assert len(job_folders) == values, jobs
        assert all((j / "summary.json").exists() and list((j / "wandb").glob("offline-run-*"))
                   for j in job_folders)
    if "defense=dpsgd" in argv:
        assert "privacy/epsilon" in result["output"]
    if "callbacks=audit" in argv:
        # one epoch < every_n_epochs: the audit still runs, after the last epoch, and says what it does
        assert "AttackAudit: sample 1/1 done" in result["output"], result["output"]

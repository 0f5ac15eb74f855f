"""Every command line of the README's ``bash`` blocks that runs a program of this repository — ``python train.py``,
``python study.py``, ``python -m pl_i2f.report``, ``python -m pl_i2f.studies.schedule_search`` — run as a user
would (from a fresh working directory) with only shortening overrides appended: one epoch of two batches, a
4-sample probe, short attacks, a study's smoke settings, a search's first trials, an experiment grid's
seconds-long ``<name>_smoke`` version (the README names it as such). A command that needs what CI lacks (a
``# needs …`` comment, a GPU, SLURM) is skipped with the reason; so are the benchmarks (minutes each, run by
hand) and the install/lint/test lines (this suite is the test). A README command that fails — non-zero exit or
a traceback — is a failing test.

The commands run one after another in one helper process (``readme_driver.py``: each exactly as the shell runs
it, via ``runpy``), so torch and Lightning are imported once for all of them. A command that reads an earlier
one's output (``<run>``, ``<date>_<time>``) runs in that command's working directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF, ROOT

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
# a resume trains one epoch more than the run it resumes, so it does resume something
SHORTEN_RESUME = ["trainer.max_epochs=2"]
# an Optuna search: its first two trials; the seeds rerun: one seed
SHORTEN_OPTUNA = ["hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=1"]
SHORTEN_SEEDS = ["hydra.sweeper.params.seed=1"]
# a study: its smoke settings (the user's own params stay, except the sample count)
SHORTEN_STUDY = ["study.smoke=true"]
SMOKE_SAMPLES = "study.params.samples=3"

# what a command needs that CI lacks (matched in the command line) → the reason it is skipped
NEEDS = {
    "hydra/launcher=slurm": "needs a SLURM cluster",
    "trainer=gpu": "needs a GPU",
    "trainer.devices=4": "needs 4 GPUs",
}
PROGRAMS = r"python (train\.py|study\.py|-m pl_i2f\.[\w.]+)"


@dataclass
class Command:
    line: str  #: the README's command line (continuations joined), as the id
    program: str  #: ``train.py``, ``study.py`` or ``-m <module>``
    argv: list[str]
    skip: str | None = None  #: why it does not run here
    shortened: list[str] = field(default_factory=list)


def _lines(text: str) -> list[str]:
    """The command lines of the README's ``bash`` blocks, backslash continuations joined, comments kept."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = ""
        for raw in block.splitlines():
            code = raw.partition("  #")[0]
            if code.rstrip().endswith("\\"):
                joined += code.rstrip()[:-1].strip() + " "
                continue
            lines.append((joined + raw.strip()).strip())
            joined = ""
    return [line for line in lines if line and not line.startswith("#")]


def readme_commands() -> list[Command]:
    commands = []
    for line in _lines(README.read_text()):
        match = re.search(PROGRAMS + r"(.*?)(?:\s+#\s*(.*))?$", line)
        if not match:
            continue  # pip, pytest, ruff, benchmarks: not a program of the package's CLI
        program, rest, comment = match.group(1), match.group(2), match.group(3) or ""
        argv = shlex.split(rest)
        skip = comment if comment.startswith("needs") else next((why for key, why in NEEDS.items() if key in line),
                                                                 None)
        commands.append(Command(f"{program} {rest.strip()}".strip(), program, argv, skip))
    return commands


def _config(group: str, name: str) -> dict:
    path = CONF / group / f"{name}.yaml"
    return OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else {}


def _shortened(command: Command) -> list[str]:
    argv = command.argv
    if command.program == "study.py":
        extra = [*SHORTEN_STUDY, *([SMOKE_SAMPLES] if any("study.params.samples=" in a for a in argv) else [])]
        return [*argv, *(a for a in extra if a not in argv)]
    if command.program != "train.py":
        return argv
    audit = "callbacks=audit" in argv or "experiment=defense_comparison" in argv  # that grid audits every job
    extra = [*SHORTEN, *(SHORTEN_AUDIT if audit else []),
             *(SHORTEN_ANISOTROPIC if "defense=anisotropic" in argv else []),
             *(SHORTEN_RESUME if any(a.startswith("ckpt_path=") for a in argv) else [])]
    shortened = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "experiment" and not value.endswith("_smoke") and (CONF / key / f"{value}_smoke.yaml").exists():
            arg = f"{arg}_smoke"  # a grid of runs → its seconds-long version
        elif key == "hparams_search":
            sweeper = _config(key, value).get("hydra", {}).get("sweeper", {})
            if "n_trials" in sweeper and sweeper["n_trials"] > 3:
                extra += SHORTEN_OPTUNA
            elif "seed" in sweeper.get("params", {}) and len(str(sweeper["params"]["seed"]).split(",")) > 1:
                extra += SHORTEN_SEEDS
        shortened.append(arg)
    return [*shortened, *(a for a in extra if a not in shortened)]


def _placeholder(argv: list[str]) -> bool:
    return any(re.search(r"<[^>/]+>", a) for a in argv)


COMMANDS = readme_commands()
for _command in COMMANDS:
    _command.shortened = _shortened(_command)
DEFAULT_ID = "train.py"


def _key(command: Command) -> str:
    return json.dumps([command.program, command.shortened])


def test_the_readme_has_the_commands_this_module_runs():
    ids = [c.line for c in COMMANDS]
    assert DEFAULT_ID in ids and len(ids) >= 25
    assert {c.program for c in COMMANDS} >= {"train.py", "study.py", "-m pl_i2f.report",
                                              "-m pl_i2f.studies.schedule_search"}
    assert any(c.argv[:1] == ["-m"] or "hparams_search=" in " ".join(c.argv) for c in COMMANDS)
    assert any("<run>" in " ".join(c.argv) for c in COMMANDS)
    assert all(not c.skip for c in COMMANDS if c.program != "train.py")  # every study and report line runs


def test_continuation_lines_are_joined_and_comments_kept():
    text = "```bash\npython train.py a=1 \\\n    b=2      # needs X\n# a comment\npython study.py\n```\n"
    assert _lines(text) == ["python train.py a=1 b=2      # needs X", "python study.py"]


def _producer(command: Command, earlier: list[Command]) -> Command | None:
    """The earlier command whose output a placeholder command reads: for a resume, the run with the same
    options (the trainer's aside); otherwise the command just before it."""
    runnable = [c for c in earlier if not c.skip and not _placeholder(c.argv)]
    if any(a.startswith("ckpt_path=") for a in command.argv):
        same = [a for a in command.argv if not a.startswith(("ckpt_path=", "trainer."))]
        return next((c for c in reversed(runnable) if c.program == "train.py" and c.argv == same), None)
    return runnable[-1] if runnable else None


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    """Run every runnable README command once, in README order (an identical shortened command once); a
    placeholder command runs in the working directory of the command whose output it reads."""
    root = tmp_path_factory.mktemp("readme")
    plan, cwd_of = [], {}
    for index, command in enumerate(COMMANDS):
        key = _key(command)
        if command.skip or key in cwd_of:
            continue
        producer = _producer(command, COMMANDS[:index]) if _placeholder(command.argv) else None
        cwd_of[key] = cwd_of[_key(producer)] if producer else root / f"cmd_{index:02d}"
        plan.append({"id": key, "cwd": str(cwd_of[key]), "program": command.program, "argv": command.shortened})
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
    return {key: {**r, "cwd": cwd_of[key]} for key, r in found.items()}


def _swept_values(argv: list[str]) -> int:
    """How many jobs a sweep command launches: the product of its comma lists (those of the command line, else
    its experiment's or hparams_search's), or an Optuna search's trial count."""
    given = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if "=" in a}
    sweeper: dict = {}
    for group in ("experiment", "hparams_search"):
        if group in given:
            sweeper = _config(group, given[group]).get("hydra", {}).get("sweeper", {}) or sweeper
            parent = _config(group, given[group]).get("defaults", [None])[0]
            if not sweeper.get("params") and isinstance(parent, str):
                sweeper = _config(group, parent).get("hydra", {}).get("sweeper", {})
    if "n_trials" in sweeper:
        return int(given.get("hydra.sweeper.n_trials", sweeper["n_trials"]))
    lists = {key.removeprefix("hydra.sweeper.params."): value for key, value in given.items() if "," in value
             or key.startswith("hydra.sweeper.params.")}
    lists = {**{str(k): str(v) for k, v in (sweeper.get("params") or {}).items()}, **lists}
    count = 1
    for values in lists.values():
        count *= len(values.split(","))
    return count


def _logs_to_wandb(job: Path) -> bool:
    """Whether a job's resolved config builds a W&B logger (``logger=none`` can leave a search's
    ``logger.wandb.group`` behind, which builds nothing)."""
    wandb = (OmegaConf.load(job / ".hydra" / "resolved_config.yaml").get("logger") or {}).get("wandb") or {}
    return "_target_" in wandb


def _job_dirs(cwd: Path) -> list[Path]:
    """The folders of the runs a command made under its working directory (one per multirun job)."""
    return sorted(p.parent for p in (cwd / "logs").rglob(".hydra"))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first test runs every command (the module's fixture)
@pytest.mark.parametrize("command", COMMANDS, ids=[c.line for c in COMMANDS])
def test_readme_command_works(results, command: Command):
    if command.skip:
        pytest.skip(f"the README says this {command.skip}" if command.skip.startswith("needs")
                    else f"this {command.skip}")
    result = results[_key(command)]
    shown = f"python {command.program} {shlex.join(command.shortened)}"
    assert result["returncode"] == 0, f"`{shown}` failed:\n{result['output']}"
    assert "Traceback" not in result["output"], result["output"]
    assert not [n for n in NOISE if n in result["output"]], result["output"]
    argv = command.shortened
    if command.program == "study.py":
        name = next(a.split("=", 1)[1] for a in argv if a.startswith("study="))
        assert f"{name}: " in result["output"] and f"{name}.csv" in result["output"], result["output"]
        return
    if command.program != "train.py":  # a report or analysis of an earlier command's runs: its files
        assert re.search(r"\.(png|csv|json)", result["output"]), result["output"]
        return
    jobs = _job_dirs(result["cwd"])
    assert jobs, f"no run folder under {result['cwd']}"
    for job in jobs:
        # every job: the console log in train.log, the resolved config beside Hydra's
        log = (job / "train.log").read_text()
        assert "pl_i2f run summary" in log, f"{job}/train.log:\n{log[-2000:]}"
        resolved = (job / ".hydra" / "resolved_config.yaml").read_text()
        assert "${" not in resolved and "threat_model:" in resolved
    multirun = argv[:1] == ["-m"] or (any(a.startswith(("hparams_search=", "experiment=")) for a in argv)
                                      and _swept_values(argv) > 1)
    if multirun:
        # one job per swept value, each with its own summary and (where it logs to W&B) its W&B run
        values = _swept_values(argv)
        job_folders = [j for j in jobs if "multiruns" in j.parts]
        assert len(job_folders) == values, jobs
        assert all((j / "summary.json").exists() for j in job_folders)
        assert all(list((j / "wandb").glob("offline-run-*")) for j in job_folders if _logs_to_wandb(j))
    if "defense=dpsgd" in argv:
        assert "privacy/epsilon" in result["output"]
    if "callbacks=audit" in command.argv:
        # one epoch < every_n_epochs: the audit still runs, after the last epoch, and says what it does
        assert "AttackAudit: sample 1/1 done" in result["output"], result["output"]

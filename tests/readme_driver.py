"""Run README commands (``python train.py …``, ``python study.py …``, ``python -m pl_i2f.report …``) one after
another in this process, each exactly as the shell would run it (``runpy`` with ``__name__ == "__main__"`` and
``sys.argv`` set), each from its own working directory; the heavy imports are paid once. Used by
``test_readme_commands.py``.

    python tests/readme_driver.py plan.json results.json

``plan.json``: a list of ``{"id", "cwd", "program", "argv"}`` (``program``: a script of the repository root
such as ``train.py``, or ``-m <module>``); ``results.json``: for each id ``{"returncode", "output", "seconds"}``
(the command's stdout and stderr, last 6,000 characters; its wall time).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_command(program: str, argv: list[str], cwd: Path) -> tuple[int, str]:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    out = io.StringIO()
    old_cwd, old_argv, old_environ = os.getcwd(), sys.argv, dict(os.environ)
    code = 0
    module = program[3:] if program.startswith("-m ") else None
    try:
        os.chdir(cwd)
        sys.argv = [module or str(ROOT / program), *argv]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                if module:
                    runpy.run_module(module, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(str(ROOT / program), run_name="__main__")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # any crash is the command's failure: report it
                import traceback

                traceback.print_exc(file=out)
                code = 1
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
        _forget_distributed(old_environ)
    return code, out.getvalue()


def _forget_distributed(environ: dict[str, str]) -> None:
    """After a multi-process command (``trainer=ddp``): leave its process group and the variables Lightning set
    (``MASTER_PORT``, ``WORLD_SIZE`` …), as a fresh ``python`` process for the next command would."""
    from pl_i2f.sampling import leave_process_group

    leave_process_group()
    os.environ.clear()
    os.environ.update(environ)


def fill_placeholder(arg: str, cwd: Path) -> str:
    """The README's placeholders (``logs/train/runs/<run>/…``, ``logs/init_study/multiruns/<date>_<time>``) →
    the newest folder in that place under ``cwd`` (where an earlier command of the plan wrote it)."""
    match = re.search(r"([\w./-]*/)(<[^>/]+>(?:_<[^>/]+>)*)", arg)
    if not match:
        return arg
    runs = sorted(p.name for p in (cwd / match.group(1)).glob("*") if p.is_dir())
    return arg[: match.start(2)] + (runs[-1] if runs else "no-run-yet") + arg[match.end(2):]


def main(plan_path: str, results_path: str) -> None:
    # as `python train.py` does: the script's folder first on sys.path (this checkout's packages, not another
    # installed copy)
    sys.path.insert(0, str(ROOT))
    plan = json.loads(Path(plan_path).read_text())
    results = {}
    for item in plan:
        cwd = Path(item["cwd"])
        cwd.mkdir(parents=True, exist_ok=True)
        code, output = run_command(item["program"], [fill_placeholder(arg, cwd) for arg in item["argv"]], cwd)
        results[item["id"]] = {"returncode": code, "output": output[-6000:]}
        print(f"{item['id']}: exit {code}", flush=True)
        Path(results_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])

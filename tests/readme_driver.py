"""Run README commands (``python train.py …``) one after another in this process, each exactly as the shell
would run the script (``runpy`` with ``__name__ == "__main__"`` and ``sys.argv`` set), each from its own
working directory; the heavy imports are paid once. Used by ``test_readme_commands.py``.

    python tests/readme_driver.py plan.json results.json

``plan.json``: a list of ``{"id", "cwd", "argv"}``; ``results.json``: for each id ``{"returncode",
"output"}`` (the command's stdout and stderr, last 6,000 characters).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import sys
from pathlib import Path

TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"


def run_command(argv: list[str], cwd: Path) -> tuple[int, str]:
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    out = io.StringIO()
    old_cwd, old_argv = os.getcwd(), sys.argv
    code = 0
    try:
        os.chdir(cwd)
        sys.argv = [str(TRAIN_PY), *argv]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                runpy.run_path(str(TRAIN_PY), run_name="__main__")
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except BaseException:  # any crash is the command's failure: report it
                import traceback

                traceback.print_exc(file=out)
                code = 1
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
    return code, out.getvalue()


def _fill_run(arg: str, cwd: Path) -> str:
    """``<run>`` (the README's placeholder) → the newest run folder under ``cwd/logs/train/runs``."""
    if "<run>" not in arg:
        return arg
    runs = sorted((cwd / "logs" / "train" / "runs").glob("*"))
    return arg.replace("<run>", runs[-1].name if runs else "no-run-yet")


def main(plan_path: str, results_path: str) -> None:
    # as `python train.py` does: the script's folder first on sys.path (this checkout's packages, not another
    # installed copy)
    sys.path.insert(0, str(TRAIN_PY.parent))
    plan = json.loads(Path(plan_path).read_text())
    results = {}
    for item in plan:
        cwd = Path(item["cwd"])
        cwd.mkdir(parents=True, exist_ok=True)
        code, output = run_command([_fill_run(arg, cwd) for arg in item["argv"]], cwd)
        results[item["id"]] = {"returncode": code, "output": output[-6000:]}
        print(f"{item['id']}: exit {code}", flush=True)
        Path(results_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])

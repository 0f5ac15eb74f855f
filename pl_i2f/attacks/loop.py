"""The optimisation loop: restarts from fresh dummy data, Adam (with Inverting Gradients' step decay and
plateau stop) or L-BFGS (DLG's outer steps), the box projection, and the budgets that end an attack."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pl_i2f.attacks.config import AttackConfig
from pl_i2f.attacks.inputs import AttackInputs
from pl_i2f.attacks.objective import Objective
from pl_i2f.attacks.result import AttackResult, _Diverged, _Stop
from pl_i2f.gradients import eval_mode

#: The clock that ``max_seconds`` and :attr:`AttackResult.seconds` read. Tests replace it (``monkeypatch``) to
#: exercise the time budget without depending on how fast the machine is.
clock: Callable[[], float] = time.perf_counter


class _StepDecay:
    """Adam's learning rate: Geiping et al.'s step decay (×0.1 at 3/8, 5/8 and 7/8 of the iterations,
    as ``MultiStepLR``), where a plateau of the best objective brings the next decay forward; a plateau
    with no decay left means converged."""

    def __init__(self, optimizer: torch.optim.Optimizer, config: AttackConfig):
        n = config.iterations
        self.optimizer = optimizer
        self.base_lr = config.lr
        self.milestones = sorted({max(1, round(n * f)) for f in (3 / 8, 5 / 8, 7 / 8)}) if config.lr_schedule else []
        self.decays = 0
        self.patience = config.patience
        self.rtol = config.plateau_rtol
        self.best = self.reference = math.inf
        self.since_improvement = 0

    def _plateau(self, objective: float) -> bool:
        # as ReduceLROnPlateau's relative threshold: progress is measured from the best value at the
        # last improvement, so a slow but steady decline still counts
        self.best = min(self.best, objective)
        if not self.best >= self.reference * (1 - self.rtol):
            self.reference, self.since_improvement = self.best, 0
            return False
        self.since_improvement += 1
        return self.patience is not None and self.since_improvement >= self.patience

    def step(self, steps_done: int, objective: float) -> bool:
        """After optimizer step ``steps_done`` (1-based) whose objective was ``objective``: decay the lr
        when due; return True when the attack has converged."""
        plateau = self._plateau(objective)
        if self.decays < len(self.milestones) and (plateau or steps_done >= self.milestones[self.decays]):
            self.decays += 1
            for group in self.optimizer.param_groups:
                group["lr"] = self.base_lr * 0.1**self.decays
            self.reference, self.since_improvement = self.best, 0
            return False
        return plateau


class _Attack:
    """One attack's state: the optimisation loop with restarts and budgets around its :class:`Objective`."""

    def __init__(self, inputs: AttackInputs, config: AttackConfig):
        self.model = inputs.model
        self.param_list = list(inputs.params.values())
        self.target = inputs.target
        self.labels = inputs.labels
        self.shape = inputs.shape
        self.box_bounds = inputs.box_bounds
        self.bounds = inputs.bounds
        self.optimize_labels = inputs.optimize_labels
        self.config = config
        self.objective = Objective(inputs, config)
        self.generator = torch.Generator().manual_seed(int(config.seed))
        self.num_classes: int | None = None

    # -- dummy data --------------------------------------------------------------------------------
    def _init(self, ref: Tensor) -> Tensor:
        g = self.generator
        if self.config.init == "zeros":
            x = torch.zeros(self.shape)
        elif self.config.init == "randn":
            x = torch.randn(self.shape, generator=g)
        else:
            x = torch.rand(self.shape, generator=g)
        # drawn on the CPU generator then moved: the same seed gives the same init on every device
        x = x.to(device=ref.device, dtype=ref.dtype)
        if self.config.init == "rand" and self.bounds is not None:
            lo, hi = self.bounds
            x = lo + (hi - lo) * x
        return self._project(x)

    def _project(self, x: Tensor) -> Tensor:
        if self.box_bounds is None:
            return x
        lo, hi = self.box_bounds
        return torch.maximum(torch.minimum(x, hi), lo)

    # -- loop --------------------------------------------------------------------------------------
    def run(self, start: float, preset: str) -> AttackResult:
        cfg = self.config
        ref = self.param_list[0]
        hooks = self.objective.hook_batchnorm()
        self.start = start
        self.evaluations = 0
        total_iters = 0
        failed, reason, stop_reason = False, None, "budget_iterations"
        best: dict[str, Any] | None = None
        history: list[tuple[int, float]] = []
        bar = tqdm(total=cfg.iterations * cfg.restarts, desc=f"attack[{preset}]", disable=not cfg.progress,
                   leave=False)
        try:
            if not bool(torch.isfinite(self.target).all()):
                raise _Diverged("the released gradient contains NaN/inf")
            with eval_mode(self.model):
                if self.optimize_labels:
                    with torch.no_grad():
                        self.num_classes = self.model(torch.zeros(1, *self.shape[1:], device=ref.device,
                                                                  dtype=ref.dtype)).shape[-1]
                for restart in range(cfg.restarts):
                    trial = self._run_restart(restart, total_iters, history, bar)
                    total_iters += trial["iterations"]
                    if best is None or trial["total"] < best["total"]:
                        best = trial
                    stop_reason = trial["stop_reason"]
                    if trial["reason"] is not None:
                        failed, reason = True, trial["reason"]
                        break
                    if stop_reason in ("budget_evaluations", "budget_time", "callback"):
                        break  # whole-attack budgets: no further restarts
        except _Diverged as exc:  # the target itself was not finite: nothing was optimised
            failed, reason, stop_reason = True, str(exc), "diverged"
        finally:
            for h in hooks:
                h.remove()
            bar.close()
        if best is None:  # only when the target was not finite: return the (finite) initial dummy data
            x = self._init(ref)
            labels = self.labels if self.labels is not None else torch.zeros(self.shape[0], dtype=torch.long)
            best = {"x": x, "labels": labels, "match": math.inf, "total": math.inf, "restart": 0}
        return AttackResult(
            x=best["x"],
            labels=best["labels"].detach().to(torch.long),
            objective=float(best["total"]),
            gradient_distance=float(best["match"]),
            iterations=total_iters,
            seconds=clock() - start,
            evaluations=self.evaluations,
            failed=failed,
            reason=reason,
            stop_reason=stop_reason,
            restart=best["restart"],
            history=history,
        )

    def _check_budgets(self) -> None:
        """Raise :class:`_Stop` before an evaluation that the evaluation or time budget does not allow."""
        cfg = self.config
        if cfg.max_evaluations is not None and self.evaluations >= cfg.max_evaluations:
            raise _Stop("budget_evaluations")
        if cfg.max_seconds is not None and clock() - self.start > cfg.max_seconds:
            raise _Stop("budget_time")

    def _run_restart(self, restart: int, done: int, history: list, bar) -> dict[str, Any]:
        """One optimisation from fresh dummy data; returns its best finite iterate and why it stopped."""
        cfg = self.config
        x = self._init(self.param_list[0]).requires_grad_()
        init = x.detach().clone()
        label_logits = None
        if self.optimize_labels:
            label_logits = torch.randn(self.shape[0], self.num_classes, generator=self.generator)
            label_logits = label_logits.to(x).requires_grad_()
        variables = [x] if label_logits is None else [x, label_logits]
        best: dict[str, Any] = {"total": math.inf, "match": math.inf, "restart": restart}
        iteration = 0
        # The objective and input gradients at the last evaluated point, keyed by the variables' version
        # counters (every in-place change bumps them): torch's L-BFGS re-evaluates the point where its
        # previous step ended at the start of every step; the cache makes that repeat free.
        cache: dict[str, Any] = {"versions": None}

        def versions() -> tuple[int, ...]:
            return tuple(v._version for v in variables)

        def record(match: Tensor, total: Tensor) -> None:
            """Keep the best finite iterate; a non-finite objective or gradient ends the attack."""
            finite = torch.isfinite(total) & torch.isfinite(x.grad).all()
            if label_logits is not None:
                finite = finite & torch.isfinite(label_logits.grad).all()
            if not bool(finite):
                raise _Diverged(f"objective or its gradient became NaN/inf at iteration {done + iteration}")
            value = float(total)
            if value < best["total"]:
                best.update(total=value, match=float(match), x=x.detach().clone(),
                            labels=self._labels_now(label_logits))

        def closure() -> Tensor:
            if cache["versions"] == versions():
                for v, g in zip(variables, cache["grads"]):
                    v.grad = g.clone()
                return cache["total"]
            self._check_budgets()
            match, total = self.objective.evaluate(x, label_logits)
            self.evaluations += 1
            record(match, total)
            cache.update(versions=versions(), total=total, grads=[v.grad.clone() for v in variables])
            return total

        if cfg.optimizer == "adam":
            opt = torch.optim.Adam(variables, lr=cfg.lr)
            sched = _StepDecay(opt, cfg)
        else:
            opt = torch.optim.LBFGS(variables, lr=cfg.lr, max_iter=cfg.lbfgs_max_iter,
                                    max_eval=cfg.lbfgs_max_iter * 5 // 4,  # torch's default for max_eval
                                    tolerance_grad=cfg.lbfgs_tolerance_grad,
                                    tolerance_change=cfg.lbfgs_tolerance_change,
                                    history_size=cfg.lbfgs_history, line_search_fn=cfg.lbfgs_line_search)
            sched = None

        stop_reason, reason = "budget_iterations", None
        try:
            for iteration in range(cfg.iterations):
                if cfg.optimizer == "adam":
                    total = closure()
                    if cfg.signed:
                        x.grad.sign_()
                    opt.step()
                    if sched.step(iteration + 1, float(total)):
                        stop_reason = "converged"
                        break
                else:
                    before = versions()
                    total = opt.step(closure)
                    if versions() == before:
                        # No move: the gradient is below tolerance_grad or there is no descent direction
                        # left. The state is unchanged, so every further step would stop at the same place.
                        stop_reason = "converged"
                        break
                if self.box_bounds is not None:
                    with torch.no_grad():
                        x.copy_(self._project(x))
                bar.update(1)
                steps = done + iteration + 1
                if cfg.history_every and iteration % cfg.history_every == 0:
                    history.append((done + iteration, float(total)))
                    bar.set_postfix_str(f"objective {float(total):.3g}", refresh=False)
                if self._callback_says_stop(steps, total):
                    stop_reason = "callback"
                    break
            else:
                iteration = cfg.iterations
            if stop_reason in ("converged", "callback"):
                iteration += 1  # the step it stopped at counts
            # the last step's end point may not have been evaluated yet (free if it has)
            closure()
        except _Stop as stop:
            stop_reason = stop.args[0]
        except _Diverged as exc:
            reason, stop_reason = str(exc), "diverged"
        if "x" not in best:  # diverged at the very first evaluation: fall back to the (finite) init
            best.update(x=init, labels=self._labels_now(label_logits))
        return {**best, "iterations": iteration, "stop_reason": stop_reason, "reason": reason}

    def _callback_says_stop(self, steps: int, total: Tensor) -> bool:
        cfg = self.config
        if cfg.progress_callback is None or steps % cfg.progress_every:
            return False
        return bool(cfg.progress_callback(steps, float(total)))

    def _labels_now(self, label_logits: Tensor | None) -> Tensor:
        if label_logits is None:
            return self.labels.detach().clone()
        return label_logits.detach().argmax(dim=-1)

"""``TaskParamLogger``: what each task costs, as TensorBoard scalars every epoch."""
from __future__ import annotations

import lightning as L

__all__ = ["TaskParamLogger", "task_param_metrics"]


def task_param_metrics(pl_module) -> dict[str, float]:
    """``taps/<task>/{active_layers,task_params,task_params_fraction}`` and
    ``taps/total_params_multiple`` (base + all tasks' own parameters, shared ones once, in backbones)."""
    metrics = {}
    for task in pl_module.tasks:
        cost = pl_module.task_cost(task)
        metrics[f"taps/{task}/active_layers"] = float(cost["active_layers"])
        metrics[f"taps/{task}/task_params"] = float(cost["task_params"])
        metrics[f"taps/{task}/task_params_fraction"] = float(cost["fraction"])
    metrics["taps/total_params_multiple"] = pl_module.total_params_multiple()
    return metrics


class TaskParamLogger(L.Callback):
    """Logs :func:`task_param_metrics` at the end of every validation epoch (rank zero only;
    the values are identical on every rank), at the global step as Lightning logs epoch metrics,
    so that a budget run's per-step ``taps/<task>/task_params_fraction`` shares its axis."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = task_param_metrics(pl_module)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

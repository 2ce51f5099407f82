"""Experiment tracking: `training.report_to` passes through to the Trainer's integrations (tensorboard, mlflow,
wandb), for pretraining and every task. TensorBoard writes its event files into the run folder (`tensorboard/`);
mlflow and wandb read their own settings (MLFLOW_TRACKING_URI, WANDB_PROJECT, ...) as they do under the Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmft.errors import CmftError

TRACKERS = {"tensorboard": "tensorboard (or tensorboardX)", "mlflow": "mlflow", "wandb": "wandb"}


def trackers(report_to: str | list[str]) -> list[str]:
    """The integrations asked for, each checked to be installed (one line naming the package to install if not)."""
    from transformers.integrations import is_mlflow_available, is_tensorboard_available, is_wandb_available

    names = [] if report_to == "none" else [report_to] if isinstance(report_to, str) else list(dict.fromkeys(report_to))
    installed = {"tensorboard": is_tensorboard_available, "mlflow": is_mlflow_available, "wandb": is_wandb_available}
    for name in names:
        if not installed[name]():
            raise CmftError(f"training.report_to: {name} is not installed here; `pip install {name}` "
                            f"({TRACKERS[name]}), or report_to=none")  # fmt: skip
    return names


def tracking(report_to: str | list[str], run_dir: Path) -> tuple[list[str], list[Any]]:
    """(the Trainer's report_to, extra callbacks): TensorBoard gets a writer on `run_dir`/tensorboard."""
    names = trackers(report_to)
    callbacks = []
    if "tensorboard" in names:
        from transformers.integrations import TensorBoardCallback

        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboardX instead of tensorboard
            from tensorboardX import SummaryWriter
        callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(run_dir / "tensorboard"))))
    return [name for name in names if name != "tensorboard"], callbacks

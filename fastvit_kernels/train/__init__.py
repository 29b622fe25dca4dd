"""Training and evaluation on CIFAR-10: `fastvit-train`, `fastvit-eval`, `python -m fastvit_kernels.train`.

  cli.py          arguments, their checks, and train() / evaluate_checkpoint() as short lists of steps
  loop.py         the Run: epochs of steps, evaluation, log, checkpoints, curves
  checkpoint.py   atomic checkpoint writes, Ctrl-C that saves before it stops
  distributed.py  single process or torchrun
The data pipeline is fastvit_kernels/data.py.
"""

from ..data import DeviceLoader
from .checkpoint import GracefulStop, save_checkpoint
from .cli import build_parser, eval_main, evaluate_checkpoint, main, train
from .loop import Run, evaluate, lr_at

__all__ = [
    "DeviceLoader",
    "GracefulStop",
    "Run",
    "build_parser",
    "eval_main",
    "evaluate",
    "evaluate_checkpoint",
    "lr_at",
    "main",
    "save_checkpoint",
    "train",
]

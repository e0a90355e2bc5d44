"""Old import path of `MoEConfig`, kept only so checkpoints written before `models/surgery.py` was
split by job (issue 12) still unpickle: their hyperparameters name `lightning_moe.models.surgery.MoEConfig`.
New code imports from `lightning_moe.models` (the class lives in `upcycle.py`)."""

from .upcycle import MoEConfig

__all__ = ["MoEConfig"]

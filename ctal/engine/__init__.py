"""Training engine: building a run (:mod:`.build`), the loop (:mod:`.trainer`), evaluation and
reports (:mod:`.evaluation`), checkpoints, logging and distributed setup."""
from .evaluation import evaluate
from .trainer import Trainer

__all__ = ["Trainer", "evaluate"]

"""Training engine: the loop, evaluation, checkpoints, logging and distributed setup."""
from .trainer import Trainer, evaluate

__all__ = ["Trainer", "evaluate"]

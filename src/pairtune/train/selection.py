"""``train.select_best``: save the weights of the best evaluation instead of the last step's.

The main process keeps a CPU copy of the weights each time the eval split's primary metric (MRR@10) beats
every earlier evaluation (ties keep the earlier, shorter-trained weights). The copy travels in each checkpoint
(``best_weights.pt``), so a resumed run still knows the best weights it saw before the interruption. The
step-0 evaluation of the base model takes part: when training only hurts, the base model is what is saved.
Only the eval split is read for the choice; the test split stays unseen until the evaluate stage.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BEST_FILE = "best_weights.pt"


@dataclass
class BestWeights:
    step: int | None = None
    score: float = -math.inf
    weights: dict[str, torch.Tensor] | None = None

    def offer(self, model: torch.nn.Module, step: int, score: float) -> bool:
        """Keep ``model``'s weights when ``score`` beats the best so far; True when it did."""
        if not score > self.score:
            return False
        self.step, self.score = step, score
        self.weights = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
        return True

    def save(self, folder: Path) -> None:
        if self.weights is not None:
            torch.save({"step": self.step, "score": self.score, "weights": self.weights}, folder / BEST_FILE)

    @classmethod
    def load(cls, folder: Path) -> BestWeights:
        """The best weights a checkpoint carries; none when it was saved before any evaluation."""
        path = Path(folder) / BEST_FILE
        if not path.is_file():
            return cls()
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return cls(payload["step"], payload["score"], payload["weights"])

    def restore_into(self, model: torch.nn.Module, *, last_step: int) -> int:
        """Load the best weights into ``model`` (unless they are the last step's); the step they come from."""
        if self.weights is None:
            raise RuntimeError("train.select_best: no evaluation was recorded, so there is no best model")
        if self.step != last_step:
            model.load_state_dict(self.weights)
            log.info("train.select_best: saving step %d (eval %.4f), not the last step %d", self.step, self.score,
                     last_step)
        return self.step

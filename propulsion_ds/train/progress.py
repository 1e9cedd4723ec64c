"""Where a run is, as one dataclass: saved in every checkpoint, restored on resume."""
from __future__ import annotations

from dataclasses import asdict, dataclass

# Written by every checkpoint since the first release: a resume without them is refused.
REQUIRED = ("step", "epoch", "batch_in_epoch")


@dataclass
class TrainingProgress:
    step: int = 0                 # optimizer updates applied
    epoch: int = 0
    batch_in_epoch: int = 0       # this rank's micro-batches drawn in the current epoch
    # The data position: global samples drawn in the current epoch, all ranks together, so any
    # split of the same global batch reads it alike. None: a checkpoint from before it was kept
    # (run_data.data_position falls back to batch_in_epoch).
    samples_in_epoch: int | None = 0
    tokens_seen: int = 0          # real (non-pad) tokens of every applied update, all ranks
    skipped_batches: int = 0      # micro-batches dropped for a non-finite loss
    skipped_steps: int = 0        # optimizer updates discarded for a non-finite gradient

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for name in REQUIRED:
            setattr(self, name, state[name])
        # Counters added later default to 0 for checkpoints written before them.
        for name in ("tokens_seen", "skipped_batches", "skipped_steps"):
            setattr(self, name, state.get(name, 0))
        self.samples_in_epoch = state.get("samples_in_epoch")

"""What a run leaves behind: ``metrics.jsonl`` (one JSON object per epoch) and TensorBoard event files."""
from __future__ import annotations

import json
import math
from pathlib import Path


class RunRecords:
    """Appends epoch records to ``metrics.jsonl`` and scalars to TensorBoard (rank 0 only)."""

    def __init__(self, out_dir: Path, enabled: bool, purge_step: int | None = None):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge_step)

    def truncate(self, epochs_done: int) -> None:
        """Keep the first ``epochs_done`` records (a resumed run rewrites what came after its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        self.path.write_text("".join(line + "\n" for line in lines[:epochs_done]))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def epoch(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        self.scalars(record["epoch"], {f"epoch/{k}": v for k, v in record.items()
                                       if isinstance(v, (int, float)) and k != "epoch" and v is not None})
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(out_dir: str | Path) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

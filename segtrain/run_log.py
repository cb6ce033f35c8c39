"""What a run leaves for its user: TensorBoard event files and ``metrics.json``."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter


def plain(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null (strict JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


class RunLog:
    """TensorBoard writer (event files in the run dir itself) plus the ``metrics.json`` summary."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.writer = SummaryWriter(log_dir=str(self.run_dir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, 0)

    def flush(self) -> None:
        self.writer.flush()

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        path = self.run_dir / "metrics.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(plain(metrics), indent=2) + "\n")
        temporary.replace(path)  # readers never see a half-written file

    def close(self) -> None:
        self.writer.close()

"""metrics.csv: one row per progress report and per evaluation, continued across resumes."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Optional

from utils import write_file_atomic

COLUMNS = [
    "kind",  # "train" (a progress report) or "eval"
    "step", "elapsed_s", "tokens", "train_loss", "val_loss", "val_perplexity", "val_bits_per_char",
    "lr", "tokens_per_s", "mfu", "tflops", "rss_mb", "system_used_mb", "cuda_allocated_mb", "cuda_peak_mb",
    "skipped_steps",  # of a report: steps skipped (non-finite loss or gradient) since the one before
]


def read_metrics(path: Path) -> list[dict[str, str]]:
    """Return the rows of a metrics.csv as dicts of strings (empty cells are '')."""
    with open(path, newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def as_float(cell: str) -> Optional[float]:
    return float(cell) if cell not in ("", None) else None


class MetricsLog:
    """Appends rows to metrics.csv; a resumed run first drops rows newer than its checkpoint.

    Rows written after the checkpoint was saved describe steps the resumed run trains again,
    so keeping them would count those steps twice.
    """

    def __init__(self, path: Path, resume_step: Optional[int]):
        self.path = path
        if resume_step is not None and path.is_file():
            kept = [row for row in read_metrics(path) if int(row["step"]) <= resume_step]
            self._rewrite(kept)
        else:
            self._rewrite([])

    def _rewrite(self, rows: list[dict]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        write_file_atomic(self.path, lambda file: file.write(text.getvalue().encode()))

    def append(self, row: dict) -> None:
        """Append one row; unknown columns are an error, missing ones stay empty."""
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown metrics columns: {sorted(unknown)}")
        cells = {key: _format(value) for key, value in row.items()}
        with open(self.path, "a", newline="", encoding="utf-8") as file:
            csv.DictWriter(file, COLUMNS).writerow(cells)


def _format(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)

"""Redraw loss curves from metrics.csv: `python plot.py models/tiny [models/other ...]`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from cli import CliParser, run_cli
from errors import UserError
from metrics import read_metrics
from plotting import draw_loss_plot


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(description="Plot loss curves of one or more runs.", allow_abbrev=False)
    parser.add_argument("runs", nargs="+", help="run directories (or metrics.csv files)")
    parser.add_argument("--out", help="PNG to write (default: RUN/loss.png for one run, "
                                      "comparison.png for several)")
    parser.add_argument("--title", help="the figure's title")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def load_run(path: Path) -> tuple[str, list[dict]]:
    csv_path = path if path.suffix == ".csv" else path / "metrics.csv"
    if not csv_path.is_file():
        raise UserError(f"{csv_path} does not exist; give a run directory that holds a metrics.csv")
    rows = read_metrics(csv_path)
    if rows and not {"kind", "step", "train_loss", "val_loss", "lr"} <= set(rows[0]):
        raise UserError(f"{csv_path} is not a metrics.csv written by this trainer")
    if not rows:
        raise UserError(f"{csv_path} has no rows yet; train for at least log_interval steps")
    return csv_path.parent.name, rows


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    runs = [load_run(Path(run)) for run in args.runs]
    default = Path(args.runs[0]) / "loss.png" if len(runs) == 1 else Path("comparison.png")
    out = Path(args.out) if args.out else default
    if out.suffix.lower() != ".png":  # a slip such as `--out models/tiny/ckpt.pt` replaced the checkpoint
        raise UserError(f"--out {out} does not end in .png; the plot is a PNG, so name a .png file")
    draw_loss_plot(runs, out, args.title)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

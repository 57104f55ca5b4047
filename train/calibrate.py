"""Temperature scaling of the class logits, fitted on the validation fold (never on test).

A network trained with cross-entropy on ~500 images is usually over-confident; dividing the logits by one
scalar T > 1 fixes most of that without changing any prediction (argmax is unchanged). T minimises the
validation negative log-likelihood; a dense grid over log T is used rather than a gradient method because the
problem is one-dimensional, the grid is exact enough and it can never diverge.

    python -m train.calibrate --run train/runs/v1
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from busi_batch.metrics import expected_calibration_error


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true labels under softmax(logits / T)."""
    probs = softmax(logits, temperature)
    return float(-np.mean(np.log(probs[np.arange(labels.size), labels] + 1e-12)))


@dataclass
class Calibration:
    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    n: int


def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, low: float = 0.05, high: float = 20.0, steps: int = 2001
) -> Calibration:
    """T in [low, high] (log-spaced grid) minimising the NLL; ECE before / after via busi_batch.metrics."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=int)
    grid = np.exp(np.linspace(np.log(low), np.log(high), steps))
    losses = np.array([nll(logits, labels, t) for t in grid])
    t = float(grid[int(np.argmin(losses))])
    return Calibration(
        temperature=t,
        nll_before=nll(logits, labels, 1.0),
        nll_after=float(losses.min()),
        ece_before=expected_calibration_error(softmax(logits), labels),
        ece_after=expected_calibration_error(softmax(logits, t), labels),
        n=int(labels.size),
    )


def calibrate_run(run: Path) -> Calibration:
    """Fit T on the run's ``val_logits.npz`` (written by train.fit for the best checkpoint)."""
    with np.load(Path(run) / "val_logits.npz") as data:
        return fit_temperature(data["logits"], data["labels"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(asdict(calibrate_run(args.run)), indent=2))


if __name__ == "__main__":
    main()

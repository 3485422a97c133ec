"""The history of DreamBench evaluations and what counts as a regression.

Every evaluation appends one row to ``EVAL_ROOT/history.parquet``: run id, time, model or checkpoint and
its step, a fingerprint of the settings that make two runs comparable (the benchmark's subjects, prompts,
images per prompt, steps, guidance, seed sets, reference, mode, metric models), the three means over
subjects, their seed-to-seed standard deviations and the per-subject means. Only runs with the same
fingerprint are compared.

A run regresses, against the previous comparable run and against a pinned baseline, when
- DINO or CLIP-I drops by more than max(3 × its seed-to-seed standard deviation, 0.01) (0.01 alone when the
  run had one seed set), or CLIP-T by more than 0.005;
- or DINO or CLIP-I rises by more than its threshold while CLIP-T drops by more than its own: the model
  copies its reference photo instead of following the prompt.
Each regression names the subjects whose own mean moved that way by more than the threshold.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from blipdiff.infra.atomic import atomic_path, write_json_atomic

HISTORY = "history.parquet"
BASELINE = "baseline.json"
IMAGE_METRICS = ("dino", "clip_i")
METRICS = (*IMAGE_METRICS, "clip_t")
MIN_IMAGE_THRESHOLD = 0.01
CLIP_T_THRESHOLD = 0.005


def fingerprint(settings: dict) -> str:
    """What makes two runs comparable, hashed (the model evaluated is not part of it)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_history(root: Path) -> list[dict]:
    import pyarrow.parquet as pq

    path = root / HISTORY
    if not path.is_file():
        return []
    return [{**row, "per_subject": json.loads(row["per_subject"])} for row in pq.read_table(path).to_pylist()]


def append_run(root: Path, record: dict) -> None:
    """Add ``record`` to the history (replacing an earlier row of the same run id: a rerun of a run)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [row for row in read_history(root) if row["run_id"] != record["run_id"]] + [record]
    table = pa.Table.from_pylist([{**row, "per_subject": json.dumps(row["per_subject"], sort_keys=True)}
                                  for row in rows])
    with atomic_path(root / HISTORY) as temp:
        pq.write_table(table, temp)


def pin_baseline(root: Path, run_id: str) -> None:
    if not any(row["run_id"] == run_id for row in read_history(root)):
        raise ValueError(f"no run {run_id!r} in {root / HISTORY}")
    write_json_atomic({"run_id": run_id}, root / BASELINE)


def baseline_run(root: Path, history: list[dict]) -> dict | None:
    path = root / BASELINE
    if not path.is_file():
        return None
    wanted = json.loads(path.read_text())["run_id"]
    return next((row for row in history if row["run_id"] == wanted), None)


def previous_comparable(history: list[dict], current: dict) -> dict | None:
    """The latest earlier run with the same fingerprint."""
    earlier = [row for row in history if row["fingerprint"] == current["fingerprint"]
               and row["run_id"] != current["run_id"] and row["time"] < current["time"]]
    return max(earlier, key=lambda row: row["time"], default=None)


def thresholds(current: dict) -> dict[str, float]:
    return {**{metric: max(3 * (current.get(f"{metric}_seed_std") or 0.0), MIN_IMAGE_THRESHOLD)
               for metric in IMAGE_METRICS}, "clip_t": CLIP_T_THRESHOLD}


@dataclass
class Regression:
    kind: str  # "drop" or "copying"
    metric: str
    against: str  # "previous" or "baseline"
    against_run: str
    before: float
    after: float
    threshold: float
    subjects: dict[str, float] = field(default_factory=dict)  # subject → its own change, the worst first

    def describe(self) -> str:
        names = ", ".join(f"{subject} {delta:+.3f}" for subject, delta in self.subjects.items()) or "none alone"
        what = "dropped" if self.kind == "drop" else "rose while CLIP-T dropped (copying the reference?)"
        return (f"{self.metric} {what}: {self.before:.4f} → {self.after:.4f} ({self.after - self.before:+.4f}, "
                f"threshold {self.threshold:.4f}) against the {self.against} run {self.against_run}; subjects: {names}")


def _subjects(current: dict, other: dict, metric: str, sign: float, threshold: float) -> dict[str, float]:
    """Subjects whose own mean moved by more than ``threshold`` in the direction ``sign``, the worst first."""
    deltas = {subject: values[metric] - other["per_subject"][subject][metric]
              for subject, values in current["per_subject"].items() if subject in other["per_subject"]}
    moved = {subject: delta for subject, delta in deltas.items() if sign * delta > threshold}
    return dict(sorted(moved.items(), key=lambda item: sign * -item[1]))


def regressions(current: dict, history: list[dict], baseline: dict | None) -> list[Regression]:
    """What regressed against the previous comparable run and against the baseline (when comparable)."""
    limits = thresholds(current)
    found = []
    references = [("previous", previous_comparable(history, current))]
    if baseline is not None and baseline["fingerprint"] == current["fingerprint"] \
            and baseline["run_id"] != current["run_id"]:
        references.append(("baseline", baseline))
    for against, other in references:
        if other is None:
            continue
        change = {metric: current[metric] - other[metric] for metric in METRICS}
        for metric in METRICS:
            if -change[metric] > limits[metric]:
                found.append(Regression("drop", metric, against, other["run_id"], other[metric], current[metric],
                                        limits[metric], _subjects(current, other, metric, -1, limits[metric])))
        if -change["clip_t"] > limits["clip_t"]:
            for metric in IMAGE_METRICS:
                if change[metric] > limits[metric]:
                    found.append(Regression("copying", metric, against, other["run_id"], other[metric],
                                            current[metric], limits[metric],
                                            _subjects(current, other, metric, 1, limits[metric])))
    return found


def history_record(summary: dict, protocol: dict, run_folder: Path) -> dict:
    """The history's row for a finished evaluation (its ``summary.json``) run under ``protocol``."""
    spread = summary["spread"]
    return {"run_id": summary["run_id"], "time": summary["created"], "model": summary["model"],
            "checkpoint_step": summary["checkpoint_step"], "mode": summary["mode"], "fingerprint": fingerprint(protocol),
            "run_folder": str(run_folder), "images": summary["images"],
            **{metric: summary["mean_over_subjects"][metric] for metric in METRICS},
            **{f"{metric}_seed_std": spread[metric]["std"] for metric in METRICS},
            "per_subject": summary["per_subject"]}


def comparable(history: list[dict], current: dict) -> list[dict]:
    """The runs with the current run's fingerprint, oldest first."""
    return sorted((row for row in history if row["fingerprint"] == current["fingerprint"]), key=lambda row: row["time"])

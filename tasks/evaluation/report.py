"""``report.md`` of a DreamBench evaluation: the Table-1-style summary beside the paper's, per-subject
tables beside the paper's Tables 4 (zero-shot) and 5 (fine-tuned) with the differences, a breakdown by
prompt kind, and a per-subject bar chart (``per_subject.png``). The paper's numbers are FACTS'."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from blipdiff.infra.atomic import atomic_path
from blipdiff.tasks.evaluation.score import METRICS, summarize

PAPER_MEANS = {"zero-shot": {"dino": 0.594, "clip_i": 0.779, "clip_t": 0.300},
               "finetuned": {"dino": 0.670, "clip_i": 0.805, "clip_t": 0.302},
               # BLIP-Diffusion's Table 1: DreamBooth on Stable Diffusion (the paper gives no per-subject table).
               "dreambooth": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}}
PAPER_ORACLE = {"dino": 0.774, "clip_i": 0.885}
# Tables 4 and 5 as FACTS has them: subject DINO/CLIP-I/CLIP-T.
_TABLE_4 = """backpack .452/.782/.320, backpack_dog .467/.712/.310, bear_plushie .634/.739/.304, berry_bowl .750/.792/.257,
can .540/.641/.314, candle .395/.710/.316, cat .760/.835/.306, cat2 .703/.854/.286, clock .402/.735/.303,
colorful_sneaker .680/.769/.298, dog .780/.849/.310, dog2 .730/.831/.307, dog3 .558/.747/.310,
dog5 .705/.788/.313, dog6 .763/.867/.288, dog7 .656/.817/.309, dog8 .641/.816/.307, duck_toy .665/.840/.287,
fancy_boot .538/.800/.291, grey_sloth_plushie .632/.755/.315, monster_toy .490/.734/.293,
pink_sunglasses .599/.836/.308, poop_emoji .494/.689/.307, rc_car .569/.761/.281, red_cartoon .697/.826/.263,
robot_toy .534/.787/.315, shiny_sneaker .668/.759/.294, teapot .451/.804/.314, vase .471/.786/.262,
wolf_plushie .463/.737/.327"""
_TABLE_5 = """backpack .551/.839/.320, backpack_dog .639/.760/.317, bear_plushie .693/.752/.307, berry_bowl .808/.829/.254,
can .618/.695/.313, candle .519/.752/.311, cat .806/.869/.306, cat2 .747/.864/.284, clock .479/.784/.305,
colorful_sneaker .739/.805/.320, dog .821/.860/.313, dog2 .793/.841/.307, dog3 .573/.751/.312, dog5 .727/.801/.311,
dog6 .834/.891/.280, dog7 .672/.823/.310, dog8 .723/.823/.310, duck_toy .699/.838/.284, fancy_boot .649/.827/.299,
grey_sloth_plushie .717/.780/.322, monster_toy .566/.743/.292, pink_sunglasses .625/.826/.312,
poop_emoji .627/.784/.290, rc_car .651/.775/.288, red_cartoon .788/.882/.262, robot_toy .626/.803/.316,
shiny_sneaker .757/.804/.297, teapot .484/.819/.331, vase .628/.812/.261, wolf_plushie .599/.760/.325"""


def _parse(table: str) -> dict[str, dict[str, float]]:
    entries = {}
    for entry in table.replace("\n", " ").split(","):
        subject, values = entry.split()
        entries[subject] = dict(zip(METRICS, (float(value) for value in values.split("/"))))
    return entries


PAPER_PER_SUBJECT = {"zero-shot": _parse(_TABLE_4), "finetuned": _parse(_TABLE_5)}


def _cell(ours: float, paper: float | None) -> str:
    return f"{ours:.3f}" if paper is None else f"{ours:.3f} ({paper:.3f}, {ours - paper:+.3f})"


def write_report(scores: list[dict], mode: str, out: Path, title: str, spread: dict | None = None,
                 notes: Sequence[str] = ()) -> Path:
    """``out/report.md`` and ``out/per_subject.png`` from the scored images of one run in ``mode``
    (``zero-shot``, ``finetuned`` or ``dreambooth``); ``spread``: per metric, the mean and standard deviation
    of the benchmark's score over seed sets (the paper's ± is over 10 seed sets); ``notes``: paragraphs
    under the summary table, on how far the paper's numbers compare."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    summary = summarize(scores)
    paper_means, paper_subjects = PAPER_MEANS[mode], PAPER_PER_SUBJECT.get(mode, {})
    means = summary["mean_over_subjects"]
    lines = [f"# {title}\n", f"{summary['images']:,} images of {summary['subjects']} subjects, {mode}. Cells: ours "
             "(the paper's, the difference).\n", "| | DINO | CLIP-I | CLIP-T |", "| --- | ---: | ---: | ---: |",
             "| mean over subjects | " + " | ".join(_cell(means[m], paper_means[m]) for m in METRICS) + " |",
             "| pooled over images | " + " | ".join(f"{summary['pooled_mean'][m]:.3f}" for m in METRICS) + " |",
             f"| real-photo oracle (paper) | {PAPER_ORACLE['dino']:.3f} | {PAPER_ORACLE['clip_i']:.3f} | |"]
    if spread is not None and all(spread[m]["std"] is not None for m in METRICS):
        lines.append("| seed-set spread (std) | " + " | ".join(f"±{spread[m]['std']:.4f}" for m in METRICS) + " |")
    lines.append("")
    lines += [f"**Note.** {note}\n" for note in notes]
    table = {"zero-shot": "Table 4", "finetuned": "Table 5"}.get(mode)
    lines += [f"## Per subject, beside the paper's {table}\n" if table else "## Per subject (the paper has no table)\n", "| subject | DINO | CLIP-I | CLIP-T |",
              "| --- | ---: | ---: | ---: |"]
    for subject, values in summary["per_subject"].items():
        paper = paper_subjects.get(subject, {})
        lines.append(f"| {subject} | " + " | ".join(_cell(values[m], paper.get(m)) for m in METRICS) + " |")
    frame = pd.DataFrame(scores)
    by_kind = frame.groupby("kind")[list(METRICS)].mean()
    lines += ["", "## By prompt kind (pooled over images)\n", "| kind | images | DINO | CLIP-I | CLIP-T |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for kind, row in by_kind.iterrows():
        lines.append(f"| {kind} | {int((frame['kind'] == kind).sum())} | "
                     + " | ".join(f"{row[m]:.3f}" for m in METRICS) + " |")
    lines += ["", "![per subject](per_subject.png)", ""]

    subjects = list(summary["per_subject"])
    figure, axes = plt.subplots(1, 3, figsize=(max(8, 0.45 * len(subjects) * 3), 4), dpi=100, sharey=False)
    positions = np.arange(len(subjects))
    for axis, metric, name in zip(axes, METRICS, ("DINO", "CLIP-I", "CLIP-T")):
        axis.bar(positions - 0.2, [summary["per_subject"][s][metric] for s in subjects], 0.4, label="ours")
        axis.bar(positions + 0.2, [paper_subjects.get(s, {}).get(metric, np.nan) for s in subjects], 0.4,
                 label=f"paper ({table})")
        axis.set_xticks(positions, subjects, rotation=90, fontsize=7)
        axis.set_title(name)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "per_subject.png") as temp:
        figure.savefig(temp, format="png")
    plt.close(figure)
    with atomic_path(out / "report.md") as temp:
        temp.write_text("\n".join(lines), encoding="utf-8")
    return out / "report.md"


def plot_trend(runs: list[dict], mode: str, target: Path) -> Path:
    """The three metrics over comparable runs (oldest first), the paper's means as dashed reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=100)
    # When each run ran, and the training step it evaluated: shorter than run ids, and what a trend is read by.
    labels = [str(row["time"])[5:16].replace("T", " ") + ("" if row.get("checkpoint_step") is None
                                                          else f"\nstep {row['checkpoint_step']:,}") for row in runs]
    for axis, metric, name in zip(axes, METRICS, ("DINO", "CLIP-I", "CLIP-T")):
        axis.plot(range(len(runs)), [row[metric] for row in runs], marker="o", label="runs")
        axis.axhline(PAPER_MEANS[mode][metric], linestyle="--", color="grey", label=f"paper ({mode})")
        axis.set_xticks(range(len(runs)), labels, rotation=45, fontsize=7, ha="right")
        axis.set_title(name)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    with atomic_path(target) as temp:
        figure.savefig(temp, format="png")
    plt.close(figure)
    return target


def compare_runs(runs: list[Path]) -> str:
    """Evaluation runs (``blipdiff eval`` folders, any method) side by side, as markdown: the means over
    subjects beside the papers' (BLIP-Diffusion's Table 1), per subject, per prompt kind (pooled over
    images), and each subject's fine-tuning wall time with the ratio between the methods, when measured."""
    import json

    import pandas as pd

    if len(runs) < 2:
        raise ValueError("compare takes two runs or more")
    loaded = []
    for run in runs:
        summary_file, scores_file = run / "summary.json", run / "scores.parquet"
        if not summary_file.is_file() or not scores_file.is_file():
            raise ValueError(f"{run} is not a finished evaluation (no summary.json and scores.parquet)")
        loaded.append((json.loads(summary_file.read_text()), pd.read_parquet(scores_file)))
    names = [f"{summary['run_id']} ({summary['mode']})" for summary, _ in loaded]
    header = "| | " + " | ".join(names) + " |"
    rule = "| --- |" + " ---: |" * len(names)
    lines = ["# DreamBench runs side by side\n", "## Mean over subjects (the paper's in parentheses)\n",
             "| metric | " + " | ".join(names) + " |", rule]
    for metric, label in zip(METRICS, ("DINO", "CLIP-I", "CLIP-T")):
        lines.append(f"| {label} | " + " | ".join(
            _cell(summary["mean_over_subjects"][metric], PAPER_MEANS.get(summary["mode"], {}).get(metric))
            for summary, _ in loaded) + " |")
    subjects = sorted(set.intersection(*(set(summary["per_subject"]) for summary, _ in loaded)))
    lines += ["", "## Per subject (DINO / CLIP-I / CLIP-T)\n", header.replace("| |", "| subject |"), rule]
    for subject in subjects:
        lines.append(f"| {subject} | " + " | ".join(
            " / ".join(f"{summary['per_subject'][subject][m]:.3f}" for m in METRICS) for summary, _ in loaded) + " |")
    kinds = sorted(set.intersection(*(set(scores["kind"]) for _, scores in loaded)))
    lines += ["", "## Per prompt kind (DINO / CLIP-I / CLIP-T, pooled over images)\n", header.replace("| |", "| kind |"),
              rule]
    for kind in kinds:
        lines.append(f"| {kind} | " + " | ".join(
            " / ".join(f"{scores.loc[scores['kind'] == kind, m].mean():.3f}" for m in METRICS)
            for _, scores in loaded) + " |")
    timed = [summary.get("finetuning", {}) for summary, _ in loaded]
    if any(timed):
        lines += ["", "## Fine-tuning wall time per subject, seconds (class images apart)\n",
                  header.replace("| |", "| subject |"), rule]
        for subject in subjects:
            lines.append(f"| {subject} | " + " | ".join(
                f"{facts[subject]['finetune_seconds']:.1f} ({facts[subject]['finetune_steps']} steps)"
                if subject in facts else "" for facts in timed) + " |")
        totals = [sum(facts[s]["finetune_seconds"] for s in subjects) if all(s in facts for s in subjects) else None
                  for facts in timed]
        lines.append("| total | " + " | ".join("" if total is None else f"{total:.1f}" for total in totals) + " |")
        measured = [(name, total) for name, total in zip(names, totals) if total]
        if len(measured) > 1:
            fastest = min(measured, key=lambda item: item[1])
            lines += ["", "Relative to the fastest (" + fastest[0] + "): "
                      + ", ".join(f"{name} {total / fastest[1]:.1f}x" for name, total in measured) + "."]
        lines.append("\nTimes are comparable only between runs on the same machine.")
    return "\n".join(lines) + "\n"

"""The `blipdiff` command: help, filter, demo, errors and reruns, through the installed console script."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
from helpers import shared_path

from blipdiff.datasets.openimages import SUBJECT_COLUMNS, read_subjects

BLIPDIFF = Path(sys.executable).parent / "blipdiff"


def blipdiff(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BLIPDIFF), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


def test_help_lists_the_commands_without_importing_heavy_libraries():
    done = blipdiff("--help")
    assert done.returncode == 0
    listed = set(re.findall(r"^│ ([a-z][\w-]*) {2,}", done.stdout, re.MULTILINE))
    assert listed == {"filter", "fetch", "build", "matte", "catalog", "app", "generate", "edit", "interpolate",
                      "finetune", "dreambooth", "encode-latents", "pretrain", "score", "eval", "compare",
                      "pin-baseline", "serve", "server", "demo"}
    probe = (
        # The stages' configuration models too: a command checks its input before any heavy import.
        "import sys, blipdiff.infra.cli, blipdiff.tasks.generate, blipdiff.tasks.edit, blipdiff.tasks.interpolate; "
        "heavy = {'pandas', 'pyarrow', 'torch', 'transformers', 'diffusers', 'ray', 'prefect', 'fiftyone'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"


def test_eval_takes_a_model_or_a_dreambooth_base_not_both_nor_neither(tmp_path):
    for args in ([], ["--method", "dreambooth", "--model", "m"], ["--model", "m", "--base", "b"],
                 ["--method", "dreambooth", "--model", "m", "--base", "b"]):
        done = blipdiff("eval", "--out", str(tmp_path / "run"), "--dreambench", str(tmp_path / "bench"), *args)
        assert done.returncode == 2 and "give --model (BLIP-Diffusion), or --method dreambooth with --base" in done.stderr
    assert not (tmp_path / "run").exists()


def test_filter_writes_subjects_and_funnel_and_a_rerun_replaces_them(tmp_path):
    boxes = shared_path("openimages", "format_samples", "v3_val_test_annotations-human-bbox_sample.csv")
    classes = shared_path("openimages", "class-descriptions-boxable.csv")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".tmp-left-by-a-killed-run.parquet").write_bytes(b"partial")
    (out / "subjects.parquet").write_bytes(b"an older, different result")

    done = blipdiff("filter", "--boxes", str(boxes), "--classes", str(classes), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "group" in done.stdout and "subjects" in done.stdout
    subjects = read_subjects(out / "subjects.parquet")
    assert tuple(subjects.columns) == SUBJECT_COLUMNS
    funnel = json.loads((out / "funnel.json").read_text())
    assert funnel["rows_read"] == len(pd.read_csv(boxes))
    assert funnel["subjects"] == len(subjects)
    assert sorted(p.name for p in out.iterdir()) == ["funnel.json", "subjects.parquet"]

    again = blipdiff("filter", "--boxes", str(boxes), "--classes", str(classes), "--out", str(out))
    assert again.returncode == 0
    pd.testing.assert_frame_equal(read_subjects(out / "subjects.parquet"), subjects)
    assert json.loads((out / "funnel.json").read_text()) == funnel


def test_filter_errors_are_clear_and_leave_no_output(tmp_path):
    classes = tmp_path / "classes.csv"
    classes.write_text("/m/01yrx,Cat\n")
    out = tmp_path / "out"

    missing = blipdiff("filter", "--boxes", str(tmp_path / "nope.csv"), "--classes", str(classes), "--out", str(out))
    assert missing.returncode == 2
    assert "box annotations not found" in missing.stderr

    not_boxes = tmp_path / "labels.csv"
    not_boxes.write_text("ImageID,Source,LabelName,Confidence\n000026e7ee790996,verification,/m/01yrx,1\n")
    wrong = blipdiff("filter", "--boxes", str(not_boxes), "--classes", str(classes), "--out", str(out))
    assert wrong.returncode == 2
    assert "missing column(s) XMin" in wrong.stderr
    assert "Traceback" not in wrong.stderr

    bad_classes = tmp_path / "bad-classes.csv"
    bad_classes.write_text("/m/01yrx,Cat,extra\n")
    rejected = blipdiff("filter", "--boxes", str(not_boxes), "--classes", str(bad_classes), "--out", str(out))
    assert rejected.returncode == 2 and "expected `MID,Name`" in rejected.stderr
    assert not out.exists()

    boxes = shared_path("openimages", "format_samples", "v3_val_test_annotations-human-bbox_sample.csv")
    for limit, message in (("lots", "memory limit 'lots'"), ("1MB", "raise it with --memory-limit")):
        refused = blipdiff("filter", "--boxes", str(boxes), "--classes", str(classes), "--out", str(out),
                           "--memory-limit", limit)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr
        assert not (out / "subjects.parquet").exists() and not list(out.glob(".tmp-filter-spill*"))


def test_demo_runs_the_whole_chain_on_the_bundled_sample(fiftyone_database, tmp_path):
    import fiftyone as fo

    # The demo of another checkout catalogued its own folder under the same name: this demo replaces it.
    elsewhere = fo.Dataset("blipdiff-demo", persistent=True)
    elsewhere.info = {"pairs_folder": "/another/checkout/blipdiff-demo"}
    elsewhere.save()
    environment = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL")}
    # The chain starts a server, `blipdiff serve` and a process per run: about 5.5 minutes on a busy 2-core machine.
    done = blipdiff("demo", "--out", str(tmp_path / "demo"), env=environment, timeout=900)
    assert done.returncode == 0, done.stderr
    demo = tmp_path / "demo"
    subjects = read_subjects(demo / "subjects" / "subjects.parquet")
    assert sorted(subjects["label_name"]) == ["Cat", "Coffee cup", "Horse"]
    funnel = json.loads((demo / "subjects" / "funnel.json").read_text())
    for rule in ("group", "aspect", "area", "human", "cluttered"):
        assert funnel["removed"][rule] > 0, rule
    pairs = pd.read_parquet(demo / "pairs.parquet")
    assert sorted(pairs["label_name"]) == ["Cat", "Coffee cup", "Horse"]
    for column in ("target_path", "composite_path", "input_path", "alpha_path", "trimap_path"):
        assert all((demo / path).is_file() for path in pairs[column])
    assert f"3 pairs -> {demo.resolve() / 'pairs.parquet'}" in done.stdout
    assert (demo / "prefect").is_dir(), "without PREFECT_API_URL the runs live in the demo's folder"
    assert "FiftyOne dataset 'blipdiff-demo': `blipdiff app --dataset blipdiff-demo`" in done.stdout

    catalog = fo.load_dataset("blipdiff-demo")
    assert catalog.info["pairs_folder"] == str(demo.resolve())
    assert sorted(catalog.values("label")) == ["Cat", "Coffee cup", "Horse"]
    assert sorted(catalog.group_slices) == ["alpha", "composite", "input", "target", "trimap"]

    # The build's event started a short pre-training of a random model, and each of its two checkpoints an
    # evaluation, through the chain's triggers.
    from blipdiff.tasks.evaluation.history import read_history

    assert "RANDOM WEIGHTS" in done.stdout and "blipdiff eval --model Salesforce/blipdiffusion" in done.stdout
    assert "started by the trigger" in done.stdout and "Watch the chain in the Prefect UI" in done.stdout
    run = demo / "runs" / "demo"
    assert (run / "checkpoints" / "step-0000006" / "model_index.json").is_file()
    evaluations = read_history(demo / "evals")
    assert sorted(row["checkpoint_step"] for row in evaluations) == [3, 6]
    assert all(row["images"] == 3 * 3 * 2 for row in evaluations)
    assert all((demo / "evals" / row["run_id"] / "report.md").is_file() for row in evaluations)
    generations = fo.load_dataset("blipdiff-demo-dreambench")
    assert len(generations.match_tags("generated")) == 2 * 18 and len(generations.match_tags("reference")) == 9


def test_serve_refuses_a_schedule_it_cannot_run(tmp_path):
    unscheduled = blipdiff("serve", "--data", str(tmp_path), "--eval-cron", "0 2 * * *")
    assert unscheduled.returncode == 2 and "--eval-cron needs --eval-parameters" in unscheduled.stderr
    zone = blipdiff("serve", "--data", str(tmp_path), "--timezone", "Mars/Olympus")
    assert zone.returncode == 2 and "not an IANA time zone" in zone.stderr
    (tmp_path / "nightly.json").write_text(json.dumps({"eval_root": "evals", "dreambench": "bench"}))
    incomplete = blipdiff("serve", "--data", str(tmp_path), "--eval-parameters", str(tmp_path / "nightly.json"),
                          "--eval-cron", "0 2 * * *")
    assert incomplete.returncode == 2 and "give model (a fixed model) or training_run" in incomplete.stderr
    assert not (tmp_path / "prefect").exists()


def test_pin_baseline_names_a_run_of_the_history(tmp_path):
    from blipdiff.tasks.evaluation.history import append_run

    refused = blipdiff("pin-baseline", "--eval-root", str(tmp_path), "--run", "nightly-1")
    assert refused.returncode == 2 and "no run 'nightly-1'" in refused.stderr
    append_run(tmp_path, {"run_id": "nightly-1", "time": "2026-11-26T02:00:00+00:00", "fingerprint": "f",
                          "dino": 0.6, "clip_i": 0.78, "clip_t": 0.3, "per_subject": {}})
    pinned = blipdiff("pin-baseline", "--eval-root", str(tmp_path), "--run", "nightly-1")
    assert pinned.returncode == 0 and json.loads((tmp_path / "baseline.json").read_text()) == {"run_id": "nightly-1"}

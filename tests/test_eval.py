"""`blipdiff eval` on the real DreamBench with a tiny random model and small random metric models, on a real
local Ray and a real FiftyOne database: the outputs, a kill and a rerun, the catalog and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from helpers import shared_path
from PIL import Image
from tiny_models import save_tiny_blip_diffusion, save_tiny_clip, save_tiny_dino
from typer.testing import CliRunner

from blipdiff.infra.cli import app
from blipdiff.tasks.evaluation.config import image_seed

SUBJECTS = ("dog", "vase")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"model": str(save_tiny_blip_diffusion(root / "model")), "dino": str(save_tiny_dino(root / "dino")),
            "clip": str(save_tiny_clip(root / "clip"))}


@pytest.fixture(scope="module")
def dreambench():
    return shared_path("dreambench", "dataset")


def arguments(models, dreambench, out, *extra: str) -> list[str]:
    return ["eval", "--model", models["model"], "--dreambench", str(dreambench), "--out", str(out),
            "--subjects", ",".join(SUBJECTS), "--prompts", "2", "--images-per-prompt", "2", "--steps", "12",
            "--resolution", "32", "--dino", models["dino"], "--clip", models["clip"], *extra]


@pytest.fixture(scope="module")
def finished_run(ray_cluster, models, dreambench, fiftyone_database, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "nightly-1"
    result = CliRunner().invoke(app, arguments(models, dreambench, out, "--dataset", "eval-test"))
    assert result.exit_code == 0, result.output
    return out


def test_eval_writes_complete_consistent_outputs(finished_run, dreambench):
    out = finished_run
    generations = pd.read_parquet(out / "generations.parquet")
    scores = pd.read_parquet(out / "scores.parquet")
    assert len(generations) == len(scores) == 2 * 2 * 2
    assert sorted(set(generations["subject"])) == list(SUBJECTS)
    dog = generations[(generations["subject"] == "dog") & (generations["prompt_index"] == 0)].iloc[0]
    assert (dog["class"], dog["prompt"], dog["kind"], bool(dog["live"])) == (
        "dog", "a dog in the jungle", "recontextualization", True)
    assert dog["text_encoder_prompt"] == "a dog " + ", ".join(["in the jungle"] * 15)
    for row in generations.itertuples():
        assert row.seed == image_seed(row.seed_set, row.subject, row.prompt_index, row.image_index)
        with Image.open(out / row.path) as image:
            assert image.format == "PNG" and image.size == (32, 32)
    assert len(set(generations["seed"])) == len(generations), "every image has a seed of its own"
    assert {"model", "steps", "guidance", "resolution", "reference", "mode", "versions"} <= set(generations.columns)
    assert set(generations["steps"]) == {12} and set(generations["mode"]) == {"zero-shot"}

    assert set(scores.columns) >= {"subject", "prompt_index", "image_index", "prompt", "dino", "clip_i", "clip_t"}
    summary = json.loads((out / "summary.json").read_text())
    per_subject = scores.groupby("subject")[["dino", "clip_i", "clip_t"]].mean()
    for metric in ("dino", "clip_i", "clip_t"):
        assert summary["mean_over_subjects"][metric] == pytest.approx(per_subject[metric].mean(), abs=1e-12)
        assert summary["pooled_mean"][metric] == pytest.approx(scores[metric].mean(), abs=1e-12)
    assert summary["images"] == 8 and summary["images_made"] == 8 and summary["run_id"] == "nightly-1"
    report = (out / "report.md").read_text()
    assert "| mean over subjects |" in report and "Table 4" in report and (out / "per_subject.png").is_file()
    journaled = [json.loads(line)["path"] for path in (out / "journal").glob("*.jsonl")
                 for line in path.read_text().splitlines()]
    assert sorted(journaled) == sorted(generations["path"])


def test_score_on_the_run_gives_the_same_scores(finished_run, dreambench, models, tmp_path):
    result = CliRunner().invoke(app, ["score", "--images", str(finished_run / "images" / "seed-set-0"),
                                      "--dreambench", str(dreambench), "--out", str(tmp_path / "rescored"),
                                      "--dino", models["dino"], "--clip", models["clip"]])
    assert result.exit_code == 0, result.output
    ours = pd.read_parquet(finished_run / "scores.parquet").sort_values(["subject", "prompt_index", "image_index"])
    again = pd.read_parquet(tmp_path / "rescored" / "scores.parquet").sort_values(["subject", "prompt_index", "image_index"])
    for metric in ("dino", "clip_i", "clip_t"):
        assert again[metric].to_numpy() == pytest.approx(ours[metric].to_numpy(), abs=1e-6)


def test_the_run_is_catalogued_once_with_scores_and_references(finished_run, dreambench):
    import fiftyone as fo

    from blipdiff.tasks.evaluation.catalog import catalog_evaluation

    dataset = fo.load_dataset("eval-test")
    generated = dataset.match_tags("generated")
    assert len(generated) == 8
    sample = generated.sort_by("dino").first()
    scores = pd.read_parquet(finished_run / "scores.parquet")
    assert sample.dino == pytest.approx(scores["dino"].min())
    for name in ("run", "model", "checkpoint_step", "subject", "class_name", "prompt", "kind", "seed", "clip_i",
                 "clip_t"):
        assert dataset.has_sample_field(name)
    assert sample.run == "nightly-1" and sample.subject in SUBJECTS and Path(sample.filepath).is_file()
    references = dataset.match_tags("reference")
    photos = [str(p.resolve()) for subject in SUBJECTS for p in sorted((dreambench / subject).glob("*.jpg"))]
    assert sorted(references.values("filepath")) == sorted(photos)
    assert set(dataset.list_saved_views()) >= {"lowest-dino", "lowest-clip-t", "per-subject", "latest-run", "by-run"}
    assert dataset.load_saved_view("lowest-clip-t").first().clip_t == pytest.approx(scores["clip_t"].min())

    again = catalog_evaluation(finished_run, "eval-test")
    assert (again.added, again.removed, again.images) == (0, 0, 8)
    assert len(dataset) == 8 + len(photos), "cataloguing again adds nothing"


def kill_session(session: int) -> None:
    """SIGKILL every process of the session: the command, its local Ray, and Ray's workers, which run in
    process groups of their own."""
    import psutil

    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session:
                process.kill()
        except (ProcessLookupError, psutil.Error):
            continue


def test_a_killed_run_finishes_on_rerun_without_redoing_images(finished_run, models, dreambench, tmp_path):
    out = tmp_path / "killed"
    command = [str(Path(sys.executable).parent / "blipdiff"), *arguments(models, dreambench, out, "--dataset", "")]
    environment = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    # A session of its own, so that the kill takes the command and its local Ray together.
    run = subprocess.Popen(command, env=environment, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    journal = out / "journal" / "0-dog.jsonl"
    while not (journal.is_file() and journal.read_text().count("\n") >= 1):
        assert run.poll() is None, run.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    kill_session(run.pid)
    run.wait(timeout=60)
    made = {json.loads(line)["path"]: (out / json.loads(line)["path"]).stat().st_mtime_ns
            for path in (out / "journal").glob("*.jsonl") for line in path.read_text().splitlines() if line.endswith("}")}
    assert 1 <= len(made) < 8, "the kill should land in the middle of the run"

    again = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(made)} already made, {8 - len(made)} to make" in again.stdout
    journaled = [json.loads(line)["path"] for path in (out / "journal").glob("*.jsonl")
                 for line in path.read_text().splitlines()]
    assert len(journaled) == len(set(journaled)) == 8, "no image is made twice"
    assert all((out / path).stat().st_mtime_ns == mtime for path, mtime in made.items())
    reference = pd.read_parquet(finished_run / "generations.parquet")
    for path in reference["path"]:
        assert (out / path).read_bytes() == (finished_run / path).read_bytes(), "the same image as the uninterrupted run"
    assert not list(out.rglob(".tmp-*"))


def renamed_dog_bench(dreambench: Path, folder: Path) -> Path:
    """DreamBench's layout with one subject, my_dog, which the paper's Table 3 does not list."""
    (folder / "my_dog").mkdir(parents=True)
    for photo in sorted((dreambench / "dog").glob("*.jpg"))[:2]:
        (folder / "my_dog" / photo.name).write_bytes(photo.read_bytes())
    text = (dreambench / "prompts_and_classes.txt").read_text()
    (folder / "prompts_and_classes.txt").write_text("subject_name,class\nmy_dog,dog\n\n" + text[text.index("Prompts"):])
    return folder


@pytest.mark.parametrize("extra, message", [
    (["--subjects", "dog,unicorn"], "no subject 'unicorn'"),
    (["--reference", "MISSING"], "not all, first, or an existing file"),
    (["--reference", "PHOTO"], "one photo serves one subject"),
    (["--mode", "finetuned", "--subjects", "my_dog"], "Table 3 has no fine-tuning steps for my_dog"),
    (["--prompts", "26"], "prompts"),
    (["--model", "/nowhere/model"], "no such folder"),
])
def test_bad_input_is_refused_in_one_line(models, dreambench, tmp_path, extra, message):
    bench = renamed_dog_bench(dreambench, tmp_path / "custom") if "my_dog" in extra else dreambench
    substitutes = {"MISSING": str(tmp_path / "missing.png"), "PHOTO": str(sorted((dreambench / "dog").glob("*.jpg"))[0])}
    result = CliRunner().invoke(app, arguments(models, bench, tmp_path / "out", *(substitutes.get(a, a) for a in extra)))
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists(), "a refused run leaves no run folder"


def test_a_rerun_with_other_settings_is_refused(finished_run, models, dreambench):
    result = CliRunner().invoke(app, arguments(models, dreambench, finished_run, "--guidance", "3"))
    assert result.exit_code == 2 and "other settings (guidance)" in result.output, result.output


def test_the_zero_shot_reference_is_every_photo_the_first_or_a_file(models, dreambench, tmp_path):
    from blipdiff.tasks.evaluation.config import EvalConfig, reference_photos
    from blipdiff.tasks.evaluation.run import plan

    dog = sorted((dreambench / "dog").glob("*.jpg"))
    vase = sorted((dreambench / "vase").glob("*.jpg"))

    def photos(reference: str, subjects=SUBJECTS) -> dict[str, list]:
        config = EvalConfig(model=models["model"], dreambench=dreambench, out=tmp_path / "run", subjects=list(subjects),
                            reference=reference)
        _, chosen, _ = plan(config)
        return {subject.name: reference_photos(config, subject) for subject in chosen}

    assert photos("all") == {"dog": dog, "vase": vase}
    assert photos("first") == {"dog": dog[:1], "vase": vase[:1]}
    assert photos(str(dog[2]), ["dog"]) == {"dog": [dog[2]]}
    (tmp_path / "chosen.csv").write_text(f"dog,{dog[1].name}\nvase,{vase[3]}\n")
    assert photos(str(tmp_path / "chosen.csv")) == {"dog": [dog[1]], "vase": [vase[3]]}
    (tmp_path / "partial.csv").write_text(f"dog,{dog[1].name}\n")
    with pytest.raises(ValueError, match="no photo for vase"):
        photos(str(tmp_path / "partial.csv"))


def test_dreambooth_on_dreambench_writes_the_same_outputs_and_compares(finished_run, models, dreambench, tmp_path):
    """`eval --method dreambooth`: DreamBooth fine-tuned per subject on a tiny Stable Diffusion, the same
    protocol, outputs and scoring as the BLIP-Diffusion run, then `compare` sets the two side by side."""
    from blipdiff.infra.demo.random_models import save_tiny_stable_diffusion

    base = save_tiny_stable_diffusion(tmp_path / "stable-diffusion")
    out = tmp_path / "dreambooth-run"
    args = [arg for arg in arguments(models, dreambench, out) if arg not in ("--model", models["model"])]
    result = CliRunner().invoke(app, [*args, "--method", "dreambooth", "--base", str(base), "--dreambooth-steps", "2",
                                      "--num-class-images", "2", "--dataset", ""])
    assert result.exit_code == 0, result.output
    for name in ("generations.parquet", "scores.parquet", "summary.json", "report.md", "per_subject.png"):
        assert (out / name).is_file(), name
    generations, theirs = pd.read_parquet(out / "generations.parquet"), pd.read_parquet(finished_run / "generations.parquet")
    assert set(theirs.columns) <= set(generations.columns)
    assert list(generations["path"]) == list(theirs["path"]) and list(generations["seed"]) == list(theirs["seed"])
    dog = generations[(generations["subject"] == "dog") & (generations["prompt_index"] == 0)].iloc[0]
    assert dog["text_encoder_prompt"] == "a sks dog in the jungle" and dog["prompt"] == "a dog in the jungle"
    assert set(generations["method"]) == {"dreambooth"} and set(generations["finetune_steps"]) == {2}
    scores = pd.read_parquet(out / "scores.parquet")
    assert list(scores.columns) == list(pd.read_parquet(finished_run / "scores.parquet").columns) and len(scores) == 8
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "dreambooth" and set(summary["finetuning"]) == set(SUBJECTS)
    assert all(facts["finetune_seconds"] > 0 for facts in summary["finetuning"].values())
    assert "0.668" in (out / "report.md").read_text()
    assert "not a like-for-like comparison" in (out / "report.md").read_text()  # a tiny model, not SD1.5
    class_folders = list((out / "class-images").iterdir())
    assert len(class_folders) == 2, "dog and vase: one class-image cache entry each"

    compared = CliRunner().invoke(app, ["compare", str(finished_run), str(out), "--out", str(tmp_path / "compare.md")])
    assert compared.exit_code == 0, compared.output
    table = (tmp_path / "compare.md").read_text()
    assert "nightly-1 (zero-shot)" in table and "dreambooth-run (dreambooth)" in table
    assert "(0.594," in table and "(0.668," in table
    assert "| dog |" in table and "| recontextualization |" in table and "Fine-tuning wall time" in table
    refused = CliRunner().invoke(app, ["compare", str(finished_run), str(tmp_path)])
    assert refused.exit_code == 2 and "not a finished evaluation" in refused.output


def test_a_dreambooth_report_on_a_base_other_than_stable_diffusion_15_says_the_paper_does_not_compare(
        models, dreambench, tmp_path):
    """The paper's DreamBooth numbers are DreamBooth on Stable Diffusion: a report of DreamBooth on another
    base (a BLIP-Diffusion checkpoint, whose U-Net and text encoder stage-2 pre-training trained, or another
    architecture) says they are not like for like; on Stable Diffusion 1.5 it does not."""
    from blipdiff.models.stable_diffusion import not_stable_diffusion_15
    from blipdiff.tasks.evaluation.baseline import report_notes
    from blipdiff.tasks.evaluation.config import EvalConfig
    from blipdiff.tasks.evaluation.report import write_report
    from blipdiff.infra.demo.random_models import save_tiny_stable_diffusion

    tiny = save_tiny_stable_diffusion(tmp_path / "tiny-sd")
    # Stable Diffusion 1.5's configs (the weights are not read): the tiny model's folder, its configs made SD1.5's.
    sd15 = save_tiny_stable_diffusion(tmp_path / "sd15")
    for component in ("unet", "text_encoder", "vae"):
        path = sd15 / component / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **{
            "unet": {"in_channels": 4, "out_channels": 4, "sample_size": 64, "cross_attention_dim": 768,
                     "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8},
            "text_encoder": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12},
            "vae": {"latent_channels": 4, "block_out_channels": [128, 256, 512, 512]}}[component]}))
    assert not_stable_diffusion_15(sd15) is None
    assert "BLIP-Diffusion checkpoint" in not_stable_diffusion_15(models["model"])
    assert "unet is not Stable Diffusion 1.5's architecture" in not_stable_diffusion_15(tiny)

    def notes(base, method="dreambooth"):
        return report_notes(EvalConfig(model=str(base), method=method, dreambench=dreambench, out=tmp_path / "run"))

    assert notes(sd15) == [] and notes(models["model"], method="blip-diffusion") == []
    for base in (models["model"], tiny):
        (note,) = notes(base)
        assert "not Stable Diffusion 1.5" in note and "not a like-for-like comparison" in note
    scores = [
        {"subject": "dog", "class": "dog", "seed_set": 0, "prompt_index": 0, "image_index": 0, "kind": "property",
         "prompt": "a red dog", "path": "x.png", "dino": 0.5, "clip_i": 0.7, "clip_t": 0.3}]
    report = write_report(scores, "dreambooth", tmp_path / "report", "DreamBooth", notes=notes(models["model"]))
    assert "not a like-for-like comparison" in report.read_text()


def test_the_text_encoder_gets_the_authors_text_for_each_prompt_kind(models, dreambench, tmp_path):
    """One prompt of each kind through the evaluation's own generator, the tokenizer's input recorded."""
    from blipdiff.tasks.evaluation.actors import SubjectGenerator
    from blipdiff.tasks.evaluation.config import EvalConfig
    from blipdiff.tasks.evaluation.run import plan

    config = EvalConfig(model=models["model"], dreambench=dreambench, out=tmp_path / "run", subjects=["dog"],
                        prompts=21, images_per_prompt=1, steps=2, resolution=32, dataset=None)
    bench, subjects, jobs = plan(config)
    kinds = {0: "recontextualization", 10: "accessorization", 20: "property"}
    jobs = [job for job in jobs if job.prompt_index in kinds]
    assert [job.kind for job in jobs] == list(kinds.values())
    (config.out / "journal").mkdir(parents=True)
    generator = SubjectGenerator(config)
    tokenizer = generator.pipe.tokenizer
    received: list[str] = []

    def recording(texts, *args, **kwargs):
        received.extend([texts] if isinstance(texts, str) else texts)
        return tokenizer(texts, *args, **kwargs)

    generator.pipe.tokenizer = recording
    generator.generate(subjects[0], jobs)
    expected = ["a dog " + ", ".join(["in the jungle"] * 15),
                "a dog " + ", ".join(["wearing a red hat"] * 15),
                ", ".join(["a red dog"] * 15)]
    # Each image's prompt, then its empty negative prompt (guidance 7.5), encoded without the subject.
    assert received[0::2] == expected and received[1::2] == [""] * 3
    assert [job.text_encoder_prompt for job in jobs] == expected

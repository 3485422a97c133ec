"""`blipdiff score` on a foreign folder of images in DreamBench's layout, on a generations.parquet, and
`--oracle`, with small random metric models; bad input is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from helpers import shared_path
from PIL import Image
from tiny_models import save_tiny_clip, save_tiny_dino
from typer.testing import CliRunner

from blipdiff.datasets.dreambench import read_dreambench
from blipdiff.infra.cli import app
from blipdiff.models.metrics import ClipEmbedder, DinoEmbedder, mean_similarity, oracle_similarity, text_similarity

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    return str(save_tiny_dino(root / "dino")), str(save_tiny_clip(root / "clip"))


@pytest.fixture(scope="module")
def dreambench():
    return shared_path("dreambench", "dataset")


@pytest.fixture
def foreign(tmp_path, dreambench):
    """Another method's images: for dog and vase, prompts 0 and 20, two images each (DreamBench photos of
    other subjects stand in for generations)."""
    folder = tmp_path / "theirs"
    stand_ins = sorted((dreambench / "cat").glob("*.jpg")) + sorted((dreambench / "teapot").glob("*.jpg"))
    for n, (subject, prompt, image) in enumerate((s, p, i) for s in ("dog", "vase") for p in (0, 20) for i in (0, 1)):
        (folder / subject).mkdir(parents=True, exist_ok=True)
        with Image.open(stand_ins[n % len(stand_ins)]) as photo:
            photo.convert("RGB").resize((128, 128)).save(folder / subject / f"{prompt:02d}_{image}.png")
    return folder


def score(*arguments: str):
    return CliRunner().invoke(app, ["score", *arguments])


def test_score_rates_a_foreign_folder_by_the_protocol(foreign, dreambench, metric_models, tmp_path):
    dino_model, clip_model = metric_models
    result = score("--images", str(foreign), "--dreambench", str(dreambench), "--out", str(tmp_path / "run"),
                   "--dino", dino_model, "--clip", clip_model, "--device", "cpu")
    assert result.exit_code == 0, result.output
    scores = pd.read_parquet(tmp_path / "run" / "scores.parquet")
    assert len(scores) == 8 and set(scores["subject"]) == {"dog", "vase"}
    row = scores[(scores["subject"] == "dog") & (scores["prompt_index"] == 20) & (scores["image_index"] == 1)].iloc[0]
    assert (row["prompt"], row["kind"], row["class"]) == ("a red dog", "property", "dog")
    assert scores[scores["subject"] == "vase"]["prompt"].iloc[0] == "a vase in the jungle"

    # The same numbers from the metric functions directly, subject by subject.
    bench = read_dreambench(dreambench)
    dino, clip = DinoEmbedder(dino_model), ClipEmbedder(clip_model)
    dog = scores[scores["subject"] == "dog"]
    generated = [Image.open(path).convert("RGB") for path in dog["path"]]
    real = [Image.open(path).convert("RGB") for path in bench.subject("dog").photos]
    np.testing.assert_allclose(dog["dino"], mean_similarity(dino(generated), dino(real)).numpy(), atol=1e-6)
    np.testing.assert_allclose(dog["clip_i"], mean_similarity(clip.images(generated), clip.images(real)).numpy(),
                               atol=1e-6)
    np.testing.assert_allclose(dog["clip_t"], text_similarity(clip.images(generated), clip.texts(list(dog["prompt"])))
                               .numpy(), atol=1e-6)

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    per_subject = scores.groupby("subject")[["dino", "clip_i", "clip_t"]].mean()
    assert summary["mean_over_subjects"]["dino"] == pytest.approx(per_subject["dino"].mean())
    assert summary["pooled_mean"]["clip_t"] == pytest.approx(scores["clip_t"].mean())
    assert summary["per_subject"]["vase"]["clip_i"] == pytest.approx(per_subject.loc["vase", "clip_i"])

    # A generations.parquet names the same images (paths relative to its folder): the same scores.
    listed = tmp_path / "listed"
    listed.mkdir()
    shutil.copytree(foreign, listed / "images")
    pd.DataFrame([{"subject": s, "prompt_index": p, "image_index": i, "path": f"images/{s}/{p:02d}_{i}.png"}
                  for s, p, i in zip(scores["subject"], scores["prompt_index"], scores["image_index"])]
                 ).to_parquet(listed / "generations.parquet")
    again = score("--images", str(listed), "--dreambench", str(dreambench), "--out", str(tmp_path / "again"),
                  "--dino", dino_model, "--clip", clip_model, "--device", "cpu")
    assert again.exit_code == 0, again.output
    rescored = pd.read_parquet(tmp_path / "again" / "scores.parquet")
    np.testing.assert_allclose(rescored[["dino", "clip_i", "clip_t"]], scores[["dino", "clip_i", "clip_t"]], atol=1e-6)


def test_the_oracle_scores_real_photos_against_each_other(dreambench, metric_models, tmp_path):
    dino_model, clip_model = metric_models
    result = score("--oracle", "--dreambench", str(dreambench), "--out", str(tmp_path / "oracle"),
                   "--dino", dino_model, "--clip", clip_model, "--device", "cpu", "--batch-size", "8")
    assert result.exit_code == 0, result.output
    oracle = pd.read_parquet(tmp_path / "oracle" / "scores.parquet").set_index("subject")
    assert len(oracle) == 30 and oracle["photos"].sum() == 158
    bench = read_dreambench(dreambench)
    teapot = [Image.open(path).convert("RGB") for path in bench.subject("teapot").photos]
    assert oracle.loc["teapot", "dino"] == pytest.approx(oracle_similarity(DinoEmbedder(dino_model)(teapot)), abs=1e-6)
    summary = json.loads((tmp_path / "oracle" / "summary.json").read_text())
    assert summary["oracle"] and summary["paper"] == {"dino": 0.774, "clip_i": 0.885}
    assert summary["mean_over_subjects"]["clip_i"] == pytest.approx(oracle["clip_i"].mean())


def test_bad_input_is_refused(foreign, dreambench, metric_models, tmp_path):
    dino_model, clip_model = metric_models
    models = ["--dino", dino_model, "--clip", clip_model, "--device", "cpu"]
    neither = score("--dreambench", str(dreambench), "--out", str(tmp_path / "a"), *models)
    assert neither.exit_code == 2 and "give --images DIR" in neither.output
    (foreign / "dragon").mkdir()
    (foreign / "dragon" / "00_0.png").write_bytes((foreign / "dog" / "00_0.png").read_bytes())
    unknown = score("--images", str(foreign), "--dreambench", str(dreambench), "--out", str(tmp_path / "b"), *models)
    assert unknown.exit_code == 2 and "subjects that DreamBench does not have: dragon" in unknown.output
    shutil.rmtree(foreign / "dragon")
    (foreign / "dog" / "notes.txt").write_text("x")
    stray = score("--images", str(foreign), "--dreambench", str(dreambench), "--out", str(tmp_path / "c"), *models)
    assert stray.exit_code == 2 and "not named <prompt index>_<image index>.png: dog/notes.txt" in stray.output
    (foreign / "dog" / "notes.txt").unlink()
    (foreign / "dog" / "00_0.png").rename(foreign / "dog" / "31_0.png")
    out_of_range = score("--images", str(foreign), "--dreambench", str(dreambench), "--out", str(tmp_path / "d"), *models)
    assert out_of_range.exit_code == 2 and "prompt index 31 is not 0-24" in out_of_range.output
    assert not any((tmp_path / name).exists() for name in "abcd")

"""`blipdiff pretrain` and `blipdiff encode-latents` on a tiny random checkpoint, with two Ray Train workers
(gloo) on a real local Ray: the loss falls, checkpoints load in `blipdiff generate`, a killed run resumes
to the weights of an uninterrupted one, two workers of batch 1 equal one of batch 2, the latent cache is
reused and keyed by its VAE, missing files are counted, and bad input is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from helpers import write_pairs
from tiny_models import save_tiny_blip_diffusion
from typer.testing import CliRunner

from blipdiff.datasets.latents import EncodeLatentsConfig, encode_latents
from blipdiff.datasets.training_pairs import SampleRecipe, WorkerSchedule, make_sample
from blipdiff.infra.cli import app
from blipdiff.tasks.pretrain.launch import run_pretrain
from blipdiff.tasks.pretrain.config import PretrainConfig, checkpoints

BLIPDIFF = Path(sys.executable).parent / "blipdiff"
# Two workers of batch 1; a learning rate the tiny model moves with in a few steps (the real one is 2e-6).
RUN = {"steps": 12, "batch_size": 1, "workers": 2, "lr": 1e-3, "resolution": 32, "precision": "fp32",
       "checkpoint_every": 4, "keep_checkpoints": 2, "validate_every": 4, "validation_pairs": 1,
       "validation_steps": 2, "log_every": 2}


def cli_options(settings: dict) -> list[str]:
    return [part for key, value in settings.items() for part in (f"--{key.replace('_', '-')}", str(value))]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module, which the CLI runs in subprocesses join through RAY_ADDRESS: four
    logical CPUs, so that two training workers leave room for the tasks that make their samples."""
    ray = pytest.importorskip("ray")
    context = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = context.address_info["gcs_address"]
    yield
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS")
    else:
        os.environ["RAY_ADDRESS"] = previous


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    # Without dropout, the split of a batch over workers cannot change the result.
    return save_tiny_blip_diffusion(tmp_path_factory.mktemp("pretrain") / "model", qformer_dropout=0.0)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def reference(ray_cluster, model, pairs, tmp_path_factory) -> Path:
    """An uninterrupted run: 12 steps of two workers with batch 1."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    run_pretrain(PretrainConfig(pairs=[pairs], init=str(model), out=out, **RUN), log=lambda line: None)
    return out


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{component}.{key}": value for component in ("qformer", "text_encoder", "unet")
            for key, value in load_file(next((folder / component).glob("*.safetensors"))).items()}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[key] - b[key]).abs().max().item() for key in a)


def test_a_run_trains_checkpoints_logs_and_validates(reference, model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from blipdiff.models.blip_diffusion import BlipDiffusionPipeline

    metrics = pd.read_parquet(reference / "metrics.parquet")
    assert list(metrics["step"]) == list(range(1, 13))
    assert metrics["loss"].iloc[-4:].mean() < 0.85 * metrics["loss"].iloc[:4].mean(), "the loss should fall"
    assert (metrics["samples_per_s"] > 0).all() and (metrics["lr"] == 1e-3).all()

    # Rotation keeps the newest two; each is a model folder in the official layout with its training state.
    saved = checkpoints(reference)
    assert [folder.name for folder in saved] == ["step-0000008", "step-0000012"]
    assert not list((reference / "checkpoints").glob(".tmp-*"))
    state = json.loads((saved[-1] / "training_state" / "state.json").read_text())
    assert state["step"] == 12 and state["next_position"] == 24 and state["workers"] == 2
    assert sorted(path.name for path in (saved[-1] / "training_state").iterdir()) == [
        "metrics.parquet", "optimizer.pt", "rng-rank0.pt", "rng-rank1.pt", "state.json"]
    pipe = BlipDiffusionPipeline.from_pretrained(saved[-1])
    trained, start = weights(saved[-1]), weights(model)
    moved = {key for key in trained if not torch.equal(trained[key], start[key])}
    # The ViT stays frozen (its post_layernorm trains); so does the VAE.
    assert not any("visual_encoder" in key and "post_layernorm" not in key for key in moved)
    assert any("visual_encoder.post_layernorm" in key for key in moved)
    for part in ("qformer.query_tokens", "qformer.proj_layer", "qformer.embeddings.word_embeddings", "text_encoder.",
                 "unet.conv_in"):
        assert any(key.startswith(part) for key in moved), part
    assert torch.equal(load_file(saved[-1] / "vae" / "diffusion_pytorch_model.safetensors")["encoder.conv_in.weight"],
                       load_file(model / "vae" / "diffusion_pytorch_model.safetensors")["encoder.conv_in.weight"])
    assert pipe.qformer.num_query_tokens == 4

    events = EventAccumulator(str(reference / "logs"), size_guidance={"images": 0}).Reload()
    assert {"train/loss", "train/grad_norm", "train/lr", "train/samples_per_s"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("train/loss")] == list(range(1, 13))
    assert [event.step for event in events.Images("validation")] == [4, 8, 12]
    for step in (4, 8, 12):
        with Image.open(reference / "validation" / f"step-{step:07d}.png") as grid:
            assert grid.size == (4 * 32, 32)  # the held-out pair's input, then one image per prompt
    progress = json.loads((reference / "progress.json").read_text())
    assert progress["step"] == 12 and progress["eta_seconds"] == 0


def test_a_checkpoint_generates_with_blipdiff_generate(reference, tmp_path):
    out = tmp_path / "generated"
    result = CliRunner().invoke(app, [
        "generate", "--model", str(checkpoints(reference)[-1]), "--image", str(next((reference / "validation").iterdir())),
        "--subject", "dog", "--prompt", "on the beach", "--out", str(out), "--steps", "2", "--height", "32",
        "--width", "32"])
    assert result.exit_code == 0, result.output
    with Image.open(out / "p000_i00.png") as image:
        assert image.size == (32, 32)


def test_two_workers_of_batch_one_match_one_worker_of_batch_two(reference, model, pairs, tmp_path):
    out = tmp_path / "one-worker"
    run_pretrain(PretrainConfig(pairs=[pairs], init=str(model), out=out, **{**RUN, "steps": 8, "workers": 1,
                                                                             "batch_size": 2}), log=lambda line: None)
    ours, theirs = weights(out / "checkpoints" / "step-0000008"), weights(reference / "checkpoints" / "step-0000008")
    moved = largest_difference(theirs, weights(model))
    # Float rounding differs with the split, and Adam turns the sign of a near-zero gradient into a whole
    # step: a percent of the way moved, where another split of the data would differ by all of it.
    assert largest_difference(ours, theirs) < 0.05 * moved
    losses = pd.read_parquet(out / "metrics.parquet")["loss"].to_numpy()
    np.testing.assert_allclose(losses, pd.read_parquet(reference / "metrics.parquet")["loss"].to_numpy()[:8], rtol=1e-5)


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(reference, model, pairs, tmp_path):
    out = tmp_path / "killed"
    command = [str(BLIPDIFF), "pretrain", "--pairs", str(pairs), "--init", str(model), "--out", str(out),
               *cli_options(RUN)]
    first = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-0000004").is_dir():
        assert first.poll() is None, first.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    assert checkpoint_steps(out) and checkpoint_steps(out)[-1] < 12, "the kill should land mid-run"

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    assert "the run's pairs, as collected at its start: 5 to train on" in again.stdout
    assert largest_difference(weights(out / "checkpoints" / "step-0000012"),
                              weights(reference / "checkpoints" / "step-0000012")) < 1e-6
    ours, theirs = pd.read_parquet(out / "metrics.parquet"), pd.read_parquet(reference / "metrics.parquet")
    assert list(ours["step"]) == list(range(1, 13))
    np.testing.assert_allclose(ours["loss"], theirs["loss"], rtol=1e-6)

    # A finished run is not redone; other settings are refused.
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "already reached step 12" in done.stdout
    other = subprocess.run([*command, "--seed", "1"], capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "holds a run with other settings (seed)" in other.stderr


def train_workers() -> list[int]:
    """Process ids of Ray Train's workers (their command line names the actor)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass
    return pids


def test_a_failed_worker_is_restarted_from_the_last_checkpoint(reference, model, pairs, tmp_path):
    out = tmp_path / "worker-lost"
    command = [str(BLIPDIFF), "pretrain", "--pairs", str(pairs), "--init", str(model), "--out", str(out),
               *cli_options(RUN)]
    run = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "step-0000004").is_dir() or not train_workers():
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(train_workers()[-1], signal.SIGKILL)
    stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr[-3000:]
    assert largest_difference(weights(out / "checkpoints" / "step-0000012"),
                              weights(reference / "checkpoints" / "step-0000012")) < 1e-6


def checkpoint_steps(run: Path) -> list[int]:
    return [int(folder.name.split("-")[1]) for folder in checkpoints(run)]


def test_subject_dropout_is_drawn_per_sample_and_the_text_alone_then_guides(model, pairs, ray_cluster, tmp_path):
    from blipdiff.models.blip_diffusion import BlipDiffusionPipeline
    from blipdiff.models.training.objective import PretrainObjective
    from blipdiff.models.training.pretrain_model import batch_inputs

    encode_latents(EncodeLatentsConfig(pairs=pairs, model=str(model), resolution=32), log=lambda line: None)
    record = {"input_path": str(pairs / "input/00/0000000000000000.jpg"), "label": "dog",
              "captions": ["a photo of a dog"],
              "latent_path": str(next((pairs / "latents").rglob("0000000000000000.safetensors")))}
    recipe = SampleRecipe(seed=0, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, scaling_factor=0.18215,
                          num_train_timesteps=1000)
    kept = np.array([make_sample(record, position, recipe)["keep_subject"] for position in range(2000)])
    assert abs((1 - kept.mean()) - 0.15) < 0.025
    # Within global batches of 8, some keep the subject and some drop it: the draw is per sample.
    batches = kept.reshape(-1, 8)
    assert (batches.any(axis=1) & ~batches.all(axis=1)).mean() > 0.5
    # Every draw of a sample depends on its position alone: the same position gives the same sample.
    again, other = make_sample(record, 7, recipe), make_sample(record, 8, recipe)
    first = make_sample(record, 7, recipe)
    assert all(np.array_equal(first[key], again[key]) for key in first)
    assert not np.array_equal(first["noise"], other["noise"])
    schedule = WorkerSchedule(rank=1, workers=2, batch_size=2, accumulation=2)
    assert schedule.positions(3, np.arange(4)).tolist() == [3 * 8 + 2, 3 * 8 + 3, 3 * 8 + 6, 3 * 8 + 7]

    pipe = BlipDiffusionPipeline.from_pretrained(model)
    objective = PretrainObjective(pipe).eval()
    samples = [make_sample(record, position, recipe) for position in range(2)]
    batch = {key: np.stack([sample[key] for sample in samples]) for key in samples[0]}
    batch["keep_subject"] = np.array([True, False])
    inputs = batch_inputs(pipe, batch, "cpu")
    with torch.no_grad():
        context = objective.context(**{key: inputs[key] for key in ("pixel_values", "subject_ids", "subject_mask",
                                                                    "text_ids", "insert_at", "keep_subject")})
        text = pipe.tokenizer([str(batch["text"][1])], padding="max_length", max_length=77, return_tensors="pt")
        alone = pipe.text_encoder(text.input_ids)
        subject = pipe.qformer(inputs["pixel_values"][:1], inputs["subject_ids"][:1], inputs["subject_mask"][:1])
        inserted = pipe.text_encoder(inputs["text_ids"][:1], subject, int(inputs["insert_at"][0]))
    torch.testing.assert_close(context[1], alone[0])
    torch.testing.assert_close(context[0], inserted[0])
    ids = inputs["text_ids"][0].tolist()
    assert ids[int(inputs["insert_at"][0])] == pipe.tokenizer.eos_token_id, "the subject goes before the end token"


def test_latents_are_cached_per_vae_and_missing_files_are_counted(ray_cluster, model, tmp_path):
    pairs = write_pairs(tmp_path / "pairs")
    (pairs / "target/00/0000000000000001.jpg").unlink()
    (pairs / "input/00/0000000000000002.jpg").unlink()
    (pairs / "target/00/0000000000000003.jpg").write_bytes(b"not a photo")
    runner = CliRunner()
    first = runner.invoke(app, ["encode-latents", "--pairs", str(pairs), "--model", str(model), "--resolution", "32"])
    assert first.exit_code == 0, first.output
    assert "4 encoded, 0 already cached, 1 skipped (missing target file), 1 skipped (unreadable target" in first.output
    folders = list((pairs / "latents").iterdir())
    assert len(folders) == 1
    manifest = pd.read_parquet(folders[0] / "latents.parquet")
    assert (manifest["status"] == "encoded").sum() == 4
    files = {path: path.stat().st_mtime_ns for path in folders[0].rglob("*.safetensors")}
    assert len(files) == 4

    again = runner.invoke(app, ["encode-latents", "--pairs", str(pairs), "--model", str(model), "--resolution", "32"])
    assert again.exit_code == 0 and "0 encoded, 4 already cached" in again.output
    assert {path: path.stat().st_mtime_ns for path in folders[0].rglob("*.safetensors")} == files

    # Another VAE (or resolution) never reads these: it gets a folder of its own.
    other = save_tiny_blip_diffusion(tmp_path / "other", seed=1)
    encode_latents(EncodeLatentsConfig(pairs=pairs, model=str(other), resolution=32), log=lambda line: None)
    encode_latents(EncodeLatentsConfig(pairs=pairs, model=str(model), resolution=16), log=lambda line: None)
    assert len(list((pairs / "latents").iterdir())) == 3

    # Pre-training counts and skips the pairs it cannot use.
    from blipdiff.tasks.pretrain.launch import prepare_records

    lines = []
    config = PretrainConfig(pairs=[pairs], init=str(model), out=tmp_path / "run", **RUN)
    training, held, _ = prepare_records(config, lines.append)
    assert (training.num_rows, held.num_rows) == (2, 1)
    assert "1 skipped (missing input file)" in lines[-1] and "no latents (missing target file)" in lines[-1]


def test_reset_from_sd_trains_stable_diffusions_components_with_their_own_latents(ray_cluster, model, pairs, tmp_path):
    stable_diffusion = save_tiny_blip_diffusion(tmp_path / "sd", seed=2)
    out = tmp_path / "reset"
    run_pretrain(PretrainConfig(pairs=[pairs], init=str(model), reset_from_sd=str(stable_diffusion), out=out,
                                **{**RUN, "steps": 1, "workers": 1, "lr": 1e-9, "validate_every": 0}),
                 log=lambda line: None)
    trained = weights(out / "checkpoints" / "step-0000001")
    sd, init = weights(stable_diffusion), weights(model)
    for component in ("unet.", "text_encoder."):
        keys = [key for key in trained if key.startswith(component)]
        assert max((trained[k] - sd[k]).abs().max().item() for k in keys) < 1e-6
        assert max((trained[k] - init[k]).abs().max().item() for k in keys) > 0.01
    assert largest_difference({k: v for k, v in trained.items() if k.startswith("qformer.")},
                              {k: v for k, v in init.items() if k.startswith("qformer.")}) < 1e-6
    vae = load_file(out / "checkpoints" / "step-0000001" / "vae" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(vae["encoder.conv_in.weight"],
                       load_file(stable_diffusion / "vae" / "diffusion_pytorch_model.safetensors")["encoder.conv_in.weight"])
    descriptions = [json.loads(path.read_text())["vae"] for path in (pairs / "latents").glob("*/vae.json")]
    assert str(stable_diffusion) in descriptions


@pytest.mark.parametrize(("arguments", "message"), [
    (["--pairs", "{empty}"], "has no pairs.parquet"),
    (["--steps", "0"], "steps: Input should be greater than or equal to 1"),
    (["--resolution", "30"], "30 is not a multiple of 8"),
    (["--precision", "fp16"], "precision: Input should be 'bf16' or 'fp32'"),
    (["--init", "{empty}"], "is not a BLIP-Diffusion checkpoint: it has no model_index.json"),
    (["--validation-pairs", "6"], "6 usable pairs: too few to hold 6 out"),
    (["--workers", "4"], "4 workers need 5 CPUs of the Ray cluster"),
])
def test_bad_input_is_a_clear_error(ray_cluster, model, pairs, tmp_path, arguments, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = {"--pairs": str(pairs), "--init": str(model), "--out": str(tmp_path / "run"), "--resolution": "32",
            "--steps": "2"}
    for key, value in zip(arguments[::2], arguments[1::2]):
        base[key] = value.format(empty=empty)
    result = CliRunner().invoke(app, ["pretrain", *[part for item in base.items() for part in item]])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "run").exists(), "a refused start leaves no run folder"


def test_a_run_folder_that_is_not_a_run_is_refused(model, pairs, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    result = CliRunner().invoke(app, ["pretrain", "--pairs", str(pairs), "--init", str(model), "--out",
                                      str(tmp_path / "run"), "--resolution", "32"])
    assert result.exit_code == 2 and "is not a pre-training run folder" in result.output


def test_encode_latents_refuses_bad_input(model, pairs, tmp_path):
    runner = CliRunner()
    no_pairs = runner.invoke(app, ["encode-latents", "--pairs", str(tmp_path), "--model", str(model)])
    assert no_pairs.exit_code == 2 and "has no pairs.parquet" in no_pairs.output
    no_vae = tmp_path / "no-vae"
    no_vae.mkdir()
    (no_vae / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    result = runner.invoke(app, ["encode-latents", "--pairs", str(pairs), "--model", str(no_vae)])
    assert result.exit_code == 2 and "does not list the components vae" in result.output
    odd = runner.invoke(app, ["encode-latents", "--pairs", str(pairs), "--model", str(model), "--resolution", "20"])
    assert odd.exit_code == 2 and "20 is not a multiple of 8" in odd.output

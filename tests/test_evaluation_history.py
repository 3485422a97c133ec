"""The evaluation history and its regression rules, on crafted histories: a real drop flags and names
its subjects, seed noise does not, the copying pattern flags, and only comparable runs are compared."""

from __future__ import annotations

import pytest

from blipdiff.tasks.evaluation.history import (append_run, baseline_run, fingerprint, pin_baseline,
                                                read_history, regressions)

SETTINGS = fingerprint({"subjects": ["dog", "vase"], "prompts": 25, "images_per_prompt": 4, "steps": 100})


def run(run_id: str, time: str, dino: float, clip_i: float, clip_t: float, subjects: dict | None = None,
        seed_std: float | None = 0.002, settings: str = SETTINGS) -> dict:
    """A history row whose two subjects share the means unless ``subjects`` says otherwise."""
    per_subject = subjects or {name: {"dino": dino, "clip_i": clip_i, "clip_t": clip_t} for name in ("dog", "vase")}
    return {"run_id": run_id, "time": time, "model": "runs/stage2", "checkpoint_step": 10_000,
            "fingerprint": settings, "dino": dino, "clip_i": clip_i, "clip_t": clip_t,
            "dino_seed_std": seed_std, "clip_i_seed_std": seed_std, "clip_t_seed_std": seed_std,
            "per_subject": per_subject}


def test_the_history_appends_replaces_a_rerun_and_pins_a_baseline(tmp_path):
    append_run(tmp_path, run("a", "2026-11-01T02:00", 0.60, 0.78, 0.30))
    append_run(tmp_path, run("b", "2026-11-02T02:00", 0.61, 0.78, 0.30))
    append_run(tmp_path, run("b", "2026-11-02T02:00", 0.62, 0.78, 0.30))
    history = read_history(tmp_path)
    assert [(row["run_id"], row["dino"]) for row in history] == [("a", 0.60), ("b", 0.62)]
    assert history[1]["per_subject"]["vase"]["dino"] == 0.62
    pin_baseline(tmp_path, "a")
    assert baseline_run(tmp_path, history)["run_id"] == "a"
    with pytest.raises(ValueError, match="no run 'zzz'"):
        pin_baseline(tmp_path, "zzz")


def test_a_real_drop_flags_and_names_its_subjects():
    previous = run("a", "2026-11-01", 0.600, 0.780, 0.300)
    current = run("b", "2026-11-02", 0.585, 0.780, 0.300,
                  subjects={"dog": {"dino": 0.570, "clip_i": 0.78, "clip_t": 0.30},
                            "vase": {"dino": 0.600, "clip_i": 0.78, "clip_t": 0.30}})
    found = regressions(current, [previous, current], baseline=None)
    assert [(r.kind, r.metric, r.against) for r in found] == [("drop", "dino", "previous")]
    assert found[0].threshold == pytest.approx(0.01) and found[0].subjects == {"dog": pytest.approx(-0.03)}
    assert "dino dropped: 0.6000 → 0.5850" in found[0].describe() and "dog -0.030" in found[0].describe()


def test_seed_noise_does_not_flag_and_a_wide_spread_raises_the_threshold():
    previous = run("a", "2026-11-01", 0.600, 0.780, 0.300)
    assert regressions(run("b", "2026-11-02", 0.593, 0.773, 0.297), [previous], None) == []
    # Three times a seed-to-seed spread of 0.006 is 0.018: a 0.015 drop is within it.
    assert regressions(run("c", "2026-11-02", 0.585, 0.780, 0.300, seed_std=0.006), [previous], None) == []
    assert regressions(run("d", "2026-11-02", 0.580, 0.780, 0.300, seed_std=0.006), [previous], None)[0].metric == "dino"
    # One seed set: no spread known, the floor of 0.01 holds.
    assert regressions(run("e", "2026-11-02", 0.589, 0.780, 0.300, seed_std=None), [previous], None)[0].metric == "dino"


def test_copying_the_reference_flags():
    previous = run("a", "2026-11-01", 0.600, 0.780, 0.300)
    current = run("b", "2026-11-02", 0.640, 0.800, 0.290)
    kinds = {(r.kind, r.metric) for r in regressions(current, [previous, current], None)}
    assert kinds == {("drop", "clip_t"), ("copying", "dino"), ("copying", "clip_i")}
    # Better images with the text still followed are an improvement, not a regression.
    assert regressions(run("c", "2026-11-02", 0.640, 0.800, 0.298), [previous], None) == []


def test_only_comparable_runs_are_compared_and_the_baseline_counts_too():
    other = run("x", "2026-11-01", 0.700, 0.900, 0.350, settings=fingerprint({"subjects": ["dog"]}))
    current = run("b", "2026-11-03", 0.600, 0.780, 0.300)
    assert regressions(current, [other, current], baseline=other) == []
    baseline = run("base", "2026-10-01", 0.620, 0.780, 0.300)
    previous = run("a", "2026-11-02", 0.600, 0.780, 0.300)
    found = regressions(current, [baseline, previous, current], baseline=baseline)
    assert [(r.against, r.against_run, r.metric) for r in found] == [("baseline", "base", "dino")]

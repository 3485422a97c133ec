"""The Open Images subject filter: every rule alone and together, the choice, the inputs, the funnel."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from helpers import CLASSES, REPO, box, shared_path

from blipdiff.datasets.openimages import (
    RULE_ORDER,
    SUBJECT_COLUMNS,
    FilterConfig,
    FilterRules,
    filter_subjects,
    read_subjects,
    run_filter,
)

CAT, DOG, CUP, CAMERA, PERSON, CLOTHING, TREE, TABLE, SPOON = CLASSES


def image(n: int) -> str:
    return f"{n:016x}"


def run(write_boxes, class_file, rows, **kwargs):
    return filter_subjects(write_boxes(rows), class_file, FilterRules.paper_defaults(), **kwargs)


def chosen(result) -> dict[str, str]:
    return dict(zip(result.subjects["image_id"], result.subjects["label_mid"], strict=True))


def test_paper_rules_are_the_defaults():
    rules = FilterRules.paper_defaults()
    assert (rules.max_aspect, rules.min_area, rules.max_area) == (2.0, 0.3, 0.8)
    assert len(rules.human_classes) == 20 and PERSON in rules.human_classes
    assert set(rules.cluttered_classes) == {
        "/m/07j7r", "/m/05s2s", "/m/03fp41", "/m/01y9k5", "/m/04bcr3", "/m/01n5jq", "/m/01knjb"
    }


def test_a_box_that_passes_every_rule_becomes_the_subject(write_boxes, class_file):
    result = run(write_boxes, class_file, [box(image(1), CAT, 0.1, 0.8, 0.1, 0.7)])
    row = result.subjects.iloc[0]
    assert list(result.subjects.columns) == list(SUBJECT_COLUMNS)
    assert (row.image_id, row.label_mid, row.label_name) == (image(1), CAT, "Cat")
    assert row.area == pytest.approx(0.7 * 0.6)
    assert row.aspect == pytest.approx(0.7 / 0.6)


def test_group_rule_removes_group_of_boxes(write_boxes, class_file):
    result = run(write_boxes, class_file, [box(image(1), CAT, group=1)])
    assert result.subjects.empty
    assert result.funnel.removed["group"] == 1


def test_group_rule_removes_every_box_of_a_class_seen_twice_in_an_image(write_boxes, class_file):
    rows = [
        box(image(1), DOG),                                  # would pass alone
        box(image(1), DOG, 0.0, 0.05, 0.0, 0.05),            # tiny: fails the area rule itself
        box(image(1), CUP, 0.2, 0.7, 0.2, 0.9),              # another class: unaffected
        box(image(2), DOG),                                  # the same class in another image
    ]
    result = run(write_boxes, class_file, rows)
    assert chosen(result) == {image(1): CUP, image(2): DOG}
    assert result.funnel.removed["group"] == 2
    assert result.funnel.removed["area"] == 0


def test_inside_rule(write_boxes, class_file):
    result = run(write_boxes, class_file, [box(image(1), CAT, inside=1), box(image(2), CAT)])
    assert chosen(result) == {image(2): CAT}
    assert result.funnel.removed["inside"] == 1


@pytest.mark.parametrize(
    ("x_max", "y_max", "kept"),
    [(0.8, 0.4, True), (0.8, 0.39, False), (0.4, 0.8, True), (0.39, 0.8, False)],
    ids=["2:1 kept", "over 2:1", "1:2 kept", "over 1:2"],
)
def test_aspect_rule_bound_is_kept(write_boxes, class_file, x_max, y_max, kept):
    result = run(write_boxes, class_file, [box(image(1), CAT, 0.0, x_max, 0.0, y_max)])
    assert (len(result.subjects) == 1) is kept
    assert result.funnel.removed["aspect"] == (0 if kept else 1)


@pytest.mark.parametrize(
    ("x_max", "y_max", "kept"),
    [(0.5, 0.6, True), (0.5, 0.58, False), (1.0, 0.8, True), (1.0, 0.81, False)],
    ids=["area 0.3 kept", "below 0.3", "area 0.8 kept", "above 0.8"],
)
def test_area_rule_bounds_are_kept(write_boxes, class_file, x_max, y_max, kept):
    result = run(write_boxes, class_file, [box(image(1), CAT, 0.0, x_max, 0.0, y_max)])
    assert (len(result.subjects) == 1) is kept
    assert result.funnel.removed["area"] == (0 if kept else 1)


def test_human_rule_removes_the_whole_image(write_boxes, class_file):
    rows = [
        box(image(1), CAMERA),
        box(image(1), PERSON, 0.0, 0.05, 0.0, 0.05),  # a tiny person still makes the image human
        box(image(2), CAMERA),
        box(image(3), CLOTHING),                     # a passing box of a human class
    ]
    result = run(write_boxes, class_file, rows)
    assert chosen(result) == {image(2): CAMERA}
    assert result.funnel.removed["human"] == 2       # image 1's camera and image 3's clothing
    assert result.funnel.removed["area"] == 1


def test_cluttered_rule_removes_the_box_but_not_the_image(write_boxes, class_file):
    rows = [
        box(image(1), TABLE, 0.0, 0.9, 0.0, 0.85),   # the largest box, but cluttered
        box(image(1), CUP, 0.2, 0.7, 0.1, 0.8),
        box(image(2), TREE),
    ]
    result = run(write_boxes, class_file, rows)
    assert chosen(result) == {image(1): CUP}
    assert result.funnel.removed["cluttered"] == 2


def test_one_subject_per_image_the_largest(write_boxes, class_file):
    rows = [
        box(image(1), CAT, 0.0, 0.6, 0.0, 0.6),      # 0.36
        box(image(1), DOG, 0.0, 0.7, 0.0, 0.7),      # 0.49: largest
        box(image(1), CUP, 0.0, 0.5, 0.0, 0.7),      # 0.35
    ]
    result = run(write_boxes, class_file, rows)
    assert chosen(result) == {image(1): DOG}
    assert result.funnel.removed["one_per_image"] == 2


def test_equal_areas_go_to_the_smallest_mid(write_boxes, class_file):
    rows = [box(image(1), DOG, 0.0, 0.6, 0.0, 0.6), box(image(1), CAT, 0.2, 0.8, 0.2, 0.8)]
    assert chosen(run(write_boxes, class_file, rows)) == {image(1): min(CAT, DOG)}


def test_rules_combined(write_boxes, class_file):
    rows = [
        # image 1: the dog repeats (group), the cup is inside, the spoon is too thin: no subject
        box(image(1), DOG), box(image(1), DOG, group=1), box(image(1), CUP, inside=1),
        box(image(1), SPOON, 0.1, 0.2, 0.0, 1.0),
        # image 2: a cluttered table and a valid camera; a human would remove both, none here
        box(image(2), TABLE, 0.0, 1.0, 0.1, 0.9), box(image(2), CAMERA, 0.3, 0.9, 0.2, 0.8),
        # image 3: the only passing box loses to the human rule
        box(image(3), CAT), box(image(3), PERSON, group=1),
        # image 4: one valid box among invalid rows of other classes
        box(image(4), CUP, 0.2, 0.7, 0.2, 0.9), box(image(4), SPOON, 0.5, 0.4),
    ]
    result = run(write_boxes, class_file, rows)
    assert chosen(result) == {image(2): CAMERA, image(4): CUP}
    removed = result.funnel.removed
    assert removed == {
        "invalid": 1, "group": 3, "inside": 1, "aspect": 1, "area": 0, "human": 1, "cluttered": 1,
        "one_per_image": 0,
    }


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (box("not-an-image-id!", CAT), "bad_image_id"),
        (box(image(1).upper().replace("0", "A"), CAT), "bad_image_id"),
        (box(image(1), ""), "missing_value"),
        (box(image(1), CAT, x_min=""), "missing_value"),
        (box(image(1), CAT, group=""), "missing_value"),
        (box(image(1), CAT, y_max="oops"), "missing_value"),
        (box(image(1), "/m/notaclass"), "unknown_class"),
        (box(image(1), CAT, -0.1, 0.8), "coordinate_out_of_range"),
        (box(image(1), CAT, 0.1, 1.2), "coordinate_out_of_range"),
        (box(image(1), CAT, 0.8, 0.1), "empty_box"),
        (box(image(1), CAT, 0.1, 0.8, 0.5, 0.5), "empty_box"),
    ],
)
def test_invalid_rows_are_counted_not_fatal(write_boxes, class_file, row, reason):
    result = run(write_boxes, class_file, [row, box(image(7), CAT)])
    assert chosen(result) == {image(7): CAT}
    assert result.funnel.removed["invalid"] == 1
    assert result.funnel.invalid_reasons[reason] == 1
    assert result.funnel.rows_read == 2


def test_a_malformed_line_is_skipped_and_counted(write_boxes, class_file, tmp_path):
    path = write_boxes([box(image(1), CAT)])
    with open(path, "a") as handle:
        handle.write("0000000000000002,xclick,/m/01yrx\n")
    result = filter_subjects(path, class_file, FilterRules.paper_defaults())
    assert chosen(result) == {image(1): CAT}
    assert result.funnel.invalid_reasons["malformed_line"] == 1
    assert result.funnel.rows_read == 2


def test_an_invalid_box_still_counts_towards_its_class_in_the_image(write_boxes, class_file):
    # Two cats were annotated; one box is corrupt. The image still shows its class twice.
    rows = [box(image(1), CAT), box(image(1), CAT, 0.9, 0.1)]
    result = run(write_boxes, class_file, rows)
    assert result.subjects.empty
    assert result.funnel.removed["invalid"] == 1 and result.funnel.removed["group"] == 1


def test_a_box_beside_an_invalid_one_of_its_class_is_counted_under_group_not_its_own_rule(write_boxes, class_file):
    rows = [box(image(1), CAT, 0.0, 0.05, 0.0, 0.05), box(image(1), CAT, 0.9, 0.1),  # too small; corrupt
            box(image(2), DOG, 0.0, 0.05, 0.0, 0.05)]                                # too small, alone
    removed = run(write_boxes, class_file, rows).funnel.removed
    assert (removed["invalid"], removed["group"], removed["area"]) == (1, 1, 1)


def test_a_human_box_with_a_bad_image_id_removes_no_other_image(write_boxes, class_file):
    # The bad id is no image at all: it must not make every other image look human (a NULL in an IN list).
    rows = [box("not-an-image-id!", PERSON), box(image(1), CAT), box(image(2), DOG)]
    result = run(write_boxes, class_file, rows)
    assert chosen(result) == {image(1): CAT, image(2): DOG}
    assert result.funnel.invalid_reasons["bad_image_id"] == 1 and result.funnel.removed["human"] == 0


def test_a_line_with_too_many_values_is_malformed(write_boxes, class_file):
    path = write_boxes([box(image(1), CAT), box(image(2), DOG)])
    header, first, second = path.read_text().splitlines()
    path.write_text(f"{header}\n{first}\n{second},one too many\n")
    result = filter_subjects(path, class_file, FilterRules.paper_defaults())
    assert chosen(result) == {image(1): CAT}
    assert result.funnel.invalid_reasons["malformed_line"] == 1 and result.funnel.rows_read == 2


def test_a_value_with_a_line_break_is_read_whole_beside_a_malformed_line(write_boxes, class_file):
    # DuckDB's parallel scanner refuses a quoted line break where lines may be padded; the filter reads such a file
    # in one thread, and a short line in it is still malformed.
    path = write_boxes([box(image(1), CAT), box(image(2), DOG)])
    header, first, second = path.read_text().splitlines()
    broken = first.replace("xclick", '"x\nclick"')
    path.write_text(f"{header}\n{broken}\n{second}\n{second[:40]}\n")
    result = filter_subjects(path, class_file, FilterRules.paper_defaults())
    assert chosen(result) == {image(1): CAT, image(2): DOG}
    assert result.funnel.invalid_reasons["malformed_line"] == 1 and result.funnel.rows_read == 3


def test_funnel_adds_up_and_is_written(write_boxes, class_file, tmp_path):
    rows = [box(image(i), [CAT, DOG, CUP, TREE, PERSON][i % 5], 0.0, 0.3 + 0.05 * (i % 11), 0.0, 0.9,
                group=int(i % 13 == 0), inside=int(i % 17 == 0)) for i in range(300)]
    rows += [box(image(i), DOG, 0.0, 0.7, 0.0, 0.7) for i in range(0, 300, 7)]
    out = tmp_path / "out"
    result = run_filter(FilterConfig(boxes=write_boxes(rows), classes=class_file, out=out))
    funnel = json.loads((out / "funnel.json").read_text())
    assert funnel["rows_read"] == len(rows) == sum(funnel["removed"].values()) + funnel["subjects"]
    assert funnel["images_read"] == 300
    assert list(funnel["removed"]) == list(RULE_ORDER)
    assert funnel["subjects"] == len(result.subjects) == len(read_subjects(out / "subjects.parquet"))
    assert result.funnel.rows()[-1] == ("one_per_image", funnel["removed"]["one_per_image"], funnel["subjects"])


def _read_csv(path):
    """Read a box CSV keeping ImageID a string (an all-digit id would otherwise become a number)."""
    return pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(column_types={"ImageID": pa.string()}))


def _load_bench_module():
    spec = importlib.util.spec_from_file_location("bench_filter", REPO / "bench" / "filter.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_filter():
    return _load_bench_module()


@pytest.fixture
def generated_boxes(tmp_path, bench_filter):
    classes = shared_path("openimages", "class-descriptions-boxable.csv")
    sorted_boxes = tmp_path / "sorted.csv"
    bench_filter.generate_v6_boxes(sorted_boxes, 40_000, classes, seed=3)
    table = _read_csv(sorted_boxes)
    order = np.random.default_rng(5).permutation(table.num_rows)
    shuffled = tmp_path / "shuffled.csv"
    pa_csv.write_csv(table.take(order), shuffled)
    return sorted_boxes, shuffled, classes


def test_same_subjects_as_the_plain_pandas_way(generated_boxes, bench_filter):
    sorted_boxes, _, classes = generated_boxes
    ours = filter_subjects(sorted_boxes, classes, FilterRules.paper_defaults(), block_bytes=1 << 16)
    assert len(ours.subjects) > 500
    expected = bench_filter.pandas_baseline(sorted_boxes, classes)
    pd.testing.assert_frame_equal(ours.subjects.astype(expected.dtypes.to_dict()), expected)


def test_row_order_does_not_change_the_result(generated_boxes):
    sorted_boxes, shuffled, classes = generated_boxes
    rules = FilterRules.paper_defaults()
    in_order = filter_subjects(sorted_boxes, classes, rules, block_bytes=1 << 16)
    for block_bytes in (1 << 14, 1 << 20):
        any_order = filter_subjects(shuffled, classes, rules, block_bytes=block_bytes)
        pd.testing.assert_frame_equal(any_order.subjects, in_order.subjects)
        assert any_order.funnel == in_order.funnel


def test_a_file_sorted_in_parts_is_read_again_and_gives_the_same_result(generated_boxes, tmp_path):
    sorted_boxes, _, classes = generated_boxes
    table = _read_csv(sorted_boxes)
    half = table.num_rows // 2
    concatenated = tmp_path / "two-sorted-halves.csv"
    pa_csv.write_csv(pa.concat_tables([table.slice(half), table.slice(0, half)]), concatenated)
    rules = FilterRules.paper_defaults()
    expected = filter_subjects(sorted_boxes, classes, rules, block_bytes=1 << 15)
    result = filter_subjects(concatenated, classes, rules, block_bytes=1 << 15)
    pd.testing.assert_frame_equal(result.subjects, expected.subjects)
    assert result.funnel == expected.funnel


def test_csv_gzip_and_parquet_inputs_agree(write_boxes, class_file, tmp_path):
    rows = [box(image(i), [CAT, DOG, CUP][i % 3], 0.0, 0.5 + 0.01 * i, 0.0, 0.8) for i in range(20)]
    rows.append(box(image(3), CAT, 1.5))
    csv_path = write_boxes(rows)
    gz_path = tmp_path / "boxes.csv.gz"
    with open(csv_path, "rb") as source, gzip.open(gz_path, "wb") as target:
        shutil.copyfileobj(source, target)
    parquet_path = tmp_path / "boxes.parquet"
    pq.write_table(_read_csv(csv_path), parquet_path)
    results = [filter_subjects(p, class_file, FilterRules.paper_defaults()) for p in (csv_path, gz_path, parquet_path)]
    for other in results[1:]:
        pd.testing.assert_frame_equal(other.subjects, results[0].subjects)
        assert other.funnel == results[0].funnel
    assert len(results[0].subjects) == 19 and results[0].funnel.removed["invalid"] == 1


def test_validation_and_test_schema_with_13_columns(write_boxes, class_file):
    path = write_boxes([box(image(1), CAT), box(image(2), DOG, group=1)], schema="v13")
    assert len(open(path).readline().split(",")) == 13
    assert chosen(filter_subjects(path, class_file, FilterRules.paper_defaults())) == {image(1): CAT}


def test_real_v6_train_head(tmp_path):
    boxes = shared_path("openimages", "format_samples", "oidv6-train-annotations-bbox_head.csv")
    classes = shared_path("openimages", "class-descriptions-boxable.csv")
    result = filter_subjects(boxes, classes, FilterRules.paper_defaults())
    frame = pd.read_csv(boxes)
    assert len(frame.columns) == 21
    assert result.funnel.rows_read == len(frame)
    assert result.funnel.images_read == frame["ImageID"].nunique()
    # Every box of the head is a Person: the image yields no subject, by the group or human rule.
    assert set(frame["LabelName"]) == {PERSON}
    assert result.subjects.empty
    assert result.funnel.removed["invalid"] == 0


@pytest.mark.parametrize(
    "name", ["mmdetection_tests_oidv6-train-annotations-bbox.csv", "v3_val_test_annotations-human-bbox_sample.csv"]
)
def test_real_13_column_heads(name):
    boxes = shared_path("openimages", "format_samples", name)
    classes = shared_path("openimages", "class-descriptions-boxable.csv")
    frame = pd.read_csv(boxes)
    result = filter_subjects(boxes, classes, FilterRules.paper_defaults())
    assert result.funnel.rows_read == len(frame)
    assert result.funnel.rows_read == sum(result.funnel.removed.values()) + result.funnel.subjects
    for subject in result.subjects.itertuples():
        boxes_of_class = frame[(frame.ImageID == subject.image_id) & (frame.LabelName == subject.label_mid)]
        assert len(boxes_of_class) == 1
        assert 0.3 <= subject.area <= 0.8 and subject.aspect <= 2


def test_a_file_without_the_needed_columns_is_a_clear_error(class_file):
    boxes = shared_path("openimages", "format_samples", "v3_train_annotations-human-bbox_sample.csv")
    with pytest.raises(ValueError, match="missing column.*IsGroupOf"):
        filter_subjects(boxes, class_file, FilterRules.paper_defaults())


def test_rules_file_replaces_the_defaults(write_boxes, class_file, tmp_path):
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(
        "max_aspect = 3.0\nmin_area = 0.1\nmax_area = 0.9\n"
        '[human_classes]\n"/m/01g317" = "Person"\n[cluttered_classes]\n"/m/0cmx8" = "Spoon"\n'
    )
    rows = [
        box(image(1), CAT, 0.0, 0.75, 0.0, 0.25),    # aspect 3, area 0.19: kept by these rules only
        box(image(2), TABLE), box(image(3), SPOON),  # table no longer cluttered; spoon now is
    ]
    out = tmp_path / "out"
    result = run_filter(FilterConfig(boxes=write_boxes(rows), classes=class_file, out=out, rules=rules_file))
    assert chosen(result) == {image(1): CAT, image(2): TABLE}


def test_bad_rules_file_is_rejected(tmp_path):
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text("max_aspect = 2\nmin_area = 0.9\nmax_area = 0.3\n[human_classes]\n[cluttered_classes]\n")
    with pytest.raises(ValueError, match="min_area"):
        FilterRules.from_toml(rules_file)


def test_a_file_grouped_by_image_but_not_in_id_order_gives_the_same_result(tmp_path, bench_filter):
    """Each image's rows together, the images in no particular order (as a concatenation of files gives)."""
    classes = shared_path("openimages", "class-descriptions-boxable.csv")
    sorted_boxes, grouped = tmp_path / "sorted.csv", tmp_path / "grouped.csv"
    bench_filter.generate_v6_boxes(sorted_boxes, 30_000, classes, seed=4, order="sorted")
    bench_filter.generate_v6_boxes(grouped, 30_000, classes, seed=4, order="grouped")
    ids = _read_csv(grouped).column("ImageID").to_pylist()
    assert ids != sorted(ids) and len({i for i, n in zip(ids, ids[1:]) if i != n}) == len(set(ids)) - 1, \
        "grouped: every image's rows are contiguous, the images out of order"
    rules = FilterRules.paper_defaults()
    expected, result = (filter_subjects(path, classes, rules) for path in (sorted_boxes, grouped))
    assert len(expected.subjects) > 300
    pd.testing.assert_frame_equal(result.subjects, expected.subjects)
    assert result.funnel == expected.funnel


def test_the_memory_limit_spills_inside_out_and_the_spill_is_removed(tmp_path, bench_filter):
    """Under a memory limit its pairs do not fit in, DuckDB spills into a folder inside OUT (seen while it runs),
    gives the same result, and the folder is gone at the end; a killed run's leftover spill is cleared; a limit
    too small to run at all and a bad limit are clear errors."""
    classes = shared_path("openimages", "class-descriptions-boxable.csv")
    boxes = tmp_path / "shuffled.csv"
    bench_filter.generate_v6_boxes(boxes, 1_000_000, classes, seed=6, order="shuffled")
    out = tmp_path / "out"
    (out / ".tmp-filter-spill-killed").mkdir(parents=True)
    (out / ".tmp-filter-spill-killed" / "duckdb_temp_block.bin").write_bytes(b"x" * 100)
    spilled, done = set(), threading.Event()

    def watch() -> None:
        while not done.is_set():
            spilled.update(path.name for path in out.glob(".tmp-filter-spill*/*") if path.name != "duckdb_temp_block.bin")
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        small = run_filter(FilterConfig(boxes=boxes, classes=classes, out=out, memory_limit="100MB"))
    finally:
        done.set()
        watcher.join()
    assert any(name.startswith("duckdb_temp") for name in spilled), spilled
    assert sorted(path.name for path in out.iterdir()) == ["funnel.json", "subjects.parquet"]
    roomy = filter_subjects(boxes, classes, FilterRules.paper_defaults(), memory_limit="4GB")
    pd.testing.assert_frame_equal(small.subjects, roomy.subjects)
    assert small.funnel == roomy.funnel and len(small.subjects) > 10_000
    with pytest.raises(ValueError, match="raise it with --memory-limit"):
        filter_subjects(boxes, classes, FilterRules.paper_defaults(), memory_limit="20MB")
    with pytest.raises(ValueError, match="memory limit 'lots'"):
        filter_subjects(boxes, classes, FilterRules.paper_defaults(), memory_limit="lots")


def test_the_benchmark_file_has_the_real_train_files_shape(tmp_path, bench_filter):
    """bench/filter.py's rows are written as the real V6 train head's: same header, every column filled, six
    decimals for coordinates and clicks (-1 for a box without clicks), 0/1 flags; about the real bytes a row."""
    real = shared_path("openimages", "format_samples", "oidv6-train-annotations-bbox_head.csv")
    classes = shared_path("openimages", "class-descriptions-boxable.csv")
    boxes = tmp_path / "boxes.csv"
    bench_filter.generate_v6_boxes(boxes, 20_000, classes, seed=1)
    real_lines, lines = real.read_text().splitlines(), boxes.read_text().splitlines()
    assert lines[0] == real_lines[0]
    decimals, flags = r"(0\.\d{6}|1\.000000)", "[01]"
    for line in [*real_lines[1:], *lines[1:]]:
        cells = line.split(",")
        assert len(cells) == 21 and all(cells)
        assert re.fullmatch("[0-9a-f]{16}", cells[0]) and cells[3] == "1"
        assert all(re.fullmatch(decimals, cell) for cell in cells[4:8])
        assert all(re.fullmatch(flags, cell) for cell in cells[8:13])
        clicks = {"xclick": decimals, "activemil": "-1"}[cells[1]]
        assert all(re.fullmatch(clicks, cell) for cell in cells[13:])
    assert abs(boxes.stat().st_size / (len(lines) - 1) / bench_filter.REAL_BYTES_PER_ROW - 1) < 0.03


def test_the_seconds_of_each_statement_are_reported(generated_boxes):
    sorted_boxes, _, classes = generated_boxes
    result = filter_subjects(sorted_boxes, classes, FilterRules.paper_defaults())
    assert list(result.seconds) == ["pairs", "crowded", "passed", "subjects", "totals"]
    assert all(seconds >= 0 for seconds in result.seconds.values())

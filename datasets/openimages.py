"""Open Images box annotations → one subject per image, by the rules of the paper's appendix A.4.

The filter streams the box file in blocks and keeps only compact per-image state, so its memory
does not grow with the file beyond that state, and its result does not depend on the row order:

* per (image, class) pair, how many boxes it has and how its valid boxes fared against the
  box-level rules (group-of, inside, aspect, area): the group rule and the funnel need the final
  count of a class in an image, which a stream only knows at its end;
* every box that passes the box-level rules (a candidate subject), with its coordinates.

Image ids are packed into 64-bit integers (they are 16 hex digits) and classes into 16-bit indices
into the sorted class list, so the smallest index is the smallest MID (the tie-break).
"""

from __future__ import annotations

import csv
import gzip
import tomllib
from collections.abc import Callable, Iterator
from typing import NamedTuple
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from blipdiff.infra.atomic import atomic_path, remove_stale_temporaries, write_json_atomic

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf", "IsInside")
COORDINATE_COLUMNS = ("XMin", "XMax", "YMin", "YMax")
FLAG_COLUMNS = ("IsGroupOf", "IsInside")
SUBJECT_COLUMNS = (
    "image_id", "label_mid", "label_name", "x_min", "x_max", "y_min", "y_max", "area", "aspect",
)
# The funnel's rules, in the order they are applied: a box is counted under the first that removes it.
RULE_ORDER = ("invalid", "group", "inside", "aspect", "area", "human", "cluttered", "one_per_image")
INVALID_REASONS = (
    "malformed_line", "bad_image_id", "missing_value", "unknown_class", "coordinate_out_of_range",
    "empty_box",
)

# A box's outcome: the first box-level rule that rejects it, PASSED, or INVALID (an invalid box still
# counts towards its class's number of boxes in the image).
GROUP_OF, INSIDE, ASPECT, AREA, PASSED, INVALID = range(6)
N_OUTCOMES = 6

DEFAULT_RULES_FILE = "openimages_v6.toml"
# Arrow's streaming CSV reader holds a few dozen blocks in flight: small blocks keep memory flat.
DEFAULT_BLOCK_BYTES = 4 << 20
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
_HEX_VALUE[_HEX_DIGITS] = np.arange(16, dtype=np.uint8)
_NUMBER_PATTERN = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


class FilterRules(BaseModel):
    """Thresholds and class lists of the subject filter; defaults are the paper's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_aspect: float = Field(gt=1.0)
    min_area: float = Field(ge=0.0, le=1.0)
    max_area: float = Field(ge=0.0, le=1.0)
    human_classes: dict[str, str]
    cluttered_classes: dict[str, str]

    @model_validator(mode="after")
    def _area_bounds_ordered(self) -> FilterRules:
        if self.min_area > self.max_area:
            raise ValueError(f"min_area {self.min_area} exceeds max_area {self.max_area}")
        return self

    @classmethod
    def from_toml(cls, path: Path) -> FilterRules:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ValueError(f"cannot read rules file {path}: {error}") from error
        return cls.model_validate(data)

    @classmethod
    def paper_defaults(cls) -> FilterRules:
        text = resources.files("blipdiff.datasets").joinpath("rules", DEFAULT_RULES_FILE).read_text()
        return cls.model_validate(tomllib.loads(text))


class FilterConfig(BaseModel):
    """Everything one run of the filter needs; shared by the CLI, the flows and the tests."""

    model_config = ConfigDict(extra="forbid")

    boxes: Path = Field(description="Open Images box annotations: .csv, .csv.gz or .parquet")
    classes: Path = Field(description="class descriptions, `MID,Name` without a header")
    out: Path = Field(description="folder that receives subjects.parquet and funnel.json")
    rules: Path | None = Field(default=None, description="rules TOML; the paper's when absent")
    block_bytes: int = Field(default=DEFAULT_BLOCK_BYTES, gt=0, description="CSV bytes per block")

    def load_rules(self) -> FilterRules:
        return FilterRules.from_toml(self.rules) if self.rules else FilterRules.paper_defaults()


@dataclass
class Funnel:
    """What the filter read and what each rule removed, in the order the rules apply."""

    rows_read: int = 0
    images_read: int = 0
    removed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RULE_ORDER, 0))
    invalid_reasons: dict[str, int] = field(default_factory=lambda: dict.fromkeys(INVALID_REASONS, 0))
    subjects: int = 0

    def as_dict(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "images_read": self.images_read,
            "removed": dict(self.removed),
            "invalid_reasons": dict(self.invalid_reasons),
            "subjects": self.subjects,
        }

    def rows(self) -> list[tuple[str, int, int]]:
        """(step, boxes removed, boxes left) for each rule, for printing."""
        left = self.rows_read
        table = []
        for rule in RULE_ORDER:
            left -= self.removed[rule]
            table.append((rule, self.removed[rule], left))
        return table


@dataclass
class FilterResult:
    subjects: pd.DataFrame
    funnel: Funnel


class ClassList:
    """The class descriptions, sorted by MID so that index order is MID order."""

    def __init__(self, names_by_mid: dict[str, str]):
        if not names_by_mid:
            raise ValueError("the class descriptions list no class")
        if len(names_by_mid) >= np.iinfo(np.uint16).max:
            raise ValueError(f"{len(names_by_mid)} classes: at most 65534 are supported")
        self.mids = sorted(names_by_mid)
        self.names = [names_by_mid[mid] for mid in self.mids]
        self.index = {mid: i for i, mid in enumerate(self.mids)}
        self.unknown = len(self.mids)

    @classmethod
    def read(cls, path: Path) -> ClassList:
        """Read `MID,Name` rows (no header); names may be quoted and contain commas."""
        names: dict[str, str] = {}
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                for line_number, row in enumerate(csv.reader(handle), start=1):
                    if not row or not "".join(row).strip():
                        continue
                    if len(row) != 2 or not row[0].strip():
                        raise ValueError(f"{path}:{line_number}: expected `MID,Name`, got {row!r}")
                    mid, name = row[0].strip(), row[1].strip()
                    if mid in names and names[mid] != name:
                        raise ValueError(f"{path}:{line_number}: MID {mid} is listed twice")
                    names[mid] = name
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read class descriptions {path}: {error}") from error
        return cls(names)

    def indices_of(self, mids: dict[str, str]) -> np.ndarray:
        return np.array(sorted(self.index[m] for m in mids if m in self.index), dtype=np.uint16)


def _sniff_format(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PAR1":
        return "parquet"
    if head[:2] == b"\x1f\x8b":
        return "csv.gz"
    return "csv"


def _csv_header(path: Path, compressed: bool) -> list[str]:
    opener = gzip.open if compressed else open
    with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:
        return next(csv.reader(handle), [])


def iter_box_batches(
    path: Path, block_bytes: int = DEFAULT_BLOCK_BYTES, on_malformed_line: Callable[[], None] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream the columns the filter needs from a box file, in the V6 (21) or V3/val/test (13) schema.

    CSV columns arrive as strings and are parsed by the filter, so a stray value is a counted invalid
    row rather than a failed read. A CSV line with the wrong number of fields is skipped and reported
    through ``on_malformed_line``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"box annotations not found: {path}")
    kind = _sniff_format(path)
    if kind == "parquet":
        parquet = pq.ParquetFile(path)
        _require_columns(path, parquet.schema_arrow.names)
        yield from parquet.iter_batches(batch_size=1 << 20, columns=list(BOX_COLUMNS))
        return

    compressed = kind == "csv.gz"
    _require_columns(path, _csv_header(path, compressed))

    def skip_malformed(_row) -> str:
        if on_malformed_line is not None:
            on_malformed_line()
        return "skip"

    source = pa.input_stream(str(path), compression="gzip" if compressed else None)
    reader = pa_csv.open_csv(
        source,
        read_options=pa_csv.ReadOptions(block_size=block_bytes),
        parse_options=pa_csv.ParseOptions(invalid_row_handler=skip_malformed),
        convert_options=pa_csv.ConvertOptions(
            include_columns=list(BOX_COLUMNS),
            column_types=dict.fromkeys(BOX_COLUMNS, pa.string()),
            strings_can_be_null=True,
            quoted_strings_can_be_null=True,
        ),
    )
    try:
        yield from reader
    finally:
        reader.close()
        source.close()


def _require_columns(path: Path, names: list[str]) -> None:
    missing = [c for c in BOX_COLUMNS if c not in names]
    if missing:
        raise ValueError(
            f"{path} is not an Open Images box file: missing column(s) {', '.join(missing)} "
            f"(found {', '.join(names) or 'no header'})"
        )


def _as_float(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Column → float64 with NaN for a missing or unparseable value."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    try:
        parsed = pc.cast(column, pa.float64())
    except pa.ArrowInvalid:
        numeric = pc.match_substring_regex(column, _NUMBER_PATTERN)
        parsed = pc.cast(pc.if_else(numeric, pc.utf8_trim_whitespace(column), None), pa.float64())
    return parsed.to_numpy(zero_copy_only=False)


def pack_image_ids(column: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """16-hex-digit image ids → (uint64 keys, validity mask). Anything else is invalid."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    column = column.cast(pa.string())
    n = len(column)
    well_formed = pc.fill_null(pc.equal(pc.binary_length(column), 16), False)
    column = pc.if_else(well_formed, column, "g" * 16)
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32, count=n + 1, offset=4 * column.offset)
    start = int(offsets[0])
    digits = np.frombuffer(column.buffers()[2], dtype=np.uint8, count=16 * n, offset=start).reshape(n, 16)
    values = _HEX_VALUE[digits]
    valid = ~(values == 255).any(axis=1)
    packed = (values[:, 0::2] << 4) | (values[:, 1::2] & 15)
    keys = packed.view(">u8").ravel().astype(np.uint64)
    keys[~valid] = 0
    return keys, valid


def unpack_image_ids(keys: np.ndarray) -> np.ndarray:
    """uint64 keys → 16-character lowercase hex strings (numpy unicode array)."""
    keys = np.asarray(keys, dtype=np.uint64)
    shifts = np.arange(60, -4, -4, dtype=np.uint64)
    nibbles = ((keys[:, None] >> shifts) & np.uint64(15)).astype(np.intp)
    return _HEX_DIGITS[nibbles].view("S16").ravel().astype(str)


class _PairTable:
    """Per-(image, class) box counts, merged from blocks and compacted as they grow.

    A pair keeps its number of boxes, how many of them are invalid, and one box's outcome: the
    outcome only matters for a pair with a single box, the only kind that can hold a subject.
    """

    def __init__(self, initial: PairCounts | None = None) -> None:
        self._parts: list[PairCounts] = [initial] if initial is not None and len(initial.images) else []
        self._rows = len(initial.images) if self._parts else 0
        self._compact_at = 1 << 18

    def add(self, images: np.ndarray, classes: np.ndarray, outcomes: np.ndarray) -> None:
        if len(images) == 0:
            return
        ones = np.ones(len(images), dtype=np.uint32)
        invalid = (outcomes == INVALID).astype(np.uint32)
        self._parts.append(_merge_pairs(PairCounts(images, classes, ones, invalid, outcomes.astype(np.uint8))))
        self._rows += len(self._parts[-1].images)
        if self._rows > self._compact_at:
            self._compact()
            self._compact_at = max(self._compact_at, 2 * self._rows)

    def _compact(self) -> None:
        if len(self._parts) > 1:
            parts, self._parts = self._parts, []
            merged = PairCounts(*(np.concatenate(columns) for columns in zip(*parts, strict=True)))
            del parts
            self._parts = [_merge_pairs(merged)]
        self._rows = len(self._parts[0].images) if self._parts else 0

    def result(self) -> PairCounts:
        """All pairs, sorted by image then class."""
        self._compact()
        if not self._parts:
            return PairCounts(
                np.zeros(0, np.uint64), np.zeros(0, np.uint16), np.zeros(0, np.uint32),
                np.zeros(0, np.uint32), np.zeros(0, np.uint8),
            )
        return self._parts[0]


class PairCounts(NamedTuple):
    images: np.ndarray
    classes: np.ndarray
    boxes: np.ndarray
    invalid: np.ndarray
    outcome: np.ndarray


def _merge_pairs(pairs: PairCounts) -> PairCounts:
    # Sort by image, then by (image rank, class) as one integer: both sorts are stable and meet
    # nearly sorted keys when the input is sorted by image, as the official files are.
    by_image = np.argsort(pairs.images, kind="stable")
    images = pairs.images[by_image]
    image_rank = np.cumsum(np.concatenate(([True], images[1:] != images[:-1])))
    pair_key = (image_rank << 16) | pairs.classes[by_image]
    by_pair = np.argsort(pair_key, kind="stable")
    order = by_image[by_pair]
    pair_key = pair_key[by_pair]
    images, classes = pairs.images[order], pairs.classes[order]
    starts = np.flatnonzero(np.concatenate(([True], pair_key[1:] != pair_key[:-1])))
    if len(starts) == len(images):
        return PairCounts(images, classes, pairs.boxes[order], pairs.invalid[order], pairs.outcome[order])
    return PairCounts(
        images[starts], classes[starts],
        np.add.reduceat(pairs.boxes[order], starts), np.add.reduceat(pairs.invalid[order], starts),
        pairs.outcome[order[starts]],
    )


class Candidates(NamedTuple):
    """Boxes that passed the box-level rules and are of a class that can be a subject."""

    images: np.ndarray
    classes: np.ndarray
    x_min: np.ndarray
    x_max: np.ndarray
    y_min: np.ndarray
    y_max: np.ndarray

    @staticmethod
    def concat(parts: list[Candidates]) -> Candidates:
        return Candidates(*(np.concatenate(columns) for columns in zip(*parts, strict=True)))

    def take(self, mask: np.ndarray) -> Candidates:
        return Candidates(*(column[mask] for column in self))


# Without trusting the order, pairs are kept in buckets by the top bits of the image id (Open Images
# ids are hashes, so buckets fill evenly): merging and settling one bucket at a time bounds the
# temporary memory to a bucket's worth, and buckets in order are images in order.
ANY_ORDER_BUCKET_BITS = 4


class InputNotSorted(Exception):
    """Rows of an image arrived after the filter, trusting the order, had closed that image."""


class SubjectFilter:
    """Streaming accumulator: feed it box batches, then ask for the subjects and the funnel.

    With ``trust_order`` the filter expects rows grouped by ascending image id, as in the official
    files, and settles every image below the current one as it goes, so its state stays one block
    large; it raises :class:`InputNotSorted` at the first row that breaks the order. Without it, the
    state of every image is kept until the end, which gives the same result for any row order.
    """

    def __init__(self, classes: ClassList, rules: FilterRules, trust_order: bool = False):
        self.classes = classes
        self.rules = rules
        self.trust_order = trust_order
        self.funnel = Funnel()
        self._bucket_bits = 0 if trust_order else ANY_ORDER_BUCKET_BITS
        self._pairs = [_PairTable() for _ in range(1 << self._bucket_bits)]
        self._candidates: list[Candidates] = []
        self._subjects: list[tuple[np.ndarray, ...]] = []
        self._highest_image: np.uint64 | None = None
        self._human = np.zeros(classes.unknown + 1, dtype=bool)
        self._human[classes.indices_of(rules.human_classes)] = True
        self._cluttered = np.zeros(classes.unknown + 1, dtype=bool)
        self._cluttered[classes.indices_of(rules.cluttered_classes)] = True

    def count_malformed_line(self) -> None:
        self.funnel.rows_read += 1
        self.funnel.removed["invalid"] += 1
        self.funnel.invalid_reasons["malformed_line"] += 1

    def _class_indices(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        if not pa.types.is_dictionary(column.type):
            column = pc.dictionary_encode(column.cast(pa.string()))
        known = [self.classes.index.get(str(mid).strip(), self.classes.unknown) for mid in column.dictionary.to_pylist()]
        lookup = np.array(known + [self.classes.unknown], dtype=np.uint16)
        return lookup[column.indices.fill_null(len(known)).to_numpy(zero_copy_only=False)]

    def consume(self, batch: pa.RecordBatch) -> None:
        n = batch.num_rows
        if n == 0:
            return
        images, image_ok = pack_image_ids(batch.column("ImageID"))
        if self.trust_order:
            self._check_order(images[image_ok])
        self.funnel.rows_read += n
        classes = self._class_indices(batch.column("LabelName"))
        x_min, x_max, y_min, y_max = (_as_float(batch.column(c)) for c in COORDINATE_COLUMNS)
        group_of, inside = (_as_float(batch.column(c)) for c in FLAG_COLUMNS)

        label_missing = batch.column("LabelName").is_null().to_numpy(zero_copy_only=False)
        values = np.stack([x_min, x_max, y_min, y_max, group_of, inside])
        value_missing = np.isnan(values).any(axis=0) | label_missing
        with np.errstate(invalid="ignore"):
            out_of_range = ((values[:4] < 0) | (values[:4] > 1)).any(axis=0)
            empty_box = (x_max <= x_min) | (y_max <= y_min)

        reasons = [
            ~image_ok,
            value_missing & image_ok,
            (classes == self.classes.unknown) & ~value_missing & image_ok,
        ]
        taken = reasons[0] | reasons[1] | reasons[2]
        reasons.append(out_of_range & ~taken)
        taken |= reasons[3]
        reasons.append(empty_box & ~taken)
        invalid = taken | reasons[4]
        for name, mask in zip(INVALID_REASONS[1:], reasons, strict=True):
            self.funnel.invalid_reasons[name] += int(mask.sum())
        self.funnel.removed["invalid"] += int(invalid.sum())

        width, height = x_max - x_min, y_max - y_min
        with np.errstate(divide="ignore", invalid="ignore"):
            area = width * height
            aspect = np.maximum(width / height, height / width)
        outcome = np.full(n, PASSED, dtype=np.uint8)
        # Assigned in reverse so that the first rule that rejects a box is the one that stays.
        outcome[(area < self.rules.min_area) | (area > self.rules.max_area)] = AREA
        outcome[aspect > self.rules.max_aspect] = ASPECT
        outcome[inside == 1] = INSIDE
        outcome[group_of == 1] = GROUP_OF
        outcome[invalid] = INVALID
        self._add_pairs(images[image_ok], classes[image_ok], outcome[image_ok])

        candidate = (outcome == PASSED) & ~self._cluttered[classes] & ~self._human[classes]
        if candidate.any():
            self._candidates.append(Candidates(images, classes, x_min, x_max, y_min, y_max).take(candidate))
        if self.trust_order and self._highest_image is not None:
            self._close(below=self._highest_image)

    def _bucket_of(self, images: np.ndarray) -> np.ndarray:
        return (images >> np.uint64(64 - self._bucket_bits)).astype(np.intp)

    def _add_pairs(self, images: np.ndarray, classes: np.ndarray, outcomes: np.ndarray) -> None:
        if len(self._pairs) == 1:
            self._pairs[0].add(images, classes, outcomes)
            return
        buckets = self._bucket_of(images)
        order = np.argsort(buckets, kind="stable")
        bounds = np.searchsorted(buckets[order], np.arange(len(self._pairs) + 1))
        for bucket, table in enumerate(self._pairs):
            rows = order[bounds[bucket] : bounds[bucket + 1]]
            table.add(images[rows], classes[rows], outcomes[rows])

    def _check_order(self, images: np.ndarray) -> None:
        if len(images) == 0:
            return
        if (self._highest_image is not None and images[0] < self._highest_image) or bool(
            (images[1:] < images[:-1]).any()
        ):
            raise InputNotSorted("box rows are not grouped by ascending ImageID")
        self._highest_image = images[-1]

    def _close(self, below: np.uint64 | None) -> None:
        """Settle every image below ``below`` (every image when None)."""
        candidates = Candidates.concat(self._candidates) if self._candidates else None
        if below is None:
            tables, self._pairs, self._candidates = self._pairs, [], []
            candidate_bucket = self._bucket_of(candidates.images) if candidates is not None else None
            for bucket in range(len(tables)):
                pairs, tables[bucket] = tables[bucket].result(), None
                if len(pairs.images):
                    in_bucket = candidates.take(candidate_bucket == bucket) if candidates is not None else None
                    self._settle(pairs, in_bucket)
            return
        pairs = self._pairs[0].result()
        split = int(np.searchsorted(pairs.images, below, side="left"))
        self._pairs = [_PairTable(PairCounts(*(column[split:] for column in pairs)))]
        pairs = PairCounts(*(column[:split] for column in pairs))
        if candidates is not None:
            settled = candidates.images < below
            self._candidates = [candidates.take(~settled)]
            candidates = candidates.take(settled)
        if len(pairs.images):
            self._settle(pairs, candidates)

    def _settle(self, pairs: PairCounts, candidates: Candidates | None) -> None:
        """Count what each rule removed among these images, and choose their subjects."""
        funnel = self.funnel
        new_image = np.concatenate(([True], pairs.images[1:] != pairs.images[:-1]))
        image_index = np.cumsum(new_image) - 1
        unique_images = pairs.images[new_image]
        funnel.images_read += len(unique_images)
        human_image = np.zeros(len(unique_images), dtype=bool)
        human_image[image_index[self._human[pairs.classes]]] = True

        single = pairs.boxes == 1
        duplicated = ~single
        outcomes = np.bincount(pairs.outcome[single], minlength=N_OUTCOMES)
        removed = funnel.removed
        removed["group"] += int(pairs.boxes[duplicated].sum() - pairs.invalid[duplicated].sum())
        removed["group"] += int(outcomes[GROUP_OF])
        removed["inside"] += int(outcomes[INSIDE])
        removed["aspect"] += int(outcomes[ASPECT])
        removed["area"] += int(outcomes[AREA])
        passed = single & (pairs.outcome == PASSED)
        in_human_image = human_image[image_index]
        removed["human"] += int((passed & in_human_image).sum())
        removed["cluttered"] += int((passed & ~in_human_image & self._cluttered[pairs.classes]).sum())
        eligible = int((passed & ~in_human_image & ~self._cluttered[pairs.classes]).sum())
        if candidates is None or eligible == 0:
            return

        pair_keys = (image_index << 16) | pairs.classes.astype(np.int64)
        candidate_image = np.searchsorted(unique_images, candidates.images)
        pair = np.searchsorted(pair_keys, (candidate_image << 16) | candidates.classes.astype(np.int64))
        chosen = _one_per_image(candidates.take(~duplicated[pair] & ~human_image[candidate_image]))
        removed["one_per_image"] += eligible - len(chosen[0])
        funnel.subjects += len(chosen[0])
        self._subjects.append(chosen)

    def result(self) -> FilterResult:
        self._close(below=None)
        if self._subjects:
            columns = [np.concatenate(parts) for parts in zip(*self._subjects, strict=True)]
        else:
            columns = [np.zeros(0, np.uint64), np.zeros(0, np.uint16)] + [np.zeros(0)] * 6
        images, classes, *measures = columns
        subjects = pd.DataFrame(
            {
                "image_id": pd.array(unpack_image_ids(images), dtype="string"),
                "label_mid": pd.array(np.array(self.classes.mids, dtype=object)[classes], dtype="string"),
                "label_name": pd.array(np.array(self.classes.names, dtype=object)[classes], dtype="string"),
                **{
                    name: np.asarray(values, dtype=np.float64)
                    for name, values in zip(SUBJECT_COLUMNS[3:], measures, strict=True)
                },
            }
        )
        return FilterResult(subjects=subjects, funnel=self.funnel)


def _one_per_image(candidates: Candidates) -> tuple[np.ndarray, ...]:
    """The largest box of each image, ties to the smallest MID: (*candidate columns, area, aspect)."""
    width = candidates.x_max - candidates.x_min
    height = candidates.y_max - candidates.y_min
    area = width * height
    order = np.lexsort((candidates.classes, -area, candidates.images))
    images = candidates.images[order]
    first = order[np.concatenate(([True], images[1:] != images[:-1]))]
    w, h = width[first], height[first]
    return (*(column[first] for column in candidates), area[first], np.maximum(w / h, h / w))


def filter_subjects(
    boxes: Path, classes: Path, rules: FilterRules, block_bytes: int = DEFAULT_BLOCK_BYTES
) -> FilterResult:
    """Apply the rules to a box file and choose one subject per image.

    The file is first read trusting that it is grouped by ascending ImageID (the official order,
    which keeps memory flat); at the first row that breaks that order it is read again from the
    start, keeping every image's state to the end.
    """
    class_list = ClassList.read(classes)
    subject_filter = SubjectFilter(class_list, rules, trust_order=True)
    try:
        _feed(subject_filter, boxes, block_bytes)
    except InputNotSorted:
        subject_filter = SubjectFilter(class_list, rules, trust_order=False)
        _feed(subject_filter, boxes, block_bytes)
    return subject_filter.result()


def _feed(subject_filter: SubjectFilter, boxes: Path, block_bytes: int) -> None:
    for batch in iter_box_batches(boxes, block_bytes, on_malformed_line=subject_filter.count_malformed_line):
        subject_filter.consume(batch)


SUBJECTS_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("label_mid", pa.string()), ("label_name", pa.string())]
    + [(name, pa.float64()) for name in SUBJECT_COLUMNS[3:]]
)


def write_subjects(subjects: pd.DataFrame, path: Path) -> None:
    table = pa.Table.from_pandas(subjects, schema=SUBJECTS_SCHEMA, preserve_index=False)
    with atomic_path(path) as temp:
        pq.write_table(table, temp)


def read_subjects(path: Path) -> pd.DataFrame:
    """Read a ``subjects.parquet``, checking that it has the filter's columns."""
    table = pq.read_table(path)
    if tuple(table.column_names) != SUBJECT_COLUMNS:
        raise ValueError(f"{path} is not a subjects file: columns {table.column_names}")
    return table.cast(SUBJECTS_SCHEMA).to_pandas()


def run_filter(config: FilterConfig) -> FilterResult:
    """Run the filter and write ``subjects.parquet`` and ``funnel.json`` into ``config.out``."""
    result = filter_subjects(config.boxes, config.classes, config.load_rules(), config.block_bytes)
    config.out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(config.out)
    write_subjects(result.subjects, config.out / "subjects.parquet")
    write_json_atomic(result.funnel.as_dict(), config.out / "funnel.json")
    return result

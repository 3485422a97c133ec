"""Open Images box annotations → one subject per image, by the rules of the paper's appendix A.4: one query
in DuckDB (embedded, multi-threaded, spilling to disk under a memory limit), which reads CSV, gzip and
Parquet itself and groups the rows by image whatever their order."""

from __future__ import annotations

import csv
import gzip
import shutil
import tempfile
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

# The filter's output format, importable from here as before.
from blipdiff.datasets.subjects import SUBJECT_COLUMNS, read_subjects, write_subjects  # noqa: F401
from blipdiff.infra.atomic import remove_stale_temporaries, write_json_atomic

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf", "IsInside")
# The funnel's rules, in the order they are applied: a box is counted under the first that removes it.
RULE_ORDER = ("invalid", "group", "inside", "aspect", "area", "human", "cluttered", "one_per_image")
INVALID_REASONS = ("malformed_line", "bad_image_id", "missing_value", "unknown_class", "coordinate_out_of_range", "empty_box")
DEFAULT_BLOCK_BYTES, DEFAULT_MEMORY_LIMIT = 4 << 20, "500MB"
SPILL_FOLDER = ".tmp-filter-spill"  # under the temporaries' prefix


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
            return cls.model_validate(tomllib.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ValueError(f"cannot read rules file {path}: {error}") from error

    @classmethod
    def paper_defaults(cls) -> FilterRules:
        return cls.from_toml(Path(__file__).with_name("rules") / "openimages_v6.toml")


class FilterConfig(BaseModel):
    """Everything one run of the filter needs; shared by the CLI, the flows and the tests."""

    model_config = ConfigDict(extra="forbid")
    boxes: Path = Field(description="Open Images box annotations: .csv, .csv.gz or .parquet")
    classes: Path = Field(description="class descriptions, `MID,Name` without a header")
    out: Path = Field(description="folder that receives subjects.parquet and funnel.json")
    rules: Path | None = Field(default=None, description="rules TOML; the paper's when absent")
    block_bytes: int = Field(default=DEFAULT_BLOCK_BYTES, gt=0, description="CSV bytes the reader buffers")
    memory_limit: str = Field(default=DEFAULT_MEMORY_LIMIT, description="DuckDB's memory limit (it spills beyond)")

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

    def rows(self) -> list[tuple[str, int, int]]:  # (step, boxes removed, boxes left) for each rule
        left = [self.rows_read - sum(list(self.removed.values())[:i + 1]) for i in range(len(RULE_ORDER))]
        return [(rule, self.removed[rule], rest) for rule, rest in zip(RULE_ORDER, left, strict=True)]


@dataclass
class FilterResult:
    subjects: pd.DataFrame
    funnel: Funnel


def read_classes(path: Path) -> dict[str, str]:
    """`MID,Name` rows (no header); names may be quoted and contain commas."""
    names: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.reader(handle), start=1):
                if not row or not "".join(row).strip():
                    continue
                if len(row) != 2 or not row[0].strip():
                    raise ValueError(f"{path}:{number}: expected `MID,Name`, got {row!r}")
                if names.setdefault(row[0].strip(), row[1].strip()) != row[1].strip():
                    raise ValueError(f"{path}:{number}: MID {row[0].strip()} is listed twice")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read class descriptions {path}: {error}") from error
    if not names:
        raise ValueError("the class descriptions list no class")
    return names


def _source(path: Path, block_bytes: int) -> str:
    """The box file as DuckDB reads it, its columns checked. CSV values stay text, so that a stray value is
    a counted invalid row; a line of the wrong length goes to DuckDB's ``reject_errors``: a malformed line."""
    if not path.is_file():
        raise FileNotFoundError(f"box annotations not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PAR1":
        names, relation = pq.ParquetFile(path).schema_arrow.names, f"read_parquet({_quote(path)})"
    else:
        compression = "gzip" if head[:2] == b"\x1f\x8b" else "none"
        with (gzip.open if compression == "gzip" else open)(path, "rt", encoding="utf-8-sig", newline="") as text:
            names = next(csv.reader(text), [])
        columns = ", ".join(f"{_quote(name)}: 'VARCHAR'" for name in names)
        relation = (f"read_csv({_quote(path)}, header = true, auto_detect = false, delim = ',', quote = '\"', "
                    f"escape = '\"', columns = {{{columns}}}, strict_mode = false, store_rejects = true, "
                    f"compression = '{compression}', buffer_size = {max(block_bytes, 1 << 16)})")
    if missing := [column for column in BOX_COLUMNS if column not in names]:
        raise ValueError(f"{path} is not an Open Images box file: missing column(s) {', '.join(missing)} "
                         f"(found {', '.join(names) or 'no header'})")
    return relation


def _quote(text: object) -> str:  # a SQL string literal
    return "'" + str(text).replace("'", "''") + "'"


# Boxes are grouped by (image, class; unlisted classes share a key): the group rule needs a class's count of
# boxes in an image, invalid ones too, and only a pair of one box can hold a subject, so its values are kept.
# Pairs are then summed up by image, with its best box; a bad image id comes before every other check.
_VALUES = ("x_min", "x_max", "y_min", "y_max", "group_of", "inside")
_REASONS = INVALID_REASONS[2:]  # a row's own reasons (as their index): malformed lines and bad ids are counted apart
_SINGLE = ("inside", "aspect", "area")  # rules whose boxes are counted in pairs of one box
# A row's outcome, as an index into this (integers: compared on every row, strings cost several times more).
_OUTCOMES = ("invalid", "group", *_SINGLE, "passed")
_QUERY = """CREATE TEMP TABLE images AS SELECT image, image IS NOT NULL AS image_ok, sum(count) AS rows, {image_reasons},
  sum(CASE WHEN count > 1 THEN count - invalid ELSE 0 END) + count(*) FILTER (count = 1 AND outcome = 1) AS "group",
  {single}, count(*) FILTER (count = 1 AND outcome = 5 AND cluttered) AS passed_cluttered,
  count(*) FILTER (count = 1 AND outcome = 5 AND NOT cluttered) AS passed, bool_or(human) AS human,
  min_by(struct_pack(idx, x_min, x_max, y_min, y_max), struct_pack(a := (x_min - x_max) * (y_max - y_min), idx))
    FILTER (count = 1 AND outcome = 5 AND NOT cluttered) AS best
FROM (SELECT image, idx, count(*) AS count, count(reason) AS invalid, {reasons}, any_value(outcome) AS outcome,
  {values}, any_value(human) AS human, any_value(cluttered) AS cluttered
FROM (SELECT *, x_max - x_min AS w, y_max - y_min AS h,
  CASE WHEN id IS NOT NULL AND regexp_full_match(id, '[0-9a-f]{{16}}') THEN CAST('0x' || id AS UBIGINT) END AS image,
  CASE WHEN label IS NULL OR label = '' OR {nan} THEN 0 WHEN idx IS NULL THEN 1
    WHEN least(x_min, x_max, y_min, y_max) < 0 OR greatest(x_min, x_max, y_min, y_max) > 1 THEN 2
    WHEN x_max <= x_min OR y_max <= y_min THEN 3 END AS reason,
  CASE WHEN reason IS NOT NULL THEN 0 WHEN group_of = 1 THEN 1 WHEN inside = 1 THEN 2
    WHEN greatest(w / h, h / w) > {max_aspect} THEN 3 WHEN w * h < {min_area} OR w * h > {max_area} THEN 4 ELSE 5 END
    AS outcome
  FROM (SELECT CAST(ImageID AS VARCHAR) AS id, CAST(LabelName AS VARCHAR) AS label, trim(label) AS mid, {numbers}
        FROM {source}) LEFT JOIN classes USING (mid)) GROUP BY image, idx) GROUP BY image"""
_SUBJECTS = """SELECT printf('%016x', image) AS image_id, mid AS label_mid, name AS label_name, x_min, x_max, y_min, y_max,
  (x_max - x_min) * (y_max - y_min) AS area, greatest((x_max - x_min) / (y_max - y_min), (y_max - y_min) / (x_max - x_min))
  AS aspect FROM (SELECT image, unnest(best) FROM images WHERE image_ok AND NOT human AND best IS NOT NULL)
  JOIN classes USING (idx) ORDER BY image"""
_TOTALS = ("SELECT sum(rows), count(*) FILTER (image_ok), sum(rows) FILTER (NOT image_ok), "
           + ", ".join(f'sum("{column}") FILTER (image_ok)' for column in (*_REASONS, "group", *_SINGLE))
           + ", sum(passed + passed_cluttered) FILTER (image_ok AND human), sum(passed_cluttered) FILTER (image_ok AND "
           "NOT human), sum(passed) FILTER (image_ok AND NOT human) FROM images")


def filter_subjects(boxes: Path, classes: Path, rules: FilterRules, block_bytes: int = DEFAULT_BLOCK_BYTES,
                    memory_limit: str = DEFAULT_MEMORY_LIMIT, spill: Path | None = None) -> FilterResult:
    """Apply the rules to a box file and choose one subject per image. DuckDB keeps to ``memory_limit``,
    spilling into a temporary folder beside ``spill`` (or the system's), removed at the end."""
    import duckdb

    names = read_classes(classes)
    with tempfile.TemporaryDirectory(dir=spill and spill.parent, prefix=spill and spill.name) as temp, \
            duckdb.connect() as connection:
        try:
            connection.execute(f"SET memory_limit = {_quote(memory_limit)}")
        except duckdb.Error as error:
            raise ValueError(f"memory limit {memory_limit!r}: {str(error).splitlines()[0]}") from error
        connection.execute(f"SET temp_directory = {_quote(temp)}; SET preserve_insertion_order = false")
        connection.register("classes", pd.DataFrame({  # idx in MID order: the smallest wins a tie
            "idx": range(len(names)), "mid": sorted(names), "name": [names[mid] for mid in sorted(names)],
            "human": [mid in rules.human_classes for mid in sorted(names)],
            "cluttered": [mid in rules.cluttered_classes for mid in sorted(names)]}))
        connection.execute(_QUERY.format(
            source=_source(Path(boxes), block_bytes), values=", ".join(f"any_value({v}) AS {v}" for v in _VALUES[:4]),
            numbers=", ".join(f"TRY_CAST({column} AS DOUBLE) AS {value}" for column, value in zip(BOX_COLUMNS[2:], _VALUES,
                                                                                                  strict=True)),
            nan=" OR ".join(f"isnan({value}) IS NOT FALSE" for value in _VALUES),
            reasons=", ".join(f"count(*) FILTER (reason = {code}) AS {reason}" for code, reason in enumerate(_REASONS)),
            image_reasons=", ".join(f"sum({reason}) AS {reason}" for reason in _REASONS),
            single=", ".join(f"count(*) FILTER (count = 1 AND outcome = {_OUTCOMES.index(rule)}) AS {rule}" for rule in _SINGLE),
            **rules.model_dump(include={"max_aspect", "min_area", "max_area"})))
        subjects = connection.execute(_SUBJECTS).df().astype({name: "string" for name in SUBJECT_COLUMNS[:3]})
        malformed = connection.execute("SELECT count(DISTINCT (scan_id, line)) FROM reject_errors").fetchone()[0] \
            if connection.execute("FROM duckdb_tables() WHERE table_name = 'reject_errors'").fetchone() else 0
        totals = [int(value or 0) for value in connection.execute(_TOTALS).fetchone()]
    reasons = dict(zip(INVALID_REASONS, [malformed, *totals[2:7]], strict=True))
    removed = dict(zip(RULE_ORDER, [sum(reasons.values()), *totals[7:13], totals[13] - len(subjects)], strict=True))
    return FilterResult(subjects, Funnel(totals[0] + malformed, totals[1], removed, reasons, len(subjects)))


def run_filter(config: FilterConfig) -> FilterResult:
    """Run the filter, spilling inside ``config.out``, and write ``subjects.parquet`` and ``funnel.json``."""
    config.out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(config.out)
    for leftover in config.out.glob(f"{SPILL_FOLDER}*"):  # a killed run's spill
        shutil.rmtree(leftover, ignore_errors=True)
    result = filter_subjects(config.boxes, config.classes, config.load_rules(), config.block_bytes,
                             config.memory_limit, config.out / SPILL_FOLDER)
    write_subjects(result.subjects, config.out / "subjects.parquet")
    write_json_atomic(asdict(result.funnel), config.out / "funnel.json")
    return result

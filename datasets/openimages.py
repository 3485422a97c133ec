"""Open Images box annotations → one subject per image, by the rules of the paper's appendix A.4, as queries in
DuckDB (embedded, multi-threaded, spilling under a memory limit): it reads CSV, gzip and Parquet itself."""

from __future__ import annotations

import csv
import gzip
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

# The filter's output format, importable from here as before.
from blipdiff.datasets.configs import DEFAULT_BLOCK_BYTES, DEFAULT_MEMORY_LIMIT, FilterConfig, FilterRules
from blipdiff.datasets.subjects import SUBJECT_COLUMNS, read_subjects, write_subjects  # noqa: F401
from blipdiff.infra.atomic import remove_stale_temporaries, write_json_atomic

BOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf", "IsInside")
# The funnel's rules, in the order they are applied: a box is counted under the first that removes it.
RULE_ORDER = ("invalid", "group", "inside", "aspect", "area", "human", "cluttered", "one_per_image")
INVALID_REASONS = ("malformed_line", "bad_image_id", "missing_value", "unknown_class", "coordinate_out_of_range", "empty_box")
SPILL_FOLDER = ".tmp-filter-spill"  # under the temporaries' prefix
_NUMBERS = ("x_min", "x_max", "y_min", "y_max", "group_of", "inside")  # BOX_COLUMNS[2:]; in text, "1_000" is no number


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
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each SQL statement, by the table it makes


def read_classes(path: Path) -> dict[str, str]:
    """`MID,Name` rows (no header); names may be quoted and contain commas."""
    names: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.reader(handle), start=1):
                cells = [cell.strip() for cell in row]
                if any(cells) and (len(cells) != 2 or not cells[0]):
                    raise ValueError(f"{path}:{number}: expected `MID,Name`, got {row!r}")
                if any(cells) and names.setdefault(*cells) != cells[1]:
                    raise ValueError(f"{path}:{number}: MID {cells[0]} is listed twice")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read class descriptions {path}: {error}") from error
    if not names:
        raise ValueError("the class descriptions list no class")
    return names


def _source(path: Path, block_bytes: int, parallel: bool = True) -> dict[str, str]:
    """The box file as DuckDB reads it (columns checked) and SQL for its values. CSV values stay text (a stray one is an
    invalid row, a missing one what Arrow's CSV reader calls null); a line of the wrong length is malformed."""
    if not path.is_file():
        raise FileNotFoundError(f"box annotations not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head == b"PAR1":
        schema = pq.ParquetFile(path).schema_arrow
        names, source, malformed, no_label = schema.names, f"read_parquet({_quote(path)})", "false", "label IS NULL"
        text = [field.name for field in schema if str(field.type) in ("string", "large_string")]
    else:
        compression = "gzip" if head[:2] == b"\x1f\x8b" else "none"
        with (gzip.open if compression == "gzip" else open)(path, "rt", encoding="utf-8-sig", newline="") as reader:
            names = text = next(csv.reader(reader), [])
        beyond = "_".join(names) + "_beyond"  # a name that no column has, nor any value
        columns = ", ".join(f"{_quote(name)}: 'VARCHAR'" for name in (*names, beyond))
        source = (f"read_csv({_quote(path)}, header = true, auto_detect = false, delim = ',', quote = '\"', "
                  f"escape = '\"', columns = {{{columns}}}, strict_mode = false, null_padding = true, "
                  f"nullstr = {_quote(beyond)}, store_rejects = true, compression = '{compression}', "
                  f"parallel = {str(parallel).lower()}, buffer_size = {max(block_bytes, 1 << 16)})")  # NULL: padded
        malformed = f'"{beyond}" IS NOT NULL OR "{names[-1]}" IS NULL' if names else "false"
        no_label = f"label IN ({', '.join(map(_quote, pa_csv.ConvertOptions().null_values))})"
    if missing := [column for column in BOX_COLUMNS if column not in names]:
        raise ValueError(f"{path} is not an Open Images box file: missing column(s) {', '.join(missing)} "
                         f"(found {', '.join(names) or 'no header'})")
    numbers = (_number(column, column in text) + f" AS {value}" for column, value in zip(BOX_COLUMNS[2:], _NUMBERS, strict=True))
    return {"source": source, "malformed": malformed, "no_label": no_label, "numbers": ", ".join(numbers)}


def _number(column: str, text: bool) -> str:
    """SQL for a column's number: a flag's `0` and `1` (nearly every value) without a cast; in text, `1_000` is none."""
    if not text:
        return f"TRY_CAST({column} AS DOUBLE)"
    cast = f"CASE WHEN NOT contains({column}, '_') THEN TRY_CAST({column} AS DOUBLE) END"
    return f"CASE {column} WHEN '0' THEN 0.0 WHEN '1' THEN 1.0 ELSE {cast} END" if column.startswith("Is") else cast


def _quote(text: object) -> str:  # a SQL string literal
    return "'" + str(text).replace("'", "''") + "'"


def _indices(mids: list[str], chosen: dict[str, str]) -> str:  # SQL list of the classes' indices
    return ", ".join(str(index) for index, mid in enumerate(mids) if mid in chosen) or "-1"


def filter_subjects(boxes: Path, classes: Path, rules: FilterRules, block_bytes: int = DEFAULT_BLOCK_BYTES,
                    memory_limit: str = DEFAULT_MEMORY_LIMIT, spill: Path | None = None) -> FilterResult:
    """One subject per image by ``rules``; DuckDB keeps to ``memory_limit``, spilling in a folder beside ``spill``."""
    import duckdb

    names = read_classes(classes)
    source = _source(Path(boxes), block_bytes)
    if spill:  # made only once the inputs are known good
        spill.parent.mkdir(parents=True, exist_ok=True)
    try:
        subjects, totals, seconds = _query(source, names, rules, memory_limit, spill)
    except duckdb.Error as error:
        if "quoted new lines" not in str(error):
            raise
        # DuckDB's parallel CSV scanner cannot pad short lines once a quoted value holds a line break: one thread can
        subjects, totals, seconds = _query(_source(Path(boxes), block_bytes, parallel=False), names, rules,
                                           memory_limit, spill)
    removed = {"invalid": sum(totals[reason] for reason in INVALID_REASONS), **{rule: totals[rule] for rule in RULE_ORDER[1:]}}
    return FilterResult(subjects.astype({name: "string" for name in SUBJECT_COLUMNS[:3]}), Funnel(
        totals["rows"], totals["images"], removed, {reason: totals[reason] for reason in INVALID_REASONS}, len(subjects)),
        seconds)


def _query(source: dict[str, str], names: dict[str, str], rules: FilterRules, memory_limit: str,
           spill: Path | None) -> tuple[pd.DataFrame, dict[str, int], dict[str, float]]:
    """The subjects, the funnel's totals (lines DuckDB rejected counted as rows and malformed lines) and the
    seconds each statement took."""
    import duckdb

    mids = sorted(names)  # a class's index is its place in MID order: the smallest wins a tie
    with tempfile.TemporaryDirectory(dir=spill and spill.parent, prefix=spill and spill.name) as temp, \
            duckdb.connect() as connection:
        try:
            connection.execute(f"SET memory_limit = {_quote(memory_limit)}")
        except duckdb.Error as error:
            raise ValueError(f"memory limit {memory_limit!r}: {str(error).splitlines()[0]}") from error
        connection.execute(f"SET temp_directory = {_quote(temp)}; SET preserve_insertion_order = false; "
                           f"CREATE TYPE class_mid AS ENUM ({', '.join(map(_quote, mids))})")
        connection.register("classes", pd.DataFrame({"idx": range(len(mids)), "mid": mids, "name": map(names.get, mids)}))
        statements = (Path(__file__).with_name("rules") / "subject_filter.sql").read_text(encoding="utf-8").format(
            **source, **rules.model_dump(include={"max_aspect", "min_area", "max_area"}),
            human=_indices(mids, rules.human_classes), cluttered=_indices(mids, rules.cluttered_classes))
        seconds = {}
        try:
            for statement in duckdb.extract_statements(statements):
                started = time.perf_counter()
                connection.execute(statement)
                seconds[statement.query.split("CREATE TEMP TABLE ", 1)[-1].split()[0]] = time.perf_counter() - started
        except duckdb.OutOfMemoryException as error:
            raise ValueError(f"the filter needs more memory than the limit {memory_limit!r} allows (DuckDB: "
                             f"{str(error).splitlines()[0]}); raise it with --memory-limit") from error
        subjects = connection.execute("FROM subjects ORDER BY image_id").df()
        cursor = connection.execute("FROM totals")
        totals = {column[0]: int(value or 0) for column, value in zip(cursor.description, cursor.fetchone(), strict=True)}
        if source["malformed"] != "false":  # a CSV
            rejected = connection.execute("SELECT count(DISTINCT (scan_id, line)) FROM reject_errors").fetchone()[0]
            totals.update(rows=totals["rows"] + rejected, malformed_line=totals["malformed_line"] + rejected)
    return subjects, totals, seconds


def run_filter(config: FilterConfig) -> FilterResult:
    """Run the filter, spilling inside ``config.out``, and write ``subjects.parquet`` and ``funnel.json``."""
    if config.out.is_dir():
        remove_stale_temporaries(config.out)
        for leftover in config.out.glob(f"{SPILL_FOLDER}*"):  # a killed run's spill
            shutil.rmtree(leftover, ignore_errors=True)
    result = filter_subjects(config.boxes, config.classes, config.load_rules(), config.block_bytes,
                             config.memory_limit, config.out / SPILL_FOLDER)
    write_subjects(result.subjects, config.out / "subjects.parquet")
    write_json_atomic(asdict(result.funnel), config.out / "funnel.json")
    return result

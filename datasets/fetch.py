"""Image acquisition: bring the subjects' images into one verified, sharded folder.

Sources: the official Open Images location over HTTPS (or any URL template), the dataset's images CSV
(its `OriginalURL` or `Thumbnail300KURL`), or a folder of images a user already holds. Whatever the
source, every file is decoded before it is accepted, lands under a temporary name inside
``DIR/.partial`` and is renamed into ``DIR/images/<first two hex digits>/`` once verified, so no final
path ever holds a partial file. Each accepted image is appended to ``DIR/journal.jsonl`` as it
completes: a rerun, after a clean stop or a kill -9, skips what the journal and the folder agree on and
fetches the rest. The manifests (``images.parquet``, ``rejects.parquet``) are rewritten atomically at
the end, sorted by image id, so an interrupted-then-resumed run ends with the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

# DEFAULT_URL_TEMPLATE too, so that its old name resolves.
from blipdiff.datasets.configs import DEFAULT_URL_TEMPLATE, FetchConfig  # noqa: F401
from blipdiff.infra.atomic import atomic_path, remove_stale_temporaries
from blipdiff.infra.images import (
    IMAGE_SUFFIXES,
    DecodeFailure,
    inspect_image,
)
from blipdiff.infra.journal import JOURNAL_NAME, Journal

IMAGE_ID_PATTERN = re.compile(r"^[0-9a-f]{16}\Z")
SUFFIX_OF_FORMAT = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif",
                    "BMP": ".bmp", "TIFF": ".tif"}
IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("bytes", pa.int64()), ("md5", pa.string()), ("source", pa.string()),
])
REJECTS_SCHEMA = pa.schema([("image_id", pa.string()), ("stage", pa.string()), ("reason", pa.string())])
PARTIAL = ".partial"
CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class ImageRecord:
    image_id: str
    path: str
    width: int
    height: int
    bytes: int
    md5: str
    source: str


@dataclass(frozen=True)
class Reject:
    image_id: str
    stage: str
    reason: str


@dataclass(frozen=True)
class Job:
    """Where one image comes from: a URL or a local file, with what the source promises about it."""

    image_id: str
    source: str
    expected_md5: str | None = None


@dataclass
class FetchSummary:
    fetched: int
    skipped: int
    rejects: list[Reject]

    def reasons(self) -> Counter:
        return Counter(f"{r.stage}: {r.reason}" for r in self.rejects)


class _Retry(Exception):
    """A failure worth another try: a 5xx, a timeout, a broken connection."""


class _Failure(Exception):
    def __init__(self, stage: str, reason: str):
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


def shard_path(image_id: str, suffix: str) -> str:
    """Relative path of an image: 256 shard folders by the id's first two hex digits."""
    return f"images/{image_id[:2]}/{image_id}{suffix}"


def read_image_ids(subjects: Path) -> list[str]:
    try:
        table = pq.read_table(subjects, columns=["image_id"])
    except (OSError, pa.ArrowInvalid, KeyError) as error:
        raise ValueError(f"cannot read image_id from {subjects}: {error}") from error
    return sorted({str(v) if v is not None else "" for v in table.column("image_id").to_pylist()})


class Fetcher:
    """Executes jobs: download or copy to a temporary name, verify, rename into place."""

    def __init__(self, config: FetchConfig, client: httpx.Client):
        self.config = config
        self.out = config.out
        self.partial = config.out / PARTIAL
        self.partial.mkdir(parents=True, exist_ok=True)
        self._client = client

    def run(self, job: Job) -> ImageRecord | Reject:
        temp = self.partial / f"{job.image_id}.{os.getpid()}.{threading.get_ident()}"
        try:
            if job.source.startswith(("http://", "https://")):
                size, md5 = self._download_with_retries(job.source, temp)
            else:
                size, md5 = self._copy(Path(job.source), temp)
            if job.expected_md5 is not None and md5 != job.expected_md5:
                raise _Failure("download", f"md5 {md5} differs from the images CSV's {job.expected_md5}")
            try:
                info = inspect_image(temp, self.config.max_pixels)
            except DecodeFailure as failure:
                raise _Failure("decode", str(failure)) from failure
            relative = shard_path(job.image_id, SUFFIX_OF_FORMAT.get(info.format, f".{info.format.lower()}"))
            target = self.out / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, target)
            return ImageRecord(job.image_id, relative, info.width, info.height, size, md5, job.source)
        except _Failure as failure:
            return Reject(job.image_id, failure.stage, failure.reason)
        finally:
            temp.unlink(missing_ok=True)

    def _copy(self, source: Path, temp: Path) -> tuple[int, str]:
        try:
            size = source.stat().st_size
            if size > self.config.max_bytes:
                raise _Failure("source", f"{size} bytes exceeds the {self.config.max_bytes}-byte limit")
            digest = hashlib.md5()
            with open(source, "rb") as reader, open(temp, "wb") as writer:
                while chunk := reader.read(CHUNK_BYTES):
                    digest.update(chunk)
                    writer.write(chunk)
        except OSError as error:
            raise _Failure("source", f"cannot read {source}: {error.strerror or error}") from error
        return size, digest.hexdigest()

    def _download_with_retries(self, url: str, temp: Path) -> tuple[int, str]:
        attempts = self.config.retries + 1
        for attempt in range(attempts):
            try:
                return self._download(url, temp)
            except _Retry as problem:
                if attempt + 1 == attempts:
                    tries = "try" if attempts == 1 else "tries"
                    raise _Failure("download", f"{problem} ({attempts} {tries})") from problem
                time.sleep(self.config.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _download(self, url: str, temp: Path) -> tuple[int, str]:
        limit = self.config.max_bytes
        try:
            with self._client.stream("GET", url) as response:
                status = response.status_code
                if status >= 500:
                    raise _Retry(f"HTTP {status}")
                if status != 200:
                    raise _Failure("download", f"HTTP {status}")
                if response.headers.get("content-type", "").lower().startswith("text/html"):
                    raise _Failure("download", "HTML page instead of an image")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > limit:
                    raise _Failure("download", f"Content-Length {declared} exceeds the {limit}-byte limit")
                # A body shorter or longer than Content-Length never gets here: httpx's HTTP/1.1 parser
                # stops at the declared length or raises RemoteProtocolError, a retry below.
                digest, size = hashlib.md5(), 0
                with open(temp, "wb") as writer:
                    for chunk in response.iter_bytes(CHUNK_BYTES):
                        size += len(chunk)
                        if size > limit:
                            raise _Failure("download", f"body exceeds the {limit}-byte limit")
                        digest.update(chunk)
                        writer.write(chunk)
                return size, digest.hexdigest()
        except httpx.TimeoutException as error:
            raise _Retry(f"timed out ({type(error).__name__}, {self.config.timeout:g} s)") from error
        except httpx.RemoteProtocolError as error:
            raise _Retry(f"connection broke mid-response: {error}") from error
        except httpx.TransportError as error:
            raise _Retry(f"connection failed: {type(error).__name__}: {error}") from error


def make_client(config: FetchConfig) -> httpx.Client:
    return httpx.Client(
        timeout=httpx.Timeout(config.timeout),
        follow_redirects=True,
        limits=httpx.Limits(max_connections=config.workers, max_keepalive_connections=config.workers),
        headers={"User-Agent": "blipdiff-fetch"},
    )


def run_jobs(config: FetchConfig, jobs: Iterable[Job], on_done: Callable[[ImageRecord | Reject], None]) -> None:
    """Run jobs on a thread pool with at most a few times ``workers`` jobs queued at once."""
    with make_client(config) as client, ThreadPoolExecutor(max_workers=config.workers) as pool:
        fetcher = Fetcher(config, client)
        pending: set[Future] = set()
        for job in jobs:
            pending.add(pool.submit(fetcher.run, job))
            if len(pending) >= 4 * config.workers:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    on_done(future.result())
        for future in as_completed(pending):
            on_done(future.result())


def _fetch_shard(config_json: str, jobs: list[Job]) -> list[ImageRecord | Reject]:
    outcomes: list[ImageRecord | Reject] = []
    run_jobs(FetchConfig.model_validate_json(config_json), jobs, outcomes.append)
    return outcomes


def run_jobs_on_ray(config: FetchConfig, jobs: list[Job], on_done: Callable[[ImageRecord | Reject], None]) -> None:
    """Fan shards of jobs out as Ray tasks (every node must see ``config.out``)."""
    import ray

    from blipdiff.infra.ray_cluster import connect_ray

    connect_ray()
    # Downloads wait on the network, not the CPU: a fraction of a CPU each keeps Ray from starving.
    remote = ray.remote(num_cpus=0.25, max_retries=2)(_fetch_shard)
    config_json = config.model_dump_json()
    shards = [jobs[i : i + config.ray_shard] for i in range(0, len(jobs), config.ray_shard)]
    pending = [remote.remote(config_json, shard) for shard in shards]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        for outcome in ray.get(done[0]):
            on_done(outcome)


def _index_folder(folder: Path) -> dict[str, Path]:
    """Image files below ``folder`` whose name is an image id, by id (first in sorted order wins)."""
    if not folder.is_dir():
        raise ValueError(f"--from-dir {folder} is not a folder")
    found: dict[str, Path] = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES and IMAGE_ID_PATTERN.match(stem):
                found.setdefault(stem, Path(root) / name)
    return found


def _jobs_from_images_csv(config: FetchConfig, ids: list[str]) -> tuple[list[Job], list[Reject]]:
    url_column = "Thumbnail300KURL" if config.thumbnails else "OriginalURL"
    columns = ["ImageID", url_column] + ([] if config.thumbnails else ["OriginalMD5"])
    try:
        reader = pa_csv.open_csv(
            config.images_csv,
            convert_options=pa_csv.ConvertOptions(
                include_columns=columns, column_types=dict.fromkeys(columns, pa.string())
            ),
        )
    except (OSError, pa.ArrowInvalid) as error:
        raise ValueError(f"cannot read images CSV {config.images_csv}: {error}") from error
    wanted = pa.array(ids, pa.string())
    rows: dict[str, tuple[str | None, str | None]] = {}
    for batch in reader:
        table = pa.Table.from_batches([batch])
        keep = pc.is_in(table.column("ImageID"), value_set=wanted)
        table = table.filter(keep)
        urls = table.column(url_column).to_pylist()
        md5s = table.column("OriginalMD5").to_pylist() if not config.thumbnails else [None] * len(urls)
        for image_id, url, md5 in zip(table.column("ImageID").to_pylist(), urls, md5s, strict=True):
            rows[image_id] = (url, md5)
    jobs, rejects = [], []
    for image_id in ids:
        url, md5 = rows.get(image_id, (None, None))
        if not url:
            reason = f"no {url_column} in the images CSV" if image_id in rows else "not in the images CSV"
            rejects.append(Reject(image_id, "source", reason))
        else:
            jobs.append(Job(image_id, url, _base64_md5_to_hex(md5)))
    return jobs, rejects


def _base64_md5_to_hex(value: str | None) -> str | None:
    if not value:
        return None
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest.hex() if len(digest) == 16 else None


def plan(config: FetchConfig, ids: list[str]) -> tuple[list[Job], list[Reject]]:
    """Jobs for the ids still to fetch, and the ids that cannot be fetched from this source."""
    if not ids:
        return [], []  # nothing left: no need to walk the folder or read the images CSV
    if config.from_dir is not None:
        files = _index_folder(config.from_dir)
        jobs = [Job(i, str(files[i])) for i in ids if i in files]
        rejects = [Reject(i, "source", f"no image file named {i}.* in --from-dir") for i in ids if i not in files]
        return jobs, rejects
    if config.images_csv is not None:
        return _jobs_from_images_csv(config, ids)
    return [Job(i, config.url_template.format(image_id=i, split=config.split)) for i in ids], []


def _journal_records(journal: Journal) -> dict[str, ImageRecord]:
    records = {}
    for entry in journal.load():
        try:
            record = ImageRecord(**entry)
        except TypeError:
            continue
        records[record.image_id] = record
    return records


def _already_done(out: Path, ids: list[str], journal: dict[str, ImageRecord]) -> dict[str, ImageRecord]:
    """Journal records whose file is still in place, with its size. A file renamed into place just
    before a kill, whose journal line was never written, is fetched again and replaced atomically."""
    done = {}
    for image_id in ids:
        record = journal.get(image_id)
        if record is not None:
            path = out / record.path
            if path.is_file() and path.stat().st_size == record.bytes:
                done[image_id] = record
    return done


def fetch_images(config: FetchConfig, progress: Callable[[int, int], None] | None = None) -> FetchSummary:
    """Fetch every subject's image into ``config.out``; write images.parquet and rejects.parquet."""
    out = config.out
    ids = read_image_ids(config.subjects)
    invalid = [Reject(i, "id", "image id is not 16 lowercase hex digits") for i in ids if not IMAGE_ID_PATTERN.match(i)]
    valid = [i for i in ids if IMAGE_ID_PATTERN.match(i)]
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    remove_stale_temporaries(out)  # a manifest half-written by a killed run

    journal = Journal(out / JOURNAL_NAME)
    done = _already_done(out, valid, _journal_records(journal))
    records: dict[str, ImageRecord] = {}
    jobs, source_rejects = plan(config, [i for i in valid if i not in done])
    rejects = invalid + source_rejects

    total, finished = len(jobs), 0

    def on_done(outcome: ImageRecord | Reject) -> None:
        nonlocal finished
        if isinstance(outcome, ImageRecord):
            journal.append(asdict(outcome))
            records[outcome.image_id] = outcome
        else:
            rejects.append(outcome)
        finished += 1
        if progress is not None:
            progress(finished, total)

    if jobs:
        (run_jobs_on_ray if config.use_ray() else run_jobs)(config, jobs, on_done)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)

    accepted = sorted({**done, **records}.values(), key=lambda r: r.image_id)
    rejects.sort(key=lambda r: r.image_id)
    _write_manifest([asdict(r) for r in accepted], IMAGES_SCHEMA, out / "images.parquet")
    _write_manifest([asdict(r) for r in rejects], REJECTS_SCHEMA, out / "rejects.parquet")
    return FetchSummary(fetched=len(records), skipped=len(done), rejects=rejects)


def _write_manifest(rows: list[dict], schema: pa.Schema, path: Path) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as temp:
        pq.write_table(table, temp)

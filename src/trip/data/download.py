"""`trip data download`: fetch a benchmark's archives, check them, and extract them to the layout trip reads
(`<root>/<folder>/<domain>/<class>/<image>`).

Archives land in `<root>/.trip-downloads/` as `<name>.part` and are renamed only once complete and checked
(size against the server's, checksum where one is known), so an interrupted download resumes with an HTTP
Range request and a bad file is never extracted. `$TRIP_DATA_MIRROR` replaces every archive's directory
with a mirror's (`<mirror>/<archive file name>`)."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import lzma
import os
import re
import shutil
import socket
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path
from urllib.parse import urlsplit

from trip.data.benchmarks import Archive
from trip.data.datasets import DatasetSpec
from trip.errors import TripError
from trip.progress import progress

CONNECT_TIMEOUT = 5.0  # seconds: offline fails at once
READ_TIMEOUT = 60.0
CHUNK = 1 << 20
DOWNLOADS = ".trip-downloads"
# What reading a damaged zip or (compressed) tar raises.
BROKEN_ARCHIVE = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError)


def download(spec: DatasetSpec, root: Path, archives: tuple[Archive, ...], keep: bool = False) -> list[str]:
    """Fetch, check and extract every archive whose domains (or file) are not there yet. Returns one line
    per archive saying what was done, with the SHA-256 of those that had no published checksum."""
    target = root / spec.folder_names[0]
    store = root / DOWNLOADS
    store.mkdir(parents=True, exist_ok=True)
    report = []
    for archive in archives:
        if is_present(spec, target, archive):
            report.append(f"{archive.filename}: already in {target}")
            continue
        path, sha256 = fetch(archive, store, [a.url for a in archives])
        install(spec, path, archive, target)
        if not keep:
            path.unlink(missing_ok=True)
        known = f"checked against {archive.checksum.split(':')[0]}" if archive.checksum else "no published checksum"
        report.append(f"{archive.filename}: installed ({known}; sha256 {sha256})")
    return report


def mirrored(archive: Archive) -> Archive:
    mirror = os.environ.get("TRIP_DATA_MIRROR")
    if not mirror:
        return archive
    return Archive(f"{mirror.rstrip('/')}/{archive.filename}", archive.checksum, archive.domains)


def is_present(spec: DatasetSpec, target: Path, archive: Archive) -> bool:
    if not archive.domains:
        return (target / archive.filename).is_file()
    return all(any((target / f).is_dir() for f in spec.domain_folders(d)) for d in archive.domains)


def fetch(archive: Archive, store: Path, all_urls: list[str]) -> tuple[Path, str]:
    """The checked archive in `store` and its SHA-256: reused if a complete copy is there, else downloaded
    or resumed."""
    path = store / archive.filename
    if not path.is_file():
        part = path.with_name(path.name + ".part")
        probe(archive.url, store, all_urls)
        transfer(archive.url, part)
        os.replace(part, path)
    return path, checked_sha256(path, archive.checksum)


def probe(url: str, store: Path, all_urls: list[str]) -> None:
    """Fail at once, with the manual steps, when the host cannot be reached."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")  # reaching the proxy is what counts
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT).close()
    except OSError as err:
        raise TripError(f"cannot reach {parts.hostname}:{port} ({err}): offline, or the host is down or "
                        f"blocked.\n{manual_steps(store, all_urls)}") from None


def manual_steps(store: Path, urls: list[str]) -> str:
    listing = "\n".join(f"    {u}" for u in urls)
    return (f"To install by hand: (1) download these on a machine with internet access:\n{listing}\n"
            f"(2) copy them, under the same file names, into {store}\n"
            f"(3) run this command again: it checks and extracts them without the network "
            f"(or extract them yourself to the layout in docs/datasets.md and run `trip data verify`).")


def transfer(url: str, part: Path) -> None:
    """Download `url` into `part`, resuming from the bytes already there."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=READ_TIMEOUT)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have and _range_total(err.headers.get("Content-Range", "")) == have:
            return  # the part is already complete
        if err.code == 416:
            part.unlink(missing_ok=True)
            raise TripError(f"{part.name} does not fit the server's file (it changed?): deleted it; run the same "
                            f"command again to download afresh") from None
        raise TripError(f"download of {url} failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise TripError(f"download of {url} failed: {err}") from None
    with response:
        resumed = have > 0 and response.status == 206
        total = _range_total(response.headers.get("Content-Range", "")) if resumed else None
        if not resumed:
            have, length = 0, response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        _copy(response, part, have, total)
    size = part.stat().st_size
    if total is not None and size > total:
        part.unlink()
        raise TripError(f"{part.name} grew past the server's {total:,} bytes: deleted it; run the same command "
                        f"again to download afresh")
    if total is not None and size < total:
        raise TripError(f"download of {url} stopped at {size:,} of {total:,} bytes; run the same command again "
                        f"to resume")


def _copy(response, part: Path, have: int, total: int | None) -> None:
    bar = progress(total=total, initial=have, unit="B", unit_scale=True, desc=f"downloading {part.name[:-5]}")
    try:
        with part.open("ab" if have else "wb") as out, bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as err:
        raise TripError(f"download interrupted at {part.stat().st_size:,} bytes ({type(err).__name__}); run the "
                        f"same command again to resume") from None


def _range_total(content_range: str) -> int | None:
    match = re.search(r"/(\d+)\s*$", content_range)
    return int(match.group(1)) if match else None


def file_digests(path: Path, algorithms: set[str]) -> dict[str, str]:
    digests = {a: hashlib.new(a) for a in algorithms}
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            for digest in digests.values():
                digest.update(chunk)
    return {a: d.hexdigest() for a, d in digests.items()}


def checked_sha256(path: Path, checksum: str | None) -> str:
    """The file's SHA-256, after checking it against `checksum` ("sha256:<hex>" or "md5:<hex>") if given."""
    algorithm, _, expected = (checksum or "sha256:").partition(":")
    digests = file_digests(path, {"sha256", algorithm})
    actual = digests[algorithm]
    if checksum and actual != expected.lower():
        path.unlink()
        raise TripError(f"{path.name}: {algorithm} {actual} does not match the expected {expected}; the file was "
                        f"deleted and nothing was extracted. Run the command again to download it afresh; if "
                        f"it fails again the source changed: check the URL (docs/datasets.md)")
    return digests["sha256"]


def install(spec: DatasetSpec, path: Path, archive: Archive, target: Path) -> None:
    """Extract `path` and move its domain folders, under their canonical names, into `target` (a loose
    file is copied there). Extraction goes to a scratch folder first, so a failure leaves `target` as it was."""
    if not archive.domains:
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target / archive.filename)
        return
    scratch = path.with_name(path.name + ".extract")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        extract(path, scratch)
        parent = domains_parent(spec, scratch, archive.domains)
        target.mkdir(parents=True, exist_ok=True)
        for domain in archive.domains:
            found = next(f for f in spec.domain_folders(domain) if (parent / f).is_dir())
            os.replace(parent / found, target / domain)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def extract(path: Path, dest: Path) -> None:
    """Extract `path` into `dest`; an archive that cannot be read is deleted (it is never right to reuse it)."""
    try:
        _extract(path, dest)
    except BROKEN_ARCHIVE as err:
        path.unlink(missing_ok=True)
        raise TripError(f"{path} is not a readable archive ({type(err).__name__}: {err}): deleted it; run the "
                        f"same command again to download it afresh (or copy a good one there)") from None


def _extract(path: Path, dest: Path) -> None:
    name = path.name.lower()
    if name.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            for member in z.namelist():
                if not (dest / member).resolve().is_relative_to(dest.resolve()):
                    raise TripError(f"{path.name}: member {member!r} would land outside the folder; not extracted")
            z.extractall(dest)
    elif name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        with tarfile.open(path) as t:
            t.extractall(dest, filter="data")
    else:
        raise TripError(f"{path.name}: not a zip or tar archive")


def domains_parent(spec: DatasetSpec, scratch: Path, domains: tuple[str, ...]) -> Path:
    """The shallowest folder of the extracted tree that holds every one of `domains` (archives differ in
    how many wrapper folders they have)."""
    queue = [scratch]
    while queue:
        folder = queue.pop(0)
        if all(any((folder / f).is_dir() for f in spec.domain_folders(d)) for d in domains):
            return folder
        queue += sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "__MACOSX")
    raise TripError(f"the archive holds no folder with the domains {', '.join(domains)}; extract it by hand "
                    f"to the layout in docs/datasets.md")

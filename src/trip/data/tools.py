"""`trip data list | verify | download`: what trip can read, whether a copy on disk is complete and readable,
and fetching the public archives. Exit status: 0 fine, 1 verify found problems, 2 a usage error."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

from trip.data import download as dl
from trip.data.benchmarks import Archive
from trip.data.datasets import DATASETS, DatasetSpec, dataset_root, get_dataset
from trip.data.folder import IMAGE_SUFFIXES
from trip.data.imagecheck import find_unreadable
from trip.data.loading import domain_folder, read_split_files, split_files
from trip.errors import TripError
from trip.results import text_table


def add_data_command(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="list, verify or download the benchmark data sets")
    cmds = data.add_subparsers(dest="data_command", required=True)
    cmds.add_parser("list", help="supported data sets: domains, expected sizes, sources, licences"
                    ).set_defaults(func=list_command)

    verify = cmds.add_parser("verify", help="count images per domain and class against the expected numbers "
                             "and decode every image; exit 1 on any problem")
    _name_and_root(verify)
    verify.add_argument("--splits", choices=["all", "official"], default="all",
                        help="domain_net: count only the images its official split files list")
    verify.set_defaults(func=verify_command)

    fetch = cmds.add_parser("download", help="download, check and extract a data set's public archives")
    _name_and_root(fetch)
    fetch.add_argument("--url", help="fetch this URL instead (data sets of one archive)")
    fetch.add_argument("--sha256", help="expected SHA-256 of the archive (with --url, or to pin a known one)")
    fetch.add_argument("--keep-archives", action="store_true", help=f"keep the archives in ROOT/{dl.DOWNLOADS}")
    fetch.set_defaults(func=download_command)


def _name_and_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="data set: " + ", ".join(DATASETS))
    parser.add_argument("--root", type=Path, help="the data root that holds the data set's folder "
                        "(default $TRIP_DATA)")


def list_command(args: argparse.Namespace) -> int:
    for spec in DATASETS.values():
        print("\n".join(describe(spec)) + "\n")
    print("Layout: <root>/<folder>/<domain>/<class>/<image>; `trip data verify NAME --root DIR` checks a copy, "
          "`trip data download NAME --root DIR` fetches one (docs/datasets.md).")
    return 0


def describe(spec: DatasetSpec) -> list[str]:
    total = sum(spec.expected_counts.values())
    sizes = " · ".join(f"{d} {spec.expected_counts[d]:,}" if d in spec.expected_counts else d
                       for d in spec.domains)
    lines = [f"{spec.name}: {len(spec.domains)} domains, {len(spec.classes)} classes"
             + (f", {total:,} images" if total else ""),
             f"  domains   {sizes}" + ("" if spec.counts_exact else " (cleaned split files)"),
             f"  folder    {' | '.join(spec.folder_names)}",
             f"  source    {spec.source}"]
    if spec.licence:
        lines.append(f"  licence   {spec.licence}")
    for archive in spec.archives:
        if archive.domains:
            lines.append(f"  archive   {archive.url} ({archive.checksum or 'no published checksum: size checked'})")
    files = [a for a in spec.archives if not a.domains]
    if files:
        lines.append(f"  files     {len(files)} split files from {files[0].url.rsplit('/', 1)[0]}/ "
                     f"({files[0].filename}, ...; no published checksum: size checked)")
    return lines


@dataclass
class DomainCheck:
    row: list[str]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verify_command(args: argparse.Namespace) -> int:
    spec = get_dataset(args.name)
    if args.splits == "official" and spec.name != "domain_net":
        raise TripError("--splits official applies to domain_net only")
    root = dataset_root(spec, str(args.root) if args.root else None, images_per_class=40, seed=0)
    checks = [verify_domain(spec, root, d, args.splits == "official") for d in spec.domains]
    print(f"{spec.name} at {root} ({len(spec.classes)} classes)\n")
    print(text_table(["domain", "images", "expected", "unreadable"], [c.row for c in checks]))
    problems = [p for c in checks for p in c.problems]
    notes = [n for c in checks for n in c.notes]
    for title, lines in (("notes", notes), ("problems", problems)):
        if lines:
            print(f"\n{title}:\n" + "\n".join(f"  {line}" for line in lines))
    print(f"\n{len(problems)} problem(s): see above" if problems else "\nOK: every count matches and every image "
          "decodes")
    return 1 if problems else 0


def verify_domain(spec: DatasetSpec, root: Path, domain: str, official: bool) -> DomainCheck:
    expected = spec.expected_counts.get(domain)
    shown = f"{expected:,}" if expected else "—"
    found = domain_folder(spec, root, domain)
    if found is None:
        return DomainCheck([domain, "—", shown, "—"], [f"{domain}: folder missing (looked for "
                                                      f"{', '.join(spec.domain_folders(domain))} in {root})"])
    check = DomainCheck([])
    images = class_images(root, found, check)
    _class_folders(spec, domain, set(images), check)
    if official:
        images = _listed_only(root, domain, images, check)
    paths = [p for ps in images.values() for p in ps]
    bad = find_unreadable(root, paths, desc=f"decoding {domain}")
    check.problems += [f"unreadable: {p}: {why}" for p, why in sorted(bad.items())]
    _compare_counts(spec, domain, {c: len(ps) for c, ps in images.items()}, official, check)
    check.row = [domain, f"{len(paths):,}", shown, f"{len(bad):,}"]
    return check


def class_images(root: Path, folder: str, check: DomainCheck) -> dict[str, list[str]]:
    """Class folder -> relative paths of its image files (as the loader picks them)."""
    images, ignored = {}, 0
    for class_dir in sorted(p for p in (root / folder).iterdir() if p.is_dir()):
        files = sorted(f.name for f in class_dir.iterdir() if f.is_file())
        images[class_dir.name] = [f"{folder}/{class_dir.name}/{n}" for n in files
                                  if Path(n).suffix.lower() in IMAGE_SUFFIXES]
        ignored += len(files) - len(images[class_dir.name])
    if ignored:
        check.notes.append(f"{folder}: {ignored} file(s) without an image suffix, ignored")
    return images


def _class_folders(spec: DatasetSpec, domain: str, present: set[str], check: DomainCheck) -> None:
    missing = [c for c in spec.classes if c not in present]
    extra = sorted(present - set(spec.classes))
    if missing:
        check.problems.append(f"{domain}: class folders missing: {', '.join(missing)}")
    if extra:
        check.problems.append(f"{domain}: class folders not in the class list: {', '.join(extra)}")


def _listed_only(root: Path, domain: str, images: dict[str, list[str]], check: DomainCheck) -> dict[str, list[str]]:
    listed = read_split_files(split_files(root, domain))
    on_disk = {p for ps in images.values() for p in ps}
    absent = sorted(listed - on_disk)
    if absent:
        check.problems.append(f"{domain}: {len(absent)} images in the split files are missing on disk, e.g. "
                              f"{', '.join(absent[:3])}")
    return {c: [p for p in ps if p in listed] for c, ps in images.items()}


def _compare_counts(spec: DatasetSpec, domain: str, counts: dict[str, int], official: bool,
                    check: DomainCheck) -> None:
    total, expected = sum(counts.values()), spec.expected_counts.get(domain)
    if expected is not None and total != expected:
        if spec.counts_exact or official:
            check.problems.append(f"{domain}: {total:,} images, expected {expected:,}")
        else:
            check.notes.append(f"{domain}: {total:,} images in the folders; the cleaned split files list "
                               f"{expected:,} (the zips also hold duplicates): --splits official checks exactly")
    published = spec.class_counts.get(domain, {})
    check.problems += [f"{domain}/{c}: {counts.get(c, 0):,} images, expected {n:,}"
                       for c, n in published.items() if counts.get(c, 0) != n]


def download_command(args: argparse.Namespace) -> int:
    spec = get_dataset(args.name)
    if not spec.archives:
        raise TripError(f"{spec.name} has nothing to download")
    root_str = str(args.root) if args.root else os.environ.get("TRIP_DATA")
    if not root_str:
        raise TripError("no data root: pass --root DIR or set TRIP_DATA")
    report = dl.download(spec, Path(root_str).expanduser(), archives_to_fetch(spec, args.url, args.sha256),
                         keep=args.keep_archives)
    print("\n".join(report))
    print(f"\nNext: trip data verify {spec.name} --root {root_str}")
    return 0


def archives_to_fetch(spec: DatasetSpec, url: str | None, sha256: str | None) -> tuple[Archive, ...]:
    archives = tuple(dl.mirrored(a) for a in spec.archives)
    if url is None and sha256 is None:
        return archives
    if len(archives) != 1:
        raise TripError(f"--url/--sha256 replace a single archive, and {spec.name} has {len(archives)}; use "
                        f"$TRIP_DATA_MIRROR to fetch them from elsewhere")
    if sha256 is not None and (len(sha256) != 64 or any(ch not in "0123456789abcdefABCDEF" for ch in sha256)):
        raise TripError(f"--sha256 expects 64 hex digits, got {sha256!r}")
    (only,) = archives
    return (Archive(url or only.url, f"sha256:{sha256}" if sha256 else only.checksum, only.domains),)

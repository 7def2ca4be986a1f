"""Where one image of a raw case comes from: a file, one volume of a 4D file, or a DICOM series.

Layouts describe cases with :class:`Source` records; readers turn a source into an image and
the manifest fingerprints it, so a new kind of source is added here once, not in every step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Source:
    """One image of a case.

    ``path`` is an image file, or a folder holding a DICOM series; ``channel`` picks one
    volume of a 4D file (MSD stores four modalities in one); ``series_uid`` picks one series
    in a DICOM folder (a study folder holds several).
    """

    path: Path
    channel: int | None = None
    series_uid: str | None = None

    def describe(self) -> str:
        """The source as an error message names it."""
        if self.channel is not None:
            return f"{self.path} [volume {self.channel}]"
        if self.series_uid is not None:
            return f"{self.path} [series {self.series_uid}]"
        return str(self.path)

    def relative_to(self, root: Path) -> str:
        """The manifest's portable form: the path relative to the raw folder, plus the pick."""
        text = self.path.relative_to(root).as_posix()
        if self.channel is not None:
            return f"{text}#volume={self.channel}"
        if self.series_uid is not None:
            return f"{text}#series={self.series_uid}"
        return text


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in chunks."""
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One sha256 over several files (a DICOM series): the digest of their sorted digests."""
    digests = sorted(sha256_file(p) for p in paths)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def source_sha256(source: Source) -> str:
    """The fingerprint of a source's bytes (every file of a DICOM series)."""
    if source.series_uid is not None:
        from data_adapters.dicom import series_files  # DICOM support loads only when needed

        return sha256_files(series_files(source.path, series_uid=source.series_uid))
    return sha256_file(source.path)

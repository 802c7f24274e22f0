"""The checksum manifest of a converted folder: written by `convert`, re-read by `inspect --check`.

`SHA256SUMS` holds one `<sha256>  <file name>` line per output file, sorted by name: the format `sha256sum -c`
reads, so the folder can be checked without this tool too. Its content depends only on the other files' bytes
(no timestamps, no paths), so identical conversions give identical manifests. The report's per-file sha256 are
the same numbers; the manifest travels with the folder, so `--check` needs no report.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from precompute_cli.errors import InputError
from precompute_cli.progress import Progress

MANIFEST = "SHA256SUMS"
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


def sha256(path: Path, between_blocks: Callable[[], None] | None = None,
           hashed: Callable[[int], None] | None = None) -> str:
    """A file's sha256; `between_blocks` runs before each 16 MB block (the executor stops a hash there), `hashed`
    after it, with its size (progress)."""
    digest = hashlib.sha256()
    view = memoryview(bytearray(16 << 20))
    with open(path, "rb", buffering=0) as f:
        while True:
            if between_blocks:
                between_blocks()
            n = f.readinto(view)
            if not n:
                return digest.hexdigest()
            digest.update(view[:n])
            if hashed:
                hashed(n)


def write_manifest(folder: Path, digests: dict[str, str]) -> Path:
    """Write SHA256SUMS for `digests` (file name -> sha256) into `folder`."""
    path = Path(folder) / MANIFEST
    path.write_text("".join(f"{digests[name]}  {name}\n" for name in sorted(digests)))
    return path


def read_manifest(folder: Path) -> dict[str, str]:
    path = Path(folder) / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(f"{path}: missing; only folders written by `precompute convert` can be checked") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
    digests: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = _LINE.match(line)
        name = match.group(2) if match else ""
        if not match or "/" in name or name in (".", "..", MANIFEST) or name in digests:
            raise InputError(f"{path}: line {number} is not a `<sha256>  <file name>` entry for a file of the folder")
        digests[name] = match.group(1)
    if not digests:
        raise InputError(f"{path}: lists no files")
    return digests


@dataclass(frozen=True)
class FileCheck:
    name: str
    status: str  # "ok" | "changed" | "missing" | "unlisted" (present but not in the manifest: not checked)
    expected: str | None
    actual: str | None


def check(folder: Path, progress: Progress | None = None) -> list[FileCheck]:
    """Re-hash every file the manifest lists; extra files are reported but, as with `sha256sum -c`, not failed."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; --check takes the output folder of `precompute convert`")
    digests = read_manifest(folder)
    total = sum((folder / n).stat().st_size for n in digests if (folder / n).is_file())
    done = 0

    def hashed(n: int) -> None:
        nonlocal done
        done += n
        progress("hashing", done, total)

    results = []
    for name, expected in sorted(digests.items()):
        path = folder / name
        actual = sha256(path, hashed=hashed if progress else None) if path.is_file() else None
        status = "missing" if actual is None else ("ok" if actual == expected else "changed")
        results.append(FileCheck(name, status, expected, actual))
    listed = set(digests) | {MANIFEST}
    results += [FileCheck(p.name, "unlisted", None, None) for p in sorted(folder.iterdir()) if p.name not in listed]
    return results


def failures(results: list[FileCheck]) -> list[FileCheck]:
    return [r for r in results if r.status in ("changed", "missing")]

"""Where the clips come from: a folder, a metadata.csv or a metadata.jsonl.

- folder (searched recursively): every video with a same-named `.txt` caption beside it;
- `metadata.csv` with columns `video` and `caption`, or `metadata.jsonl` with one
  `{"video": ..., "caption": ...}` per line; video paths are relative to the metadata file.

Each entry becomes an `Entry` whose caption problem, if any, is recorded (not raised): the bad
input policy (data/policy.py) decides what happens to it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v")


@dataclass(frozen=True)
class Entry:
    """One video and its caption as listed by a source."""

    video: str
    """Absolute path of the video file (it may not exist: that is checked when probing)."""
    caption: str | None
    problem: str | None = None
    """Why the entry is unusable before the video is even opened (a reason of data/policy.py)."""


def _caption_problem(caption: str | None) -> str | None:
    if caption is None:
        return "missing_caption"
    if not caption.strip():
        return "empty_caption"
    return None


def read_caption_file(path: Path) -> tuple[str | None, str | None]:
    """(caption, problem) of a `.txt` caption file."""
    if not path.exists():
        return None, "missing_caption"
    try:
        caption = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        return None, "caption_not_utf8"
    except OSError:  # PermissionError, IsADirectoryError, an I/O error
        return None, "caption_unreadable"
    return caption, _caption_problem(caption)


def read_folder(root: Path) -> list[Entry]:
    """Videos under `root` (recursive, sorted) with their `.txt` captions; a broken link or a
    folder with a video's name is an entry with its problem, not silently left out."""
    entries = []
    for video in sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES):
        if video.is_symlink() and not video.exists():
            entries.append(Entry(str(video), None, "broken_link"))
        elif not video.is_file():
            entries.append(Entry(str(video), None, "not_a_file"))
        else:
            caption, problem = read_caption_file(video.with_suffix(".txt"))
            entries.append(Entry(str(video.resolve()), caption, problem))
    return entries


def describe_folder(root: Path, limit: int = 6) -> str:
    """What a folder holds, for an error about it: files by extension and the subfolders."""
    root = Path(root)
    if not root.exists():
        return "it does not exist"
    if not root.is_dir():
        return "it is not a folder"
    by_suffix: dict[str, int] = {}
    folders = 0
    for p in root.rglob("*"):
        if p.is_dir():
            folders += 1
        else:
            suffix = p.suffix.lower() or "(no extension)"
            by_suffix[suffix] = by_suffix.get(suffix, 0) + 1
    if not by_suffix and not folders:
        return "it is empty"
    common = sorted(by_suffix.items(), key=lambda kv: (-kv[1], kv[0]))
    files = ", ".join(f"{n} {suffix}" for suffix, n in common[:limit]) + (", ..." if len(common) > limit else "")
    return (
        f"found {sum(by_suffix.values())} files ({files or 'none'}) in {folders} subfolders and the top level; "
        f"videos are {' '.join(VIDEO_SUFFIXES)}, each with a same-named .txt caption"
    )


def _entry_from_row(row: dict, base: Path, where: str) -> Entry:
    video = row.get("video")
    if not isinstance(video, str) or not video.strip():
        return Entry(where, None, "bad_metadata_row")
    caption = row.get("caption")
    if caption is not None and not isinstance(caption, str):
        caption = str(caption)
    return Entry(str((base / video).resolve()), caption, _caption_problem(caption))


def read_csv(path: Path) -> list[Entry]:
    """Rows of a metadata.csv (header with `video` and `caption`)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    reader = csv.DictReader(text.splitlines())
    if not reader.fieldnames or "video" not in reader.fieldnames:
        raise ValueError(f"{path}: the CSV header must name a `video` column (and `caption`); got {reader.fieldnames}")
    return [_entry_from_row(row, path.parent, f"{path}:{i + 2}") for i, row in enumerate(reader)]


def read_jsonl(path: Path) -> list[Entry]:
    """Lines of a metadata.jsonl (`{"video": ..., "caption": ...}` each); a bad line is a bad entry."""
    entries = []
    for i, line in enumerate(path.read_bytes().splitlines()):
        if not line.strip():
            continue
        where = f"{path}:{i + 1}"
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            entries.append(Entry(where, None, "bad_metadata_row"))
            continue
        if not isinstance(row, dict):
            entries.append(Entry(where, None, "bad_metadata_row"))
            continue
        entries.append(_entry_from_row(row, path.parent, where))
    return entries


def read_source(path: str | Path) -> list[Entry]:
    """Entries of a folder, a .csv or a .jsonl; raises FileNotFoundError / ValueError if unreadable.
    A video listed again in the same source is kept once; the later listings become `duplicate`
    entries (named `VIDEO (listed again at N)`), so they are counted."""
    path = Path(path)
    if path.is_dir():
        entries = read_folder(path)
    elif not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist")
    elif path.suffix == ".csv":
        entries = read_csv(path)
    elif path.suffix == ".jsonl":
        entries = read_jsonl(path)
    else:
        raise ValueError(f"dataset {path} is not a folder, a .csv or a .jsonl")
    seen: set[str] = set()
    unique = []
    for i, entry in enumerate(entries):
        if entry.problem != "bad_metadata_row" and entry.video in seen:
            unique.append(Entry(f"{entry.video} (listed again at {i + 1})", None, "duplicate"))
            continue
        seen.add(entry.video)
        unique.append(entry)
    return unique

"""Captions of an image folder, from sidecar files (data.captions=true with data=image_folder).

Two sources, both read when present; an image's captions are all it gets from either:
- `<image>.txt` beside the image: `cat.png` -> `cat.txt` (the extension replaced) or `cat.png.txt`; one
  caption per non-blank line (several lines: several captions, one drawn per epoch);
- `captions.jsonl` in the root: one JSON object a line, {"file": "<path relative to root>", "text": "<caption>"};
  several rows may name one file.
Every image needs at least one caption; a row naming a file that is not an image of the folder, a
malformed row, an empty caption, or an empty .txt file is refused with its file and line.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path, PurePosixPath
from typing import Sequence

CAPTIONS_JSONL = "captions.jsonl"
_ROW = '{"file": "<image path relative to root>", "text": "<caption>"}'


def sidecar_txt(image: Path) -> Path | None:
    """The caption file beside `image` (`cat.txt` or `cat.png.txt`); None when there is none."""
    found = [p for p in (image.with_suffix(".txt"), image.with_name(image.name + ".txt")) if p.is_file()]
    if len(found) > 1:
        raise ValueError(f"image {image} has two caption files, {found[0]} and {found[1]}; keep one")
    return found[0] if found else None


def _txt_captions(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    captions = [line for line in lines if line]
    if not captions:
        raise ValueError(f"caption file {path} is empty; it must hold at least one caption (one per line)")
    return captions


def _jsonl_rows(path: Path) -> list[tuple[int, str, str]]:
    """(line number, relative file, caption) of every non-blank line of a captions.jsonl."""
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {lineno} is not JSON ({err.msg}): {line[:80]!r}; each line must be "
                             f"{_ROW}") from err
        if not isinstance(row, dict) or not isinstance(row.get("file"), str) or not isinstance(row.get("text"), str):
            raise ValueError(f"{path} line {lineno} is {line[:80]!r}; each line must be {_ROW} (both strings)")
        if not row["text"].strip():
            raise ValueError(f"{path} line {lineno}: text={row['text']!r} for file={row['file']!r} is empty; a caption "
                             "must hold some non-space text")
        rows.append((lineno, row["file"], row["text"].strip()))
    return rows


def _relative_key(file: str) -> str | None:
    """A jsonl "file" as a normalised posix path relative to root; None when absolute or leaving root."""
    norm = posixpath.normpath(file.replace("\\", "/"))
    if PurePosixPath(norm).is_absolute() or norm == ".." or norm.startswith("../"):
        return None
    return norm


def read_caption_files(root: Path, paths: Sequence[Path]) -> list[tuple[str, ...]]:
    """Per image of `paths` (all below `root`), its captions from the sidecar files; raises before training
    on a bad row, an empty caption or an image without any caption."""
    keys = {p.relative_to(root).as_posix(): i for i, p in enumerate(paths)}
    captions: list[list[str]] = [[] for _ in paths]
    jsonl = root / CAPTIONS_JSONL
    if jsonl.is_file():
        for lineno, file, text in _jsonl_rows(jsonl):
            key = _relative_key(file)
            if key not in keys:
                example = next(iter(keys))
                raise ValueError(f"{jsonl} line {lineno} names file={file!r}, which is not an image of root={root}; "
                                 f"allowed: the path of an image below root, relative to it (e.g. {example!r})")
            captions[keys[key]].append(text)
    for i, image in enumerate(paths):
        txt = sidecar_txt(image)
        if txt is not None:
            captions[i] += _txt_captions(txt)
    missing = [paths[i] for i, c in enumerate(captions) if not c]
    if missing:
        raise ValueError(f"data.captions=true but {len(missing)} of {len(paths)} images below root={root} have no "
                         f"caption, e.g. {missing[0]}; give each image a {missing[0].stem}.txt-style file beside it "
                         f"(one caption per line) or a row {_ROW} in {jsonl}")
    return [tuple(c) for c in captions]

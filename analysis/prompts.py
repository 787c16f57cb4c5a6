"""The prompt set: validation, a content hash, and token counts per category for a tokenizer."""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.errors import UserError
from analysis.quantities import CATEGORIES, NEUTRAL
REQUIRED_COLUMNS = ("prompt_id", "category", "text")
# Optional column: the word(s) that make a prompt first, second or third person ("your", "she her"),
# space-separated, each a whole word of the text; empty for neutral prompts, which have no person.
MARKER_COLUMN = "person_marker"


def marker_words(text: str, marker: str) -> list[str]:
    """The marker's words, each checked to occur in `text` as a whole word (case-sensitive)."""
    words = marker.split()
    missing = [w for w in words if not re.search(rf"(?<!\w){re.escape(w)}(?!\w)", text)]
    if missing:
        raise ValueError(f"person_marker word(s) {', '.join(map(repr, missing))} not in the text as whole words")
    return words


def marker_spans(text: str, marker: str) -> list[tuple[int, int]]:
    """Character spans of every occurrence of the marker's words in `text` (for token offsets)."""
    return sorted((m.start(), m.end()) for w in marker_words(text, marker)
                  for m in re.finditer(rf"(?<!\w){re.escape(w)}(?!\w)", text))


def normalise_text(text: str) -> str:
    """Case- and whitespace-insensitive form used to detect duplicate prompts."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(
            f"{path}: line {line} has bytes that are not UTF-8 ({raw[err.start:err.end]!r}); "
            "re-save the file as UTF-8"
        ) from None


def load_prompts(path: Path, min_per_category: int) -> pd.DataFrame:
    """Read and validate the prompt CSV; raise UserError listing every problem, row by row."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: prompt file not found") from None
    reader = csv.DictReader(io.StringIO(_decode(raw, path), newline=""))
    columns = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; the header needs {', '.join(REQUIRED_COLUMNS)}")

    problems: list[str] = []
    rows = []
    seen_ids: dict[str, int] = {}
    seen_texts: dict[str, int] = {}
    for index, row in enumerate(reader):
        line = reader.line_num
        if None in row:
            problems.append(f"line {line}: more fields than the header has columns")
            continue
        prompt_id = (row.get("prompt_id") or "").strip()
        category = (row.get("category") or "").strip()
        text = (row.get("text") or "").strip()
        where = f"line {line} (prompt_id {prompt_id!r})"
        if not prompt_id:
            problems.append(f"line {line}: empty prompt_id")
        elif prompt_id in seen_ids:
            problems.append(f"{where}: duplicate prompt_id, first used on line {seen_ids[prompt_id]}")
        else:
            seen_ids[prompt_id] = line
        if category not in CATEGORIES:
            problems.append(f"{where}: unknown category {category!r}; use one of {', '.join(CATEGORIES)}")
        if not text:
            problems.append(f"{where}: empty text")
        else:
            key = normalise_text(text)
            if key in seen_texts:
                problems.append(f"{where}: duplicate text {text!r} (same as line {seen_texts[key]} up to case and spacing)")
            else:
                seen_texts[key] = line
        marker = (row.get(MARKER_COLUMN) or "").strip()
        if MARKER_COLUMN in columns and category in CATEGORIES and text:
            if category == NEUTRAL and marker:
                problems.append(f"{where}: neutral prompts have no person marker; empty the {MARKER_COLUMN} field")
            elif category != NEUTRAL and not marker:
                problems.append(f"{where}: empty {MARKER_COLUMN}; name the word(s) that carry the person, e.g. 'your'")
            elif marker:
                try:
                    marker_words(text, marker)
                except ValueError as err:
                    problems.append(f"{where}: {err}")
        rows.append({**{k: (v or "").strip() for k, v in row.items()}, "prompt_id": prompt_id,
                     "category": category, "text": text, MARKER_COLUMN: marker, "order": index})

    names = [*columns, *([] if MARKER_COLUMN in columns else [MARKER_COLUMN]), "order"]
    frame = pd.DataFrame(rows, columns=names if rows else [*REQUIRED_COLUMNS, MARKER_COLUMN, "order"])
    counts = frame["category"].value_counts() if len(frame) else pd.Series(dtype=int)
    for category in CATEGORIES:
        n = int(counts.get(category, 0))
        if n < min_per_category:
            problems.append(f"category {category}: {n} prompts, fewer than the minimum {min_per_category} "
                            "(params.yaml prompts.min_per_category)")
    if problems:
        raise UserError(f"{path}: {len(problems)} problem(s) in the prompt set:\n  " + "\n  ".join(problems))
    return frame.reset_index(drop=True)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def summary(prompts: pd.DataFrame, path: Path) -> dict:
    """What the prompt check records: counts per category and the file's hash."""
    counts = prompts["category"].value_counts()
    return {
        "path": str(Path(path).name),
        "sha256": file_sha256(path),
        "n_prompts": int(len(prompts)),
        "per_category": {c: int(counts.get(c, 0)) for c in CATEGORIES},
    }


@dataclass
class LengthCheck:
    """Token counts per category for one tokenizer, and whether the means differ too much."""

    table: pd.DataFrame
    gap: float
    warning: str | None


def token_lengths(prompts: pd.DataFrame, n_tokens: list[int], label: str, max_gap: float) -> LengthCheck:
    """Summarise per-prompt token counts by category; warn when category means differ by > max_gap."""
    frame = prompts[["prompt_id", "category"]].assign(n_tokens=n_tokens)
    table = (frame.groupby("category")["n_tokens"].agg(["count", "mean", "std", "min", "max"])
             .reindex(list(CATEGORIES)).reset_index().assign(tokenizer=label))
    gap = float(table["mean"].max() - table["mean"].min())
    warning = None
    if gap > max_gap:
        warning = (f"{label}: mean token counts differ by {gap:.2f} tokens across categories "
                   f"(more than {max_gap}); length differences move entropy, see the length-normalised definition")
    return LengthCheck(table=table, gap=gap, warning=warning)

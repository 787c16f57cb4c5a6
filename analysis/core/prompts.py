"""The prompt set: validation, a content hash, and token counts per category for a tokenizer.

The file holds every language (`language`: en, zh, es); each translation names the English prompt it renders
(`source_id`), so prompts stay matched across languages (docs/method.md, "Languages"). Categories, counts and
duplicates are checked per language.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analysis.core.artefacts import file_sha256
from analysis.core.errors import UserError
from analysis.core.quantities import CATEGORIES, LANGUAGES, NEUTRAL, SOURCE_LANGUAGE

REQUIRED_COLUMNS = ("prompt_id", "category", "text")
# The person marker: the word that makes a prompt first, second or third person ("your", "my", "her", 你);
# empty for neutral prompts, which have no person (docs/method.md, "Where heads look").
MARKER_COLUMN = "marker"
# Optional columns and what a file without them means: every prompt English, no person marker recorded.
OPTIONAL_COLUMNS = ("triple_id", MARKER_COLUMN, "language", "source_id")


def _inside_word(char: str) -> bool:
    """A letter of a cased script (Latin, Greek, Cyrillic): such scripts separate words, so a marker next to one
    is part of a longer word ("you" in "yourself"). Uncased scripts written without spaces (Chinese) never are."""
    return char.isalpha() and char.lower() != char.upper()


def marker_spans(text: str, marker: str) -> list[tuple[int, int]]:
    """Character spans of every occurrence of the marker in `text` as a word of its own (for token offsets)."""
    spans = []
    for m in re.finditer(re.escape(marker), text):
        before = text[m.start() - 1] if m.start() else ""
        after = text[m.end()] if m.end() < len(text) else ""
        if not (_inside_word(before) or _inside_word(after)):
            spans.append((m.start(), m.end()))
    return spans


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


def load_prompts(path: Path, min_per_category: int, languages: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Read and validate the prompt CSV (every language in it); raise UserError listing every problem, row by
    row. Returns the prompts of `languages` (all when None) with `language` and `source_id` filled (an English
    prompt is its own source)."""
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
    seen_texts: dict[tuple[str, str], int] = {}
    for index, row in enumerate(reader):
        line = reader.line_num
        if None in row:
            problems.append(f"line {line}: more fields than the header has columns")
            continue
        prompt_id = (row.get("prompt_id") or "").strip()
        category = (row.get("category") or "").strip()
        text = (row.get("text") or "").strip()
        language = (row.get("language") or SOURCE_LANGUAGE).strip()
        marker = (row.get(MARKER_COLUMN) or "").strip()
        where = f"line {line} (prompt_id {prompt_id!r})"
        if not prompt_id:
            problems.append(f"line {line}: empty prompt_id")
        elif prompt_id in seen_ids:
            problems.append(f"{where}: duplicate prompt_id, first used on line {seen_ids[prompt_id]}")
        else:
            seen_ids[prompt_id] = line
        if category not in CATEGORIES:
            problems.append(f"{where}: unknown category {category!r}; use one of {', '.join(CATEGORIES)}")
        if language not in LANGUAGES:
            problems.append(f"{where}: unknown language {language!r}; use one of {', '.join(LANGUAGES)}")
        if not text:
            problems.append(f"{where}: empty text")
        else:
            key = (language, normalise_text(text))
            if key in seen_texts:
                problems.append(f"{where}: duplicate text {text!r} within language {language} (same as line "
                                f"{seen_texts[key]} up to case and spacing)")
            else:
                seen_texts[key] = line
        if marker and not marker_spans(text, marker):
            problems.append(f"{where}: marker {marker!r} does not occur in the text {text!r} as a word of its own")
        if MARKER_COLUMN in columns and category in CATEGORIES and text:
            if category == NEUTRAL and marker:
                problems.append(f"{where}: neutral prompts have no person marker; empty the {MARKER_COLUMN} field")
            elif category != NEUTRAL and not marker:
                problems.append(f"{where}: empty {MARKER_COLUMN}; name the word that carries the person, e.g. 'your'")
        rows.append({**{k: (v or "").strip() for k, v in row.items()}, "prompt_id": prompt_id,
                     "category": category, "text": text, "language": language, "order": index, "line": line})

    problems += _translation_problems(rows)
    base_columns = [*columns, *(c for c in ("language", "source_id") if c not in columns)]
    frame = pd.DataFrame(rows, columns=[*base_columns, "order", "line"] if rows else
                         [*REQUIRED_COLUMNS, "language", "source_id", "order", "line"])
    if "source_id" in frame and len(frame):
        english = frame["language"] == SOURCE_LANGUAGE
        frame["source_id"] = frame["source_id"].fillna("").where(~english, frame["prompt_id"])
    present = [lang for lang in LANGUAGES if (frame["language"] == lang).any()] if len(frame) else [SOURCE_LANGUAGE]
    for language in present:
        counts = frame.loc[frame["language"] == language, "category"].value_counts() if len(frame) else {}
        for category in CATEGORIES:
            n = int(counts.get(category, 0))
            if n < min_per_category:
                problems.append(f"language {language}, category {category}: {n} prompts, fewer than the minimum "
                                f"{min_per_category} (params.yaml prompts.min_per_category)")
    if problems:
        raise UserError(f"{path}: {len(problems)} problem(s) in the prompt set:\n  " + "\n  ".join(problems))
    if languages is not None:
        absent = [lang for lang in languages if lang not in present]
        if absent:
            raise UserError(f"params.yaml prompts.languages asks for {', '.join(absent)}, which {path.name} has no "
                            f"prompts in (it has {', '.join(present)}); add the translations or drop the language")
        frame = frame[frame["language"].isin(languages)]
    return frame.drop(columns="line").reset_index(drop=True)


def _translation_problems(rows: list[dict]) -> list[str]:
    """Every translation names an existing English prompt of the same category as its `source_id`, once per
    language; English prompts leave `source_id` empty (or name themselves)."""
    english = {r["prompt_id"]: r for r in rows if r["language"] == SOURCE_LANGUAGE}
    problems, rendered = [], {}
    for r in rows:
        source = r.get("source_id", "")
        where = f"line {r['line']} (prompt_id {r['prompt_id']!r})"
        if r["language"] == SOURCE_LANGUAGE:
            if source and source != r["prompt_id"]:
                problems.append(f"{where}: an English prompt is its own source; leave source_id empty")
            continue
        if r["language"] not in LANGUAGES:
            continue
        if not source:
            problems.append(f"{where}: a {r['language']} translation without its source; set source_id to the "
                            "prompt_id of the English prompt it renders")
        elif source not in english:
            problems.append(f"{where}: source_id {source!r} is not the prompt_id of an English prompt; a translation "
                            "needs its source in the file")
        else:
            if english[source]["category"] != r["category"]:
                problems.append(f"{where}: category {r['category']} differs from its source {source} "
                                f"({english[source]['category']}); a translation keeps the category")
            key = (r["language"], source)
            if key in rendered:
                problems.append(f"{where}: {source} is already translated into {r['language']} on line {rendered[key]}; "
                                "one translation per language keeps the prompts matched")
            else:
                rendered[key] = r["line"]
    return problems


def summary(prompts: pd.DataFrame, path: Path) -> dict:
    """What the prompt check records: counts per category and the file's hash."""
    counts = prompts["category"].value_counts()
    by_language = prompts.groupby("language")["category"].value_counts()
    return {
        "path": str(Path(path).name),
        "sha256": file_sha256(path),
        "n_prompts": int(len(prompts)),
        "per_category": {c: int(counts.get(c, 0)) for c in CATEGORIES},
        "per_language": {lang: {c: int(by_language.get((lang, c), 0)) for c in CATEGORIES}
                         for lang in LANGUAGES if lang in set(prompts["language"])},
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

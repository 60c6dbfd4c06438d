"""Trait files: the persona_vectors JSON schema (``instruction``, ``questions``, ``eval_prompt``).

One place for the format's rules: reading, validation (file, field and fix in every error), the
eval split beside an extraction file, and the trait name a path stands for. Trait *sources*
(``harness_list_traits`` / ``harness_load_trait``) build on these functions.
"""

from __future__ import annotations

import json
import string
import unicodedata
from pathlib import Path
from typing import Any

from harness.core.artifacts import json_depth
from harness.core.errors import TraitFileError
from harness.core.records import InstructionPair, TraitSpec

MAX_BYTES = 1_000_000
MAX_DEPTH = 4  # {"instruction": [{"pos": ...}]} is 3 levels
ALLOWED_KEYS = {"instruction", "questions", "eval_prompt", "description", "version"}
PLACEHOLDERS = {"question", "answer"}
PAPER_PAIRS, PAPER_QUESTIONS = 5, 20


def normalize_question(q: str) -> str:
    """The form two questions are compared in (NFKC, case-folded, whitespace collapsed)."""
    return " ".join(unicodedata.normalize("NFKC", q).casefold().split())


def read_trait_file(path: str | Path) -> dict[str, Any]:
    """Read and validate one trait file; raise TraitFileError naming file, field and fix."""
    path = Path(path)
    if not path.is_file():
        raise TraitFileError(path, "(file)", "no such file", "check the path")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise TraitFileError(path, "(file)", f"file is {size} bytes, over the {MAX_BYTES} byte limit",
                             "a trait file holds 5 instruction pairs, ~20 questions and a rubric; trim it")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TraitFileError(path, "(file)", f"not UTF-8 (byte {e.start})", "save the file as UTF-8") from None
    depth = json_depth(text)
    if depth > MAX_DEPTH:
        raise TraitFileError(path, "(file)", f"JSON nested {depth} levels deep (a trait file needs {MAX_DEPTH - 1})",
                             'write {"instruction": [{"pos": ..., "neg": ...}], "questions": [...], "eval_prompt": ...}')
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TraitFileError(path, "(file)", f"not JSON ({e.msg} at line {e.lineno} column {e.colno})",
                             "fix the JSON syntax") from None
    validate_trait_data(data, path)
    return data


def _check_text(path: str | Path, field: str, text: str) -> None:
    """Text must encode as UTF-8: a JSON escape such as \\ud800 gives a lone surrogate, which cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TraitFileError(path, field, f"holds a lone surrogate (\\u{ord(text[e.start]):04x} at character {e.start}), "
                             "which is not text", "remove it, or write the character itself (a surrogate pair "
                             "escape must be complete)") from None


def validate_trait_data(data: Any, path: str | Path = "<data>") -> None:
    if not isinstance(data, dict):
        raise TraitFileError(path, "(top level)", f"expected a JSON object, got {type(data).__name__}",
                             'write {"instruction": [...], "questions": [...], "eval_prompt": "..."}')
    for key in ("instruction", "questions", "eval_prompt"):
        if key not in data:
            raise TraitFileError(path, key, "missing", f"add the '{key}' key (persona_vectors schema)")
    extra = sorted(set(data) - ALLOWED_KEYS)
    if extra:
        raise TraitFileError(path, extra[0], "unknown key", f"remove it; allowed keys: {', '.join(sorted(ALLOWED_KEYS))}")
    ins = data["instruction"]
    if not isinstance(ins, list):
        raise TraitFileError(path, "instruction", f"expected a list, got {type(ins).__name__}",
                             'make it a list of {"pos": "...", "neg": "..."} objects')
    if not ins:
        raise TraitFileError(path, "instruction", "empty list", f"add {PAPER_PAIRS} pos/neg instruction pairs")
    for i, pair in enumerate(ins):
        where = f"instruction[{i}]"
        if not isinstance(pair, dict):
            raise TraitFileError(path, where, f"expected an object, got {type(pair).__name__}",
                                 'write {"pos": "...", "neg": "..."}')
        for side in ("pos", "neg"):
            if side not in pair:
                raise TraitFileError(path, f"{where}.{side}", "missing", f"add a '{side}' instruction")
            if not isinstance(pair[side], str) or not pair[side].strip():
                raise TraitFileError(path, f"{where}.{side}", "must be a non-empty string", "write the instruction text")
            _check_text(path, f"{where}.{side}", pair[side])
        if set(pair) - {"pos", "neg"}:
            raise TraitFileError(path, where, f"unknown keys {sorted(set(pair) - {'pos', 'neg'})}", "keep only 'pos' and 'neg'")
    qs = data["questions"]
    if not isinstance(qs, list):
        raise TraitFileError(path, "questions", f"expected a list, got {type(qs).__name__}", "make it a list of strings")
    if not qs:
        raise TraitFileError(path, "questions", "empty list", f"add {PAPER_QUESTIONS} questions")
    seen: dict[str, int] = {}
    for i, q in enumerate(qs):
        if not isinstance(q, str) or not q.strip():
            raise TraitFileError(path, f"questions[{i}]", "must be a non-empty string", "write the question text")
        _check_text(path, f"questions[{i}]", q)
        n = normalize_question(q)
        if n in seen:
            raise TraitFileError(path, f"questions[{i}]", f"duplicate of questions[{seen[n]}]", "remove or reword one of them")
        seen[n] = i
    for key in ("description", "version"):
        if isinstance(data.get(key), str):
            _check_text(path, key, data[key])
    validate_rubric(data["eval_prompt"], path)


def validate_rubric(rubric: Any, path: str | Path, field: str = "eval_prompt") -> None:
    """A rubric is text with exactly the placeholders ``{question}`` and ``{answer}``: no conversion
    (``!r``), no format spec (``:>10``, nested ``{...}``), no attribute or index access."""
    if not isinstance(rubric, str) or not rubric.strip():
        raise TraitFileError(path, field, "must be a non-empty string", "write the judge rubric")
    _check_text(path, field, rubric)
    braces = "write literal braces as {{ and }}"
    try:
        parts = [p for p in string.Formatter().parse(rubric) if p[1] is not None]
    except ValueError as e:
        raise TraitFileError(path, field, f"bad braces ({e})", braces) from None
    for _, fname, spec, conv in parts:
        shown = "{" + fname + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
        if conv is not None:
            raise TraitFileError(path, field, f"placeholder {shown} has a conversion (!{conv})",
                                 f"write {{{fname.split('.')[0].split('[')[0]}}} without it; {braces}")
        if spec:
            raise TraitFileError(path, field, f"placeholder {shown} has a format spec",
                                 f"write {{{fname.split('.')[0].split('[')[0]}}} without ':...'; {braces}")
        if fname not in PLACEHOLDERS and ("." in fname or "[" in fname):
            raise TraitFileError(path, field, f"placeholder {shown} uses attribute or index access",
                                 f"use only {{question}} and {{answer}}; {braces}")
    names = {p[1] for p in parts}
    unknown = sorted(n for n in names if n not in PLACEHOLDERS)
    if unknown:
        raise TraitFileError(path, field, f"unknown placeholder {{{unknown[0]}}}",
                             "use only {question} and {answer}; write literal braces as {{ and }}")
    for ph in ("question", "answer"):
        if ph not in names:
            raise TraitFileError(path, field, f"has no {{{ph}}} placeholder", f"add {{{ph}}} where the judge should see it")


def _eval_sibling(path: Path) -> Path | None:
    if path.name == "extract.json":
        cand = path.with_name("eval.json")
        return cand if cand.exists() else None
    if path.parent.name == "trait_data_extract":
        cand = path.parent.parent / "trait_data_eval" / path.name
        return cand if cand.exists() else None
    return None


def trait_name_for(path: Path) -> str:
    return path.parent.name if path.name in ("extract.json", "eval.json") else path.stem


def load_trait_files(extract_path: str | Path, eval_path: str | Path | None = None, *, name: str | None = None,
                     checks_path: str | Path | None = None, description: str = "") -> TraitSpec:
    """Build a TraitSpec from an extraction file and an optional evaluation file."""
    extract_path = Path(extract_path)
    data = read_trait_file(extract_path)
    eval_questions: tuple[str, ...] = ()
    if eval_path is not None:
        eval_path = Path(eval_path)
        edata = read_trait_file(eval_path)
        if edata["instruction"] != data["instruction"]:
            raise TraitFileError(eval_path, "instruction", f"differs from {extract_path}",
                                 "use the same instruction pairs in both splits")
        if edata["eval_prompt"] != data["eval_prompt"]:
            raise TraitFileError(eval_path, "eval_prompt", f"differs from {extract_path}",
                                 "use the same rubric in both splits")
        ex = {normalize_question(q): i for i, q in enumerate(data["questions"])}
        for j, q in enumerate(edata["questions"]):
            if normalize_question(q) in ex:
                raise TraitFileError(eval_path, f"questions[{j}]",
                                     f"also in {extract_path} questions[{ex[normalize_question(q)]}] (splits must be disjoint)",
                                     "replace it with a question not used for extraction")
        eval_questions = tuple(edata["questions"])
    checks: dict = {}
    if checks_path is not None and Path(checks_path).exists():
        try:
            text = Path(checks_path).read_text(encoding="utf-8")
            if json_depth(text) > 16:
                raise ValueError("nested more than 16 levels deep")
            checks = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise TraitFileError(checks_path, "(file)", f"not valid JSON ({e})", "fix the JSON syntax") from None
        if not isinstance(checks, dict):
            raise TraitFileError(checks_path, "(top level)", "expected an object", "see README 'Acceptance checks'")
    return TraitSpec(
        name=name or trait_name_for(extract_path),
        instructions=tuple(InstructionPair(p["pos"], p["neg"]) for p in data["instruction"]),
        questions=tuple(data["questions"]),
        eval_questions=eval_questions,
        eval_prompt=data["eval_prompt"],
        source=str(extract_path),
        eval_source=str(eval_path or ""),
        description=description or str(data.get("description", "")),
        checks=checks,
    )


def load_trait_path(path: str | Path) -> TraitSpec:
    """Load a trait from a file (its eval split found beside it) or a ``traits/<name>/`` folder."""
    path = Path(path)
    if path.is_dir():
        ex = path / "extract.json"
        if not ex.exists():
            raise TraitFileError(path, "extract.json", "missing in the trait folder", "add extract.json (and eval.json)")
        ev = path / "eval.json"
        return load_trait_files(ex, ev if ev.exists() else None, checks_path=path / "checks.json")
    ev = _eval_sibling(path)
    checks = path.with_name("checks.json") if path.name == "extract.json" else None
    return load_trait_files(path, ev, checks_path=checks)



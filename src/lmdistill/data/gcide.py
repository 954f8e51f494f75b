"""GCIDE (GNU Collaborative International Dictionary of English) in its dictd form.

The Debian package ``dict-gcide`` ships ``gcide.dict.dz`` (dictzip, which any gzip reader opens) and
``gcide.index`` (lines ``headword<TAB>offset<TAB>length``, numbers in dictd's base64). Each distinct
(offset, length) block is one entry. A few blocks are continuations of the previous entry (the
conversion split an entry at a blank line); they are merged back into that entry.

An entry looks like::

    Affect \\Af*fect"\\, v. t. [imp. & p. p. {Affected}; ...] [L. affectus, ...]
       1. To act upon; to produce an effect or change upon.
          [1913 Webster]

                As might affect the earth with cold heat. --Milton.
          [1913 Webster]

The parser keeps the structure later tasks need (headword, part of speech, numbered definitions,
phrase sub-entries, notes, synonyms) and renders a clean text (headword + definitions), dropping
the source tags (``[1913 Webster]``), pronunciations, etymologies and usage quotations.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmdistill.data.cache import atomic_write_bytes, default_cache_dir, gc_paused
from lmdistill.errors import DataError

log = logging.getLogger(__name__)

GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")
GCIDE_INDEX = Path("/usr/share/dictd/gcide.index")
GCIDE_PACKAGE = "dict-gcide"
# Bump when the parser's output changes, so stale caches are not reused.
PARSER_VERSION = 4

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def decode_dictd_number(text: str) -> int:
    """dictd index numbers: big-endian base 64 with the alphabet A-Z a-z 0-9 + /."""
    value = 0
    for char in text:
        value = value * 64 + _B64[char]
    return value


@dataclass
class GcideEntry:
    headword: str
    pos: str | None
    definitions: list[str]
    variants: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)  # usage/domain labels on the headline: Obs., Zool., ...
    etymology: str | None = None
    phrases: list[tuple[str, str]] = field(default_factory=list)  # ({Apple of discord}, its definition)
    notes: list[str] = field(default_factory=list)
    synonyms: list[str] = field(default_factory=list)
    offset: int = 0  # byte offset of the entry in the uncompressed dictionary (for tracing back)

    def render(self) -> str:
        """Clean text: ``headword, pos`` then one definition a line (numbered when several), then phrases."""
        head = self.headword if not self.pos else f"{self.headword}, {self.pos}"
        lines = [head]
        if len(self.definitions) == 1:
            lines.append(self.definitions[0])
        else:
            lines.extend(f"{i}. {d}" for i, d in enumerate(self.definitions, 1))
        lines.extend(f"{phrase}: {definition}" if definition else phrase for phrase, definition in self.phrases)
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Inline markup
# ---------------------------------------------------------------------------------------------

# Source tags say which edition a paragraph comes from; they are not content.
_SOURCE_TOKEN = (
    r"(?:1913\s+Webster|Webster\s+1913\s+Suppl\.?|Webster\s+1913|WordNet(?:\s+\d\.\d|\s+sense\s+\d+)?|PJC\.?|AS|RDH"
    r"|GG|RP|RHUD|MW10|MI11|Century\s+Dict\.?(?:\s+\d{4})?|wn\d)"
)
_SOURCE_TAG = re.compile(rf"\[\s*\+?\s*{_SOURCE_TOKEN}(?:\s*\+?\s*{_SOURCE_TOKEN})*\s*\]")
_SOURCE_TAG_LINE = re.compile(rf"^[ \t]*{_SOURCE_TAG.pattern}[ \t]*\n?", re.MULTILINE)

_NAMED_CODES = {
    "ae": "ae", "AE": "AE", "oe": "oe", "OE": "OE", "eth": "th", "thorn": "th", "ng": "ng", "th": "th",
    "deg": "°", "sect": "§", "pounds": "£", "root": "√", "yogh": "y", "middot": "·", "times": "×",
    "divby": "÷", "div": "÷", "nbsp": " ", "ldqo": "“", "rdqo": "”", "rarr": "→", "larr": "←", "dagger": "†",
    "ddagger": "‡", "flat": "♭", "sharp": "♯", "natural": "♮", "hand": "☞", "para": "¶", "min": "′",
    "sec": "″", "prime": "′", "bprime": "″", "cre": "ê", "break": "", "add": "a", "asl": "a", "udd": "u",
    "dsdot": "d", "imac": "i", "aum": "a", "eum": "e", "ium": "i", "oum": "o", "uum": "u", "Aum": "A",
    "Oum": "O", "Uum": "U", "cced": "c", "ccedil": "c", "frac12": "1/2", "frac14": "1/4", "frac34": "3/4",
    "frac13": "1/3", "frac23": "2/3", "frac18": "1/8", "frac38": "3/8", "frac58": "5/8", "frac78": "7/8",
    "alpha": "α", "beta": "β", "gamma": "γ", "delta": "δ", "epsilon": "ε", "zeta": "ζ", "eta": "η",
    "theta": "θ", "iota": "ι", "kappa": "κ", "lambda": "λ", "mu": "μ", "nu": "ν", "xi": "ξ", "omicron": "ο",
    "pi": "π", "rho": "ρ", "sigma": "σ", "tau": "τ", "upsilon": "υ", "phi": "φ", "chi": "χ", "psi": "ψ",
    "omega": "ω", "Gamma": "Γ", "Delta": "Δ", "Theta": "Θ", "Lambda": "Λ", "Pi": "Π", "Sigma": "Σ",
    "Phi": "Φ", "Psi": "Ψ", "Omega": "Ω",
}  # fmt: skip
# A letter (or two) with a diacritic mark before it (['e], [=a], [.a], [~n], ["o], [=oo]) or a circumflex
# after it ([i^], [oo^]); never a trailing period, so usage labels such as [R.] stay.
_DIACRITIC = r"[=\-.~^`'\",*]"
_CHAR_CODE = re.compile(
    rf"\[(?:(?P<named>{'|'.join(sorted(_NAMED_CODES, key=len, reverse=True))})"
    rf"|{_DIACRITIC}(?P<pre>[A-Za-z]{{1,2}})|(?P<post>[A-Za-z]{{1,2}})\^)\]"
)
_BRACES = re.compile(r"\{([^{}]*)\}")
_ATTRIBUTION = re.compile(r"\s+--(?=[A-Z])(?:(?!\s--).)*$", re.DOTALL)  # "... a cut. --Shak." at the end


def _char_code(match: re.Match[str]) -> str:
    if match.group("named") is not None:
        return _NAMED_CODES[match.group("named")]
    return match.group("pre") or match.group("post")


def _unbrace(match: re.Match[str]) -> str:
    inner = match.group(1)
    # {Af*fect"ed} is a syllabified form: drop the syllable and accent marks.
    if "*" in inner:
        inner = inner.replace("*", "").replace('"', "").replace("`", "")
    return inner


def resolve_codes(text: str) -> str:
    """Drop source tags and resolve character codes (done once per entry, before the structure is parsed)."""
    if "[" not in text:
        return text
    return _CHAR_CODE.sub(_char_code, _SOURCE_TAG.sub("", text))


def clean_inline(text: str) -> str:
    """Resolve braces and collapse whitespace (character codes are resolved earlier, per entry)."""
    # Braces can nest one level ({Equus {zebra}}): resolve inside out.
    while "{" in text:
        new = _BRACES.sub(_unbrace, text)
        if new == text:
            break
        text = new
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# Entry structure
# ---------------------------------------------------------------------------------------------

# Headword, then its syllabified form between backslashes (the headword may end the first line).
_HEADLINE = re.compile(r"(?P<hw>[^\\\n]+?)[ \t]*\n?[ \t]*\\(?P<syll>[^\\\n]*)\\")
_VARIANT = re.compile(
    r"(?:[ \t]*\([^()\n]*\))?[ \t]*(?:,|\bor\b)\s*(?P<hw>[^\\\n,;()\[\]{}]+?)\s*\\(?P<syll>[^\\\n]*)\\"
    r"|[ \t]+(?P<hw2>[^\\\n,;()\[\]{}]+?)[ \t]*\\(?P<syll2>[^\\\n]*)\\"
)
# Part of speech: abbreviations such as "n.", "v. t.", "a. & n.", "prop. n.", "n. pl.".
_POS = re.compile(r"[ \t]*,?\s*(?P<pos>(?:[a-z]{1,6}\.?)(?:[ \t]*(?:&|or)?[ \t]*[a-z]{1,6}\.)*)(?=[\s,;\[(]|$)")
_POS_WORDS = {
    "n", "v", "a", "adj", "adv", "prep", "conj", "pron", "interj", "t", "i", "p", "pr", "pl", "imp",
    "prop", "suff", "pref", "vb", "sing", "superl", "compar", "obs", "abbr", "inf", "pers", "poss",
    "dem", "rel", "interrog", "auxiliary", "aux", "num", "ord", "art", "def", "indef", "f", "m",
    "masc", "fem", "neut", "sg", "adverb", "noun", "verb", "exclam", "contr", "symb", "pres", "past",
}  # fmt: skip
_LABEL = re.compile(r"\((?P<label>[A-Z][A-Za-z.\s&,]{0,40}\.?)\)")
_SENSE = re.compile(r"(?P<marker>\d{1,2}\.|\([a-z]\))[ \t]+")


def _consume_brackets(text: str, pos: int) -> int | None:
    """If text[pos:] starts with a balanced [...] group, return the index after it."""
    if pos >= len(text) or text[pos] != "[":
        return None
    depth = 0
    for i in range(pos, len(text)):
        if text[i] == "[":
            depth += 1
        elif text[i] == "]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _skip_spaces(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n":
        pos += 1
    return pos


_POS_SPLIT = re.compile(r"[\s&,]+|\bor\b")
_PRON_PARENS = re.compile(r"\s*\([^()]*\)")
_SHORT_LABEL = re.compile(r"(?:[A-Z][a-z]*\.?,?\s*(?:&|or)?\s*){1,4}")
# Inflected forms after the part of speech ("; pl. {Geese}"), possibly continued on lines that start with "{".
_FORMS = re.compile(
    r"(?:[;,]\s*|(?=pl\.\s*\{))(?:pl|imp|p\. p|p\. pr|fem|superl|compar)\.(?:[^\n\[]|\n\s*(?=\{))*"
)
_PHRASE = re.compile(r"((?:\{[^{}]*\}(?:\s*,?\s*or\s*|\s*,\s*)?)+)(.*)", re.DOTALL)
_LEADING_LABEL = re.compile(r"^(\([^()]*\))\s*,")


def _is_pos(candidate: str) -> bool:
    words = [w.rstrip(".") for w in _POS_SPLIT.split(candidate) if w and w.strip()]
    return bool(words) and all(w in _POS_WORDS for w in words)


def parse_entry(raw: str, offset: int = 0) -> GcideEntry | None:
    """Parse one entry's raw text; ``None`` when it has no recognisable headline."""
    raw = resolve_codes(_SOURCE_TAG_LINE.sub("", raw))
    match = _HEADLINE.match(raw)
    if match is None:
        return None
    headword = clean_inline(match.group("hw"))
    if not headword:
        return None
    pos_at = match.end()
    variants: list[str] = []
    while True:
        variant = _VARIANT.match(raw, pos_at)
        if variant is None:
            break
        variants.append(clean_inline(variant.group("hw") or variant.group("hw2")))
        pos_at = variant.end()
    # When the headline broke right after the syllabified form (long headwords), the pronunciation and
    # part of speech continue on the next lines.
    line_end = raw.find("\n", pos_at)
    broken = raw[pos_at : line_end if line_end >= 0 else len(raw)].strip() == ""
    # A pronunciation in parentheses right after the syllabified form: (h[a^]k).
    pron = _PRON_PARENS.match(raw, pos_at)
    if pron is not None and (broken or "\n" not in pron.group(0)) and not _LABEL.fullmatch(pron.group(0).strip()):
        pos_at = pron.end()
    part_of_speech: str | None = None
    pos_match = _POS.match(raw, _skip_spaces(raw, pos_at) if broken else pos_at)
    if pos_match is not None and _is_pos(pos_match.group("pos")):
        part_of_speech = " ".join(pos_match.group("pos").split())
        pos_at = pos_match.end()
        # "n. pl. {Cracksmen}": the trailing "pl." introduces inflected forms, it is not part of the POS.
        if part_of_speech.endswith(" pl.") and raw[_skip_spaces(raw, pos_at) : _skip_spaces(raw, pos_at) + 1] == "{":
            part_of_speech = part_of_speech[: -len(" pl.")]
            pos_at = raw.rindex("pl.", 0, pos_at)

    # After the part of speech: etymologies and labels in brackets, domain labels in parentheses,
    # inflected forms after ";" (e.g. "; pl. {Geese}"), in any order, until the body starts.
    etymology: list[str] = []
    labels: list[str] = []
    while True:
        start = _skip_spaces(raw, pos_at)
        end = _consume_brackets(raw, start)
        if end is not None:
            inner = clean_inline(raw[start + 1 : end - 1])
            if len(inner) <= 30 and _SHORT_LABEL.fullmatch(inner):
                labels.append(inner)
            elif inner:
                etymology.append(inner)
            pos_at = end
            continue
        label = _LABEL.match(raw, start)
        if label is not None:
            labels.append(clean_inline(label.group("label")))
            pos_at = label.end()
            continue
        forms = _FORMS.match(raw, start)
        if forms is not None:
            pos_at = forms.end()
            continue
        if raw.startswith(".", start) and start + 1 < len(raw) and raw[start + 1] in " \t\n":
            pos_at = start + 1  # a stray period between the headline and its label
            continue
        break

    entry = GcideEntry(
        headword=headword,
        pos=part_of_speech,
        definitions=[],
        variants=[v for v in variants if v and v != headword],
        labels=labels,
        etymology=" ".join(etymology) or None,
        offset=offset,
    )
    _parse_body(raw[pos_at:], entry)
    return entry


def _definition(text: str) -> str:
    return clean_inline(_ATTRIBUTION.sub("", text)) if "--" in text else clean_inline(text)


def _parse_body(body: str, entry: GcideEntry) -> None:
    """Classify the body's lines into senses, unnumbered definitions, notes, synonyms, phrase
    sub-entries, quotations and derived forms, then store the cleaned parts in ``entry``."""
    items: list[tuple[str, list[str]]] = []  # (kind, lines)
    current: tuple[str, list[str]] | None = None
    current_indent = 0
    lines = body.split("\n")
    # The rest of the headline line (if any) belongs to the body, as an ordinary indented line.
    if lines and lines[0].strip():
        lines[0] = "   " + lines[0].strip().lstrip(",;. ")
    for line in lines:
        stripped = line.strip()
        if not stripped:
            current = None
            continue
        indent = len(line) - len(line.lstrip(" "))
        first = stripped[0]
        kind: str | None = None
        sense = _SENSE.match(stripped) if (first.isdigit() or first == "(") and indent <= 10 else None
        if sense is not None:
            kind, stripped = "sense", stripped[sense.end() :]
        elif first == "N" and stripped.startswith("Note:"):
            kind, stripped = "note", stripped[5:]
        elif first == "S" and stripped.startswith("Syn:"):
            kind, stripped = "syn", stripped[4:]
        elif first == "-" and stripped.startswith("--") and indent <= 6:
            kind = "derived"
        elif first == "{" and indent <= 4 and current is None:
            kind = "phrase"
        elif current is None:
            kind = "quote" if indent >= 8 else "text"
        elif current[0] in ("sense", "text", "phrase") and indent >= current_indent + 8:
            kind = "quote"  # a quotation that follows its definition without a blank line
        if kind is None:
            current[1].append(stripped)  # type: ignore[index]
            continue
        current = (kind, [stripped])
        current_indent = indent
        items.append(current)

    for kind, item_lines in items:
        text = " ".join(item_lines)
        if kind in ("sense", "text"):
            definition = _definition(text)
            # "2. Of voluntary or personal action:" only introduces its lettered sub-senses.
            if definition and not definition.endswith(":"):
                entry.definitions.append(definition)
        elif kind == "phrase":
            phrase_match = _PHRASE.match(text)
            if phrase_match is None:
                continue
            phrase = clean_inline(phrase_match.group(1)).rstrip(", ")
            definition = _definition(phrase_match.group(2)).lstrip(",;. ")
            definition = _LEADING_LABEL.sub(r"\1", definition)
            if phrase:
                entry.phrases.append((phrase, definition))
        elif kind == "note":
            entry.notes.append(clean_inline(text))
        elif kind == "syn":
            entry.synonyms.append(clean_inline(text))


# ---------------------------------------------------------------------------------------------
# Reading the installed files (with an on-disk cache of the parsed entries)
# ---------------------------------------------------------------------------------------------


def _missing(path: Path) -> DataError:
    return DataError(
        "GCIDE dictionary file not found",
        path=path,
        hint=f"install it with `sudo apt-get install {GCIDE_PACKAGE}` (or run `make corpora`)",
    )


def _read_blocks(dict_path: Path, index_path: Path) -> Iterator[tuple[int, str]]:
    """(offset, text) of each distinct index block, in file order, with continuation blocks merged."""
    spans: set[tuple[int, int]] = set()
    with index_path.open(encoding="utf-8", errors="replace") as handle:
        for line_no, line in enumerate(handle, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                raise DataError("expected 'headword<TAB>offset<TAB>length'", path=index_path, line=line_no)
            if parts[0].startswith("00-"):  # the database's own info pages
                continue
            try:
                spans.add((decode_dictd_number(parts[1]), decode_dictd_number(parts[2])))
            except KeyError as exc:
                raise DataError(f"bad base64 number {exc}", path=index_path, line=line_no) from None
    with gzip.open(dict_path, "rb") as handle:  # dictzip is gzip with an extra header field
        data = handle.read()
    pending: tuple[int, str] | None = None
    for offset, length in sorted(spans):
        block = data[offset : offset + length]
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            # A handful of entries carry stray Windows-1252 bytes (a curly apostrophe, a c-cedilla).
            text = block.decode("cp1252", errors="replace")
        if pending is not None and _HEADLINE.match(_SOURCE_TAG_LINE.sub("", text.lstrip("\n"))) is None:
            pending = (pending[0], pending[1] + "\n\n" + text)
            continue
        if pending is not None:
            yield pending
        pending = (offset, text.lstrip("\n"))
    if pending is not None:
        yield pending


def parse_gcide(dict_path: Path = GCIDE_DICT, index_path: Path = GCIDE_INDEX) -> list[GcideEntry]:
    """Parse every entry of the dictionary (no cache). Entries without a headline are counted and logged."""
    for path in (dict_path, index_path):
        if not path.exists():
            raise _missing(path)
    entries: list[GcideEntry] = []
    skipped = 0
    for offset, raw in _read_blocks(dict_path, index_path):
        entry = parse_entry(raw, offset)
        if entry is None or not (entry.definitions or entry.phrases):
            skipped += 1
            continue
        entries.append(entry)
    if skipped:
        log.info("GCIDE: skipped %d blocks without a headline or any definition", skipped)
    return entries


def _cache_path(dict_path: Path, index_path: Path, cache_dir: Path) -> Path:
    stamp = []
    for path in (dict_path, index_path):
        stat = path.stat()
        stamp.append(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    key = hashlib.sha256(f"v{PARSER_VERSION}|{'|'.join(stamp)}".encode()).hexdigest()[:16]
    return cache_dir / "corpora" / f"gcide-{key}.json.gz"


def load_gcide_entries(
    dict_path: Path = GCIDE_DICT,
    index_path: Path = GCIDE_INDEX,
    cache_dir: Path | None = None,
    use_cache: bool = True,
) -> list[GcideEntry]:
    """Parsed entries, from the cache when the dictionary files and the parser are unchanged."""
    for path in (dict_path, index_path):
        if not path.exists():
            raise _missing(path)
    with gc_paused():
        return _load_gcide_entries(dict_path, index_path, cache_dir, use_cache)


def _load_gcide_entries(
    dict_path: Path, index_path: Path, cache_dir: Path | None, use_cache: bool
) -> list[GcideEntry]:
    cache_file = _cache_path(dict_path, index_path, cache_dir or default_cache_dir()) if use_cache else None
    if cache_file is not None and cache_file.exists():
        try:
            with gzip.open(cache_file, "rt", encoding="utf-8") as handle:
                rows = json.load(handle)
            return [
                GcideEntry(**{**row, "phrases": [tuple(p) for p in row["phrases"]]})  # type: ignore[arg-type]
                for row in rows
            ]
        except (OSError, ValueError, TypeError, KeyError):
            log.warning("GCIDE cache %s is unreadable; parsing again", cache_file)
    entries = parse_gcide(dict_path, index_path)
    if cache_file is not None:
        payload = json.dumps([asdict(e) for e in entries], ensure_ascii=False).encode("utf-8")
        atomic_write_bytes(cache_file, gzip.compress(payload, compresslevel=1))
    return entries

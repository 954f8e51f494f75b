"""User data files: ``.txt``, ``.jsonl``, ``.parquet``, ``.csv`` (a file or a directory of them).

Record formats
--------------
- ``.txt``: UTF-8 text. ``mode="paragraph"`` (default) makes one document per block of lines separated
  by blank lines (so a single book-length file still gets train/validation/test parts);
  ``mode="file"`` makes the whole file one document.
- ``.jsonl``: one JSON object per line with either ``"text"`` (plain document), ``"prompt"`` and
  ``"response"`` (instruction document; only the response is trained on), or chat ``"messages"`` (a list of
  ``{"role", "content"}``; the last one, the assistant's, is the response, the ones before it the prompt,
  rendered by :func:`render_chat`). An optional ``"id"`` (string or integer) gives a stable document id;
  other fields go to ``Document.meta``.
- ``.parquet`` / ``.csv``: read with the ``datasets`` library (offline); the same columns as jsonl.

Errors and skips
----------------
Bad input raises :class:`~lmdistill.errors.DataError` naming the file, the line (or row) and the
field: malformed JSON, a missing field, a field of the wrong type, an empty file, bytes that are not
UTF-8 (with line and byte offset). Records that are well-formed but unusable (empty text, empty
response) are skipped, counted and logged with their line numbers; nothing is dropped silently.

Document ids are ``<file name>:<line>`` (jsonl, txt paragraphs: the paragraph's first line),
``<file name>:row<k>`` (csv, parquet; k counts data rows from 1), ``<file name>:<id>`` when an ``id`` field exists, or the file
name (txt in file mode). Inside a directory the file name is the path relative to it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from lmdistill.data.documents import Document
from lmdistill.errors import DataError

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet", ".csv")
TxtMode = Literal["paragraph", "file"]
_RESERVED = ("text", "prompt", "response", "messages", "id")
CHAT_ROLES = ("system", "user", "assistant", "tool")


def render_chat(messages: list[dict[str, str]]) -> str:
    """The documented default chat template, for tokenizers without one: each message as ``<|role|>`` on its
    own line followed by its content and a newline, then ``<|assistant|>`` and a newline (the generation prompt).
    A tokenizer's own template can replace it (``task.chat_template: tokenizer``)."""
    return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"


def _chat_pair(record: dict[str, Any], path: Path, line: int | None, prefix: str) -> tuple[str, str, list]:
    """(prompt, response, messages) of a chat record: the last message is the assistant's response, the ones
    before it the prompt (rendered with :func:`render_chat`)."""
    messages = record["messages"]
    if not isinstance(messages, list) or len(messages) < 2:
        raise DataError(f"{prefix}'messages' must be a list of at least two messages (the last one the assistant's)",
                        path=path, line=line, field="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or message.get("role") not in CHAT_ROLES:
            raise DataError(f"{prefix}messages[{i}] must be {{\"role\": one of {', '.join(CHAT_ROLES)}, \"content\": a string}}",
                            path=path, line=line, field="messages")
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{prefix}the last message must be the assistant's (the response to learn), got "
                        f"{messages[-1]['role']!r}", path=path, line=line, field="messages")
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return render_chat(clean[:-1]), clean[-1]["content"], clean


class _SkipLog:
    """Counts records skipped for a reason, and logs one line per (file, reason) with example lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reasons: dict[str, list[str]] = {}

    def skip(self, reason: str, where: str) -> None:
        self.reasons.setdefault(reason, []).append(where)

    def report(self) -> int:
        total = 0
        for reason, wheres in self.reasons.items():
            total += len(wheres)
            examples = ", ".join(wheres[:5]) + (", ..." if len(wheres) > 5 else "")
            log.warning("%s: skipped %d record(s) with %s (%s)", self.path, len(wheres), reason, examples)
        return total


def decode_utf8(data: bytes, path: Path) -> str:
    """Decode UTF-8 (a leading BOM is dropped); on failure say which line and byte offset is bad."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"not valid UTF-8: byte 0x{data[exc.start]:02x} at byte offset {exc.start} (column {column})",
            path=path,
            line=line,
            hint="re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`",
        ) from None
    return text.removeprefix("\ufeff")


def _read_text_file(path: Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise DataError("the file is empty", path=path, hint="remove it or add data")
    return decode_utf8(data, path)


def read_txt(path: Path, mode: TxtMode = "paragraph", name: str | None = None) -> list[Document]:
    """Documents of a UTF-8 text file: one per blank-line-separated paragraph, or one for the file."""
    if mode not in ("paragraph", "file"):
        raise DataError(f"unknown txt mode {mode!r}", path=path, hint="use 'paragraph' or 'file'")
    name = name or path.name
    text = _read_text_file(path).replace("\r\n", "\n").replace("\r", "\n")
    if mode == "file":
        return [Document(text=text.strip("\n"), doc_id=name, source=name, meta={"path": str(path)})]
    docs: list[Document] = []
    block: list[str] = []
    start = 0
    for line_no, line in enumerate(text.split("\n") + [""], 1):
        if line.strip():
            if not block:
                start = line_no
            block.append(line.rstrip())
        elif block:
            meta = {"path": str(path), "line": start}
            docs.append(Document(text="\n".join(block), doc_id=f"{name}:{start}", source=name, meta=meta))
            block = []
    return docs


def _check_str(value: Any, path: Path, field: str, line: int | None, where: str = "") -> str:
    if not isinstance(value, str):
        shown = repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise DataError(
            f"{where}expected a string, got {type(value).__name__} {shown}", path=path, line=line, field=field
        )
    return value


def _record_to_document(
    record: dict[str, Any], path: Path, name: str, line: int | None, where: str, skips: _SkipLog, key: str
) -> Document | None:
    """Validate one jsonl/csv/parquet record. ``line`` is the jsonl line (None for table rows, whose
    position is in ``where``, e.g. "row 3")."""
    prefix = "" if line is not None else f"{where}: "
    if line is None and "text" in record and ("prompt" in record or "response" in record):
        # A table with both kinds of columns: each row uses the cells it fills (empty cells are null).
        pair_keys = ("prompt", "response")
        if record["text"] is not None and all(record.get(k) is None for k in pair_keys):
            record = {k: v for k, v in record.items() if k not in pair_keys}
        elif record["text"] is None:
            record = {k: v for k, v in record.items() if k != "text"}
    if "messages" in record:
        if any(k in record for k in ("text", "prompt", "response")):
            raise DataError(f"{prefix}has 'messages' and also 'text'/'prompt'/'response'", path=path, line=line,
                            field="messages", hint="give one form per record")
        prompt, response, messages = _chat_pair(record, path, line, prefix)
        doc_key = str(record["id"]) if record.get("id") is not None else key
        meta = {k: v for k, v in record.items() if k not in _RESERVED}
        meta.update(path=str(path), messages=messages, **({"line": line} if line is not None else {}))
        if not response.strip():
            skips.skip("empty response", where)
            return None
        return Document.from_prompt_response(prompt, response, doc_id=f"{name}:{doc_key}", source=name, meta=meta)
    has_text = "text" in record
    has_pair = "prompt" in record or "response" in record
    if has_text and has_pair:
        raise DataError(
            f"{prefix}has both 'text' and 'prompt'/'response'",
            path=path,
            line=line,
            field="text",
            hint="give either text, or prompt and response",
        )
    if not has_text and not has_pair:
        raise DataError(
            f"{prefix}missing field 'text' (or 'prompt' and 'response', or chat 'messages')",
            path=path,
            line=line,
            field="text",
            hint=f"fields present: {', '.join(sorted(record)) or 'none'}",
        )
    if has_pair:
        for required in ("prompt", "response"):
            if required not in record:
                raise DataError(f"{prefix}missing field '{required}'", path=path, line=line, field=required)
    doc_key = key
    if record.get("id") is not None:
        raw_id = record["id"]
        if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
            raise DataError(f"{prefix}'id' must be a string or an integer", path=path, line=line, field="id")
        doc_key = str(raw_id)
    meta = {k: v for k, v in record.items() if k not in _RESERVED}
    meta["path"] = str(path)
    if line is not None:
        meta["line"] = line
    doc_id = f"{name}:{doc_key}"
    if has_text:
        if line is None and record["text"] is None:  # a blank csv cell / parquet null
            skips.skip("missing text", where)
            return None
        text = _check_str(record["text"], path, "text", line, prefix)
        if not text.strip():
            skips.skip("empty text", where)
            return None
        return Document(text=text, doc_id=doc_id, source=name, meta=meta)
    if line is None and record["prompt"] is None:  # a blank csv cell / parquet null: no prompt
        record = {**record, "prompt": ""}
    if line is None and record["response"] is None:  # a blank csv cell / parquet null
        skips.skip("missing response", where)
        return None
    prompt = _check_str(record["prompt"], path, "prompt", line, prefix)
    response = _check_str(record["response"], path, "response", line, prefix)
    if not response.strip():
        skips.skip("empty response", where)
        return None
    return Document.from_prompt_response(prompt, response, doc_id=doc_id, source=name, meta=meta)


def read_jsonl(path: Path, name: str | None = None) -> list[Document]:
    """Documents of a JSON-lines file (blank lines are allowed and ignored)."""
    name = name or path.name
    text = _read_text_file(path)
    skips = _SkipLog(path)
    docs: list[Document] = []
    seen_ids: dict[str, int] = {}
    for line_no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"malformed JSON at column {exc.colno}: {exc.msg}",
                path=path,
                line=line_no,
                hint="each line must be one JSON object",
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"expected a JSON object, got {type(record).__name__}",
                path=path,
                line=line_no,
                hint='each line must look like {"text": "..."} or {"prompt": "...", "response": "..."}',
            )
        doc = _record_to_document(record, path, name, line_no, str(line_no), skips, key=str(line_no))
        if doc is not None:
            _check_unique(doc, seen_ids, path, line_no)
            docs.append(doc)
    skips.report()
    return docs


def _check_unique(doc: Document, seen: dict[str, int], path: Path, line: int | None, where: str = "") -> None:
    if doc.doc_id in seen:
        raise DataError(
            f"{where}duplicate id {doc.doc_id.split(':', 1)[1]!r} (first at {seen[doc.doc_id]})",
            path=path,
            line=line,
            field="id",
            hint="ids must be unique within a file",
        )
    seen[doc.doc_id] = line if line is not None else 0


def read_table(path: Path, name: str | None = None) -> list[Document]:
    """Documents of a ``.parquet`` or ``.csv`` file, read with ``datasets`` (no network)."""
    import datasets  # heavy import: only when a table is read

    name = name or path.name
    if path.stat().st_size == 0:
        raise DataError("the file is empty", path=path, hint="remove it or add data")
    if path.suffix == ".csv":
        decode_utf8(path.read_bytes(), path)  # a precise line/offset for encoding errors
    datasets.disable_progress_bars()
    try:
        with tempfile.TemporaryDirectory(prefix="lmdistill-datasets-") as cache_dir:
            if path.suffix == ".parquet":
                table = datasets.Dataset.from_parquet(str(path), cache_dir=cache_dir, keep_in_memory=True)
            else:
                table = datasets.Dataset.from_csv(str(path), cache_dir=cache_dir, keep_in_memory=True)
            columns = {column: table[column] for column in table.column_names}
            features = {column: str(getattr(f, "dtype", f)) for column, f in table.features.items()}
    except DataError:
        raise
    except Exception as exc:  # datasets/pyarrow raise many types for unreadable files
        raise DataError(f"cannot read the table: {type(exc).__name__}: {exc}", path=path) from None
    finally:
        datasets.enable_progress_bars()
    if not columns or not next(iter(columns.values()), []):
        raise DataError("the table has no rows", path=path)
    for field in ("text", "prompt", "response"):
        if field in features and "string" not in features[field]:
            raise DataError(
                f"column '{field}' has type {features[field]}, expected strings",
                path=path,
                field=field,
                hint="quote the values or convert the column to text",
            )
    n_rows = len(next(iter(columns.values())))
    skips = _SkipLog(path)
    docs: list[Document] = []
    seen: dict[str, int] = {}
    for row in range(n_rows):
        record = {column: values[row] for column, values in columns.items()}
        where = f"row {row + 1}"
        doc = _record_to_document(record, path, name, None, where, skips, key=f"row{row + 1}")
        if doc is not None:
            _check_unique(doc, seen, path, None, f"{where}: ")
            docs.append(doc)
    skips.report()
    return docs


def read_file(path: Path, *, txt_mode: TxtMode = "paragraph", name: str | None = None) -> list[Document]:
    """Documents of one user file, by its suffix."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return read_txt(path, txt_mode, name)
    if suffix == ".jsonl":
        return read_jsonl(path, name)
    if suffix in (".parquet", ".csv"):
        return read_table(path, name)
    raise DataError(
        f"unsupported file type '{path.suffix or '(none)'}'",
        path=path,
        hint=f"use one of {', '.join(SUPPORTED_SUFFIXES)}",
    )


def read_path(path: Path, *, txt_mode: TxtMode = "paragraph") -> list[Document]:
    """Documents of a user file, or of every supported file under a directory (sorted, recursive;
    other files are listed in the log)."""
    path = Path(path)
    if not path.exists():
        raise DataError("no such file or directory", path=path)
    if path.is_file():
        docs = read_file(path, txt_mode=txt_mode)
        if not docs:
            raise DataError("no usable records (see the skipped counts in the log)", path=path)
        return docs
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    supported = [p for p in files if p.suffix.lower() in SUPPORTED_SUFFIXES]
    ignored = [p for p in files if p.suffix.lower() not in SUPPORTED_SUFFIXES]
    if ignored:
        log.warning(
            "%s: ignored %d file(s) of unsupported types (%s)",
            path,
            len(ignored),
            ", ".join(str(p.relative_to(path)) for p in ignored[:5]) + (", ..." if len(ignored) > 5 else ""),
        )
    if not supported:
        raise DataError(
            "the directory holds no data files", path=path, hint=f"expected {', '.join(SUPPORTED_SUFFIXES)} files"
        )
    docs: list[Document] = []
    for file in supported:
        docs.extend(read_file(file, txt_mode=txt_mode, name=file.relative_to(path).as_posix()))
    if not docs:
        raise DataError("no usable records in any file (see the skipped counts in the log)", path=path)
    return docs


def read_documents(paths: Iterable[Path] | Sequence[Path], *, txt_mode: TxtMode = "paragraph") -> list[Document]:
    """Documents of several files or directories, in order."""
    docs: list[Document] = []
    for path in paths:
        docs.extend(read_path(Path(path), txt_mode=txt_mode))
    return docs

"""User files: formats, document ids, and errors that name file, line and field."""

from __future__ import annotations

import json
import re
import logging
from pathlib import Path

import pytest

from lmdistill.data.corpora import load_documents
from lmdistill.data.userfiles import read_jsonl, read_path, read_table, read_txt
from lmdistill.errors import DataError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------- txt


def test_txt_paragraph_mode(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes("First para\nline two\n\n\n  \nSecond para\r\n\r\nThird é\n".encode())
    docs = read_txt(path)
    assert [d.text for d in docs] == ["First para\nline two", "Second para", "Third é"]
    assert [d.doc_id for d in docs] == ["book.txt:1", "book.txt:6", "book.txt:8"]
    assert [d.meta["line"] for d in docs] == [1, 6, 8]
    assert all(d.prompt is None and d.source == "book.txt" for d in docs)


def test_txt_file_mode_and_bom(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_bytes("\ufeffWhole file\n\nstays one.\n".encode())
    (doc,) = read_txt(path, mode="file")
    assert doc.text == "Whole file\n\nstays one." and doc.doc_id == "doc.txt"
    assert [d.text for d in load_documents(path, txt_mode="file")] == ["Whole file\n\nstays one."]


@pytest.mark.parametrize("content", [b"", b"  \n\n \t\n"])
def test_empty_txt_is_an_error(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"empty\.txt: the file is empty"):
        read_txt(path)


def test_non_utf8_names_line_and_byte_offset(tmp_path):
    path = tmp_path / "latin.txt"
    data = "good line\nsecond caf".encode() + b"\xe9" + b" au lait\n"
    path.write_bytes(data)
    with pytest.raises(DataError) as info:
        read_txt(path)
    message = str(info.value)
    offset = data.index(b"\xe9")
    assert f"{path}:2" in message and f"byte offset {offset}" in message and "0xe9" in message
    assert "column 11" in message and "iconv" in message
    assert info.value.line == 2


# ----------------------------------------------------------------------------------------- jsonl


def test_jsonl_text_and_prompt_response(tmp_path):
    path = write_jsonl(
        tmp_path / "mix.jsonl",
        [
            {"text": "plain one", "domain": "news"},
            "",
            {"prompt": "Q: 2+2?\nA:", "response": " 4", "id": "q7"},
            {"prompt": "", "response": "no prompt"},
        ],
    )
    docs = read_jsonl(path)
    assert [d.doc_id for d in docs] == ["mix.jsonl:1", "mix.jsonl:q7", "mix.jsonl:4"]
    assert docs[0].text == "plain one" and docs[0].meta["domain"] == "news" and docs[0].prompt is None
    assert docs[1].prompt == "Q: 2+2?\nA:" and docs[1].response == " 4" and docs[1].text == "Q: 2+2?\nA: 4"
    assert docs[2].prompt == "" and docs[2].text == "no prompt"


def test_jsonl_malformed_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, '{"text": "unterminated'])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: malformed JSON at column \d+") as info:
        read_jsonl(path)
    assert info.value.line == 2


def test_jsonl_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", [{"text": "ok"}, {"text": "ok"}, '["a", "b"]'])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: expected a JSON object, got list"):
        read_jsonl(path)


def test_jsonl_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "missing.jsonl", [{"text": "ok"}, {"body": "wrong key"}])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2, field 'text': missing field 'text'.*fields present: body"):
        read_jsonl(path)
    path = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "only a prompt"}])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:1, field 'response': missing field 'response'"):
        read_jsonl(path)


@pytest.mark.parametrize(
    ("record", "field", "kind"),
    [({"text": 42}, "text", "int"), ({"text": None}, "text", "NoneType"), ({"prompt": ["a"], "response": "b"}, "prompt", "list"),
     ({"prompt": "a", "response": {"x": 1}}, "response", "dict")],
)
def test_jsonl_wrong_type(tmp_path, record, field, kind):
    path = write_jsonl(tmp_path / "types.jsonl", [{"text": "fine"}, {"text": "fine"}, record])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3, field '{field}': expected a string, got {kind}"):
        read_jsonl(path)


def test_jsonl_both_kinds_in_one_record(tmp_path):
    path = write_jsonl(tmp_path / "both.jsonl", [{"text": "a", "prompt": "b", "response": "c"}])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:1, field 'text': has both"):
        read_jsonl(path)


def test_jsonl_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"text": "a", "id": 5}, {"text": "b", "id": "5"}])
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2, field 'id': duplicate id '5'"):
        read_jsonl(path)


def test_jsonl_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        read_jsonl(path)


def test_jsonl_non_utf8(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:2: not valid UTF-8: byte 0xe9 at byte offset 28"):
        read_jsonl(path)


def test_skipped_records_are_counted_and_logged(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "skips.jsonl",
        [{"text": "kept"}, {"text": "   "}, {"text": ""}, {"prompt": "p", "response": ""}, {"text": "kept too"}],
    )
    with caplog.at_level(logging.WARNING, logger="lmdistill.data.userfiles"):
        docs = read_jsonl(path)
    assert [d.text for d in docs] == ["kept", "kept too"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("skipped 2 record(s) with empty text (2, 3)" in m and str(path) in m for m in messages)
    assert any("skipped 1 record(s) with empty response (4)" in m for m in messages)


def test_all_records_skipped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "nothing.jsonl", [{"text": ""}, {"text": " "}])
    with pytest.raises(DataError, match="no usable records"):
        read_path(path)


# ----------------------------------------------------------------------------------- csv/parquet


def test_csv_records_and_skips(tmp_path, caplog):
    path = tmp_path / "data.csv"
    path.write_text('text,topic\nhello there,a\n,b\n"multi\nline",c\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lmdistill.data.userfiles"):
        docs = read_table(path)
    assert [d.text for d in docs] == ["hello there", "multi\nline"]
    assert [d.doc_id for d in docs] == ["data.csv:row1", "data.csv:row3"]
    assert docs[0].meta["topic"] == "a"
    assert any("skipped 1 record(s) with missing text (row 2)" in r.getMessage() for r in caplog.records)


def test_csv_with_both_kinds_of_columns(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text('text,prompt,response\nplain row,,\n,Q:, A\n,,\nboth,Q:, A\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, field 'text': row 4: has both"):
        read_table(path)
    path.write_text('text,prompt,response\nplain row,,\n,Q:, A\n', encoding="utf-8")
    docs = read_table(path)
    assert [(d.text, d.prompt) for d in docs] == [("plain row", None), ("Q: A", "Q:")]


def test_csv_missing_column(tmp_path):
    path = tmp_path / "cols.csv"
    path.write_text("body\nhello\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, field 'text': row 1: missing field 'text'.*fields present: body"):
        read_table(path)


def test_csv_wrong_type(tmp_path):
    path = tmp_path / "numbers.csv"
    path.write_text("text\n1\n2\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, field 'text': column 'text' has type int64, expected strings"):
        read_table(path)


def test_csv_non_utf8(tmp_path):
    path = tmp_path / "enc.csv"
    path.write_bytes(b"text\nok\nna\xefve\n")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}:3: not valid UTF-8: byte 0xef at byte offset 10 \(column 3\)"):
        read_table(path)


def test_csv_empty_file(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.csv: the file is empty"):
        read_table(path)


def test_parquet_prompt_response_and_nulls(tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    table = pa.table({"prompt": ["Say hi:", None, "Skip:"], "response": [" hi", "no prompt", None], "id": [10, 11, 12]})
    pq.write_table(table, path)
    with caplog.at_level(logging.WARNING, logger="lmdistill.data.userfiles"):
        docs = read_table(path)
    assert [(d.prompt, d.response, d.doc_id) for d in docs] == [
        ("Say hi:", " hi", "pairs.parquet:10"),
        ("", "no prompt", "pairs.parquet:11"),
    ]
    assert any("skipped 1 record(s) with missing response (row 3)" in r.getMessage() for r in caplog.records)


def test_parquet_wrong_type(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "typed.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "response": [1.5]}), path)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}, field 'response': column 'response' has type float64"):
        read_table(path)


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: cannot read the table"):
        read_table(path)


# ------------------------------------------------------------------------------------ directories


def test_directory_of_files(tmp_path, caplog):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("para one\n\npara two\n", encoding="utf-8")
    write_jsonl(tmp_path / "sub" / "a.jsonl", [{"text": "from jsonl"}])
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("hidden", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lmdistill.data.userfiles"):
        docs = read_path(tmp_path)
    assert [d.doc_id for d in docs] == ["b.txt:1", "b.txt:3", "sub/a.jsonl:1"]
    assert any("ignored 1 file(s) of unsupported types (notes.md)" in r.getMessage() for r in caplog.records)


def test_directory_without_data(tmp_path):
    (tmp_path / "readme.md").write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="holds no data files"):
        read_path(tmp_path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<a/>", encoding="utf-8")
    with pytest.raises(DataError, match=r"unsupported file type '\.xml'.*\.txt, \.jsonl, \.parquet, \.csv"):
        read_path(path)

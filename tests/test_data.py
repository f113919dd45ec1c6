"""Reading and validating records: every problem names the file, the line and (where there is one) the field."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest

from lmtune.data import Dataset, Template, load_builtin, open_data, read_records, write_jsonl
from lmtune.errors import DataError, LmtuneError


def write(path, text: str, encoding="utf-8"):
    path.write_bytes(text.encode(encoding))
    return path


# -- JSONL --------------------------------------------------------------------------------------------


def test_jsonl_records_and_line_numbers_skip_blank_lines(tmp_path):
    p = write(tmp_path / "d.jsonl", '\n{"text": "a", "label": 1}\n\n   \n{"text": "b", "label": 0}\r\n{"text": "c"}\n')
    ds = read_records(p)
    assert [r["text"] for r in ds] == ["a", "b", "c"]
    assert ds.lines == [2, 5, 6]
    assert ds.path == str(p)
    assert ds.where(1) == (str(p), 5)


def test_jsonl_unicode_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    # JSON allows U+2028 unescaped in strings; splitting lines like str.splitlines would break the record.
    p = write(tmp_path / "d.jsonl", '{"text": "one\u2028two"}\n{"text": "three"}\n')
    ds = read_records(p)
    assert ds[0]["text"] == "one\u2028two"
    assert ds.lines == [1, 2]


def test_jsonl_byte_order_mark_is_ignored(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n')
    assert read_records(p)[0] == {"text": "a"}


def test_malformed_json_line_names_file_and_line(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"text": "b",}\n{"text": "c"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:3: not valid JSON") as e:
        read_records(p)
    assert (e.value.path, e.value.line) == (str(p), 3)


@pytest.mark.parametrize("line, kind", [('["a", "b"]', "list"), ('"just text"', "str"), ("42", "int"),
                                        ("null", "NoneType")])
def test_json_line_that_is_not_an_object(tmp_path, line, kind):
    p = write(tmp_path / "d.jsonl", '{"text": "a"}\n' + line + "\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:2: expected a JSON object, got {kind}$"):
        read_records(p)


def test_non_utf8_file_names_the_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:2: not UTF-8 text \(byte 0xe9\)"):
        read_records(p)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_jsonl_has_no_records(tmp_path, content):
    p = write(tmp_path / "empty.jsonl", content)
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}: the file has no records$"):
        read_records(p)


# -- CSV / TSV ----------------------------------------------------------------------------------------


def test_csv_line_numbers_with_a_quoted_multiline_field_and_blank_lines(tmp_path):
    p = write(tmp_path / "d.csv", 'text,label\n"first\nspans\nthree lines",1\n\nsecond,0\n"x, y",1\n')
    ds = read_records(p)
    assert ds.records == [{"text": "first\nspans\nthree lines", "label": "1"}, {"text": "second", "label": "0"},
                          {"text": "x, y", "label": "1"}]
    assert ds.lines == [2, 6, 7]


def test_csv_header_after_leading_blank_lines(tmp_path):
    p = write(tmp_path / "d.csv", "\n\ntext,label\na,1\nb\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:5: expected 2 columns \(text, label\), found 1$"):
        read_records(p)
    p = write(tmp_path / "ok.csv", "\n\ntext,label\na,1\n")
    ds = read_records(p)
    assert ds.records == [{"text": "a", "label": "1"}] and ds.lines == [4]


def test_tsv_reads_tabs_and_strips_header_names(tmp_path):
    p = write(tmp_path / "d.tsv", " text \tlabel\nhello, world\tpositive\n")
    ds = read_records(p)
    assert ds.records == [{"text": "hello, world", "label": "positive"}]


def test_csv_row_with_wrong_column_count_names_its_line(tmp_path):
    p = write(tmp_path / "d.csv", 'text,label\n"a\nb",1\nc,0,extra\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:4: expected 2 columns \(text, label\), found 3$"):
        read_records(p)


def test_csv_unclosed_quote_is_an_error_at_the_record_not_a_swallowed_file(tmp_path):
    # With a single column, a lenient reader would silently read the rest of the file as one record.
    p = write(tmp_path / "d.csv", 'text\nfine\n"never closed\nsecond\nthird\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:3: not valid CSV"):
        read_records(p)


def test_csv_text_after_closing_quote_is_an_error(tmp_path):
    p = write(tmp_path / "d.tsv", 'text\tlabel\n"Great" product\t1\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:2: not valid TSV"):
        read_records(p)


@pytest.mark.parametrize("header", ["text,text", "text,,label", "text, text "])
def test_csv_header_must_name_each_column_once(tmp_path, header):
    p = write(tmp_path / "d.csv", header + "\na,b,c\n")
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:1: the header row must name every column once"):
        read_records(p)


@pytest.mark.parametrize("content", ["", "text,label\n", "text,label\n\n,\n"])
def test_empty_or_header_only_csv_has_no_records(tmp_path, content):
    p = write(tmp_path / "d.csv", content)
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}: the file has no records$"):
        read_records(p)


# -- files --------------------------------------------------------------------------------------------


def test_unknown_extension(tmp_path):
    p = write(tmp_path / "d.txt", '{"text": "a"}\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}: unknown file type '.txt'"):
        read_records(p)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path / 'nope.jsonl'))}: file not found$"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match=r"dir.jsonl: not a file$"):
        read_records(tmp_path / "dir.jsonl")


def test_data_error_is_also_a_value_error_and_carries_its_location():
    e = DataError("bad", "f.csv", 7, "text")
    assert isinstance(e, LmtuneError) and isinstance(e, ValueError)
    assert str(e) == "f.csv:7, field 'text': bad"
    assert (e.path, e.line, e.field, e.reason) == ("f.csv", 7, "text", "bad")
    assert str(DataError("bad")) == "bad"


def test_from_records_rejects_non_mappings_and_empty_input():
    with pytest.raises(DataError, match=r"^<memory>:2: expected a mapping of field names to values, got str"):
        Dataset.from_records([{"text": "a"}, "text"])
    with pytest.raises(DataError, match=r"^<memory>:1: expected a mapping .* got list"):
        Dataset.from_records([[("text", "a")]])
    with pytest.raises(DataError, match="no records"):
        Dataset.from_records([])
    ds = Dataset.from_records(({"a": i} for i in range(3)), name="gen")
    assert ds.lines == [1, 2, 3] and ds.path == "gen"


# -- content hash -------------------------------------------------------------------------------------


def test_content_hash_equal_across_formats_and_sensitive_to_change(tmp_path):
    recs = [{"text": "good, really", "label": "1"}, {"text": "bad", "label": "0"}]
    j = tmp_path / "d.jsonl"
    j.write_text("".join(json.dumps(r) + "\n" for r in recs))
    c = write(tmp_path / "d.csv", 'label,text\n1,"good, really"\n\n0,bad\n')
    hj, hc = read_records(j).content_hash(), read_records(c).content_hash()
    assert hj == hc == Dataset.from_records(recs).content_hash()
    changed = [recs[0], {"text": "bad!", "label": "0"}]
    assert Dataset.from_records(changed).content_hash() != hj
    assert Dataset.from_records(recs[::-1]).content_hash() != hj  # order is part of the data


# -- built-in data ------------------------------------------------------------------------------------


def test_builtin_reviews_splits():
    full = load_builtin("reviews")
    train, test = load_builtin("reviews", "train"), open_data("builtin:reviews:test")
    assert (len(full), len(train), len(test)) == (640, 440, 200)
    for ds, n in ((train, 220), (test, 100)):
        labels = [r["label"] for r in ds]
        assert labels.count("positive") == labels.count("negative") == n
    assert {r["split"] for r in test} == {"test"}
    assert test.path == "builtin:reviews"
    # lines still point into the embedded file
    assert test.lines[0] == next(i + 1 for i, r in enumerate(full) if r["split"] == "test")
    assert len(open_data("builtin:reviews")) == 640


@pytest.mark.parametrize("spec, msg", [("builtin:nope", "unknown built-in dataset 'nope'"),
                                       ("builtin:reviews:dev", "has no split 'dev'"),
                                       ("builtin:reviews:test:x", "expected builtin:NAME or builtin:NAME:SPLIT")])
def test_builtin_errors(spec, msg):
    with pytest.raises(LmtuneError, match=msg):
        open_data(spec)


# -- templates ----------------------------------------------------------------------------------------


def test_template_fields_in_order_of_first_appearance():
    t = Template("Q: {question}\nContext: {text} ({question}) {{not a field}} {extra}")
    assert t.fields == ("question", "text", "extra")
    assert t.render({"question": "q", "text": "t", "extra": "e"}) == "Q: q\nContext: t (q) {not a field} e"


@pytest.mark.parametrize("text", ["{a.b}", "{0}", "{}", "{x!r}", "{x:>10}", "{a[0]}", "no placeholders {{x}}",
                                  "unbalanced {x", "stray } brace"])
def test_template_rejects(text):
    with pytest.raises(LmtuneError):
        Template(text)


def test_template_missing_or_empty_field_names_file_line_and_field():
    t = Template("{title}: {text}")
    where = ("reviews.csv", 12)
    for rec in ({"title": "x"}, {"title": "x", "text": None}, {"title": "x", "text": "   "}):
        with pytest.raises(DataError, match=r"^reviews.csv:12, field 'text': missing or empty") as e:
            t.values(rec, where)
        assert (e.value.path, e.value.line, e.value.field) == ("reviews.csv", 12, "text")
    assert t.values({"title": 3, "text": "ok", "other": None}) == {"title": "3", "text": "ok"}


# -- writing ------------------------------------------------------------------------------------------


def test_write_jsonl_is_atomic_and_gets_ordinary_permissions(tmp_path):
    out = tmp_path / "sub" / "pred.jsonl"
    write_jsonl(out, [{"a": 1}, {"b": "é"}])
    assert out.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask

    def rows():
        yield {"a": 2}
        raise DataError("bad record", "x.jsonl", 3)

    with pytest.raises(DataError):
        write_jsonl(out, rows())
    assert out.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'  # the old file is untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["pred.jsonl"]  # and no temporary file is left
    with pytest.raises(LmtuneError, match="is a folder"):
        write_jsonl(tmp_path, [{"a": 1}])

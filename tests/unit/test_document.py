"""netlab's bounded document reader: every bad document is one DocumentError."""

import pytest

from testbed.netlab.document import DocumentError, load_document


def test_reads_yaml_and_json() -> None:
    assert load_document(b"a: [1, 2]\n") == {"a": [1, 2]}
    assert load_document('{"a": 1}', as_json=True) == {"a": 1}
    assert load_document(b"") is None


@pytest.mark.parametrize(
    ("text", "as_json", "message"),
    [
        (b"\xc3\x28", False, "not UTF-8 text (byte 0)"),
        (b"a: [\n", False, "not valid YAML: while parsing"),
        (b"[" * 5000 + b"]" * 5000, True, "not valid JSON: nested too deeply"),
        (b"a: &a [1, 2]\nb: &b [*a, *a]\nc: [*b, *b, *b]\n", False, "more than 10 values"),
    ],
)
def test_bad_documents_are_one_line_errors(text: bytes, as_json: bool, message: str) -> None:
    with pytest.raises(DocumentError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_document(text, as_json=as_json, max_values=10)
    assert "\n" not in str(e.value)


def test_aliases_count_once_per_use() -> None:
    text = b"a: &a [1, 2, 3]\nb: [*a, *a]\n"  # root, 2 keys, 4 lists, 9 scalars: 16
    assert load_document(text, max_values=16) == {"a": [1, 2, 3], "b": [[1, 2, 3], [1, 2, 3]]}
    with pytest.raises(DocumentError):
        load_document(text, max_values=15)

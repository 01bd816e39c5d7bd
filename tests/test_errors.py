"""lipsim.errors.one_line: the one helper that turns a library's exception into one line."""

from lipsim.errors import one_line


def test_one_line_takes_the_first_stripped_line_and_cuts_it():
    assert one_line(ValueError("  bad header\nTraceback details\n")) == "bad header"
    assert one_line(RuntimeError("x" * 500)) == "x" * 200
    assert one_line(RuntimeError("abcdef"), limit=3) == "abc"


def test_one_line_names_the_type_of_an_empty_message():
    assert one_line(KeyError()) == "KeyError"
    assert one_line(OSError("  \n ")) == "OSError"
    assert one_line(ValueError(""), empty="") == ""

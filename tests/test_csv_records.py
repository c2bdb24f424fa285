"""csv_records: the one CSV row loop behind the text reader and the multiple-choice loader."""
import csv
import io

from xiaolm.data.readers import csv_records


def test_records_carry_their_line_span_and_errors_do_not_stop_reading():
    text = 'a,b\n1,"two\nlines"\n2,3\n"x"y,4\n5,6\n'
    reader = csv.reader(io.StringIO(text), strict=True)
    next(reader)
    got = [(first, last, row, type(exc).__name__ if exc else None) for first, last, row, exc in csv_records(reader)]
    assert got == [(2, 3, ["1", "two\nlines"], None), (4, 4, ["2", "3"], None), (5, 5, None, "Error"),
                   (6, 6, ["5", "6"], None)]

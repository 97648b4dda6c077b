"""io.tables: the one CSV layer."""

import math

import pytest

from voxreg.core.errors import VoxregError
from voxreg.io.tables import append_row, read_table, write_table


def test_write_append_read_round_trip(tmp_path):
    path = write_table(tmp_path / "t.csv", ["a", "b"], [{"a": 1, "b": 0.1}, {"a": "x"}])
    append_row(path, ["a", "b"], {"a": 3, "b": math.nan})
    assert read_table(path) == [{"a": "1", "b": "0.1"}, {"a": "x", "b": ""}, {"a": "3", "b": ""}]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_missing_file_names_it(tmp_path):
    with pytest.raises(VoxregError, match=r"nope.csv: file not found"):
        read_table(tmp_path / "nope.csv")

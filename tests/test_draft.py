"""llmap.draft: the key, the text columns and the template a first job is drafted with."""

from __future__ import annotations

import pytest

from _support import write_csv
from llmap.draft import draft_job, guess_key, id_like, profile, text_columns, user_template
from llmap.io.sources import Source


@pytest.mark.parametrize("name, yes", [("id", True), ("district_id", True), ("DistrictID", True), ("nces_code", True),
                                       ("uuid", True), ("row_no", True), ("paid", False), ("valid", False),
                                       ("grid", False), ("name", False), ("identity", False)])
def test_id_like_names(name, yes):
    assert id_like(name) is yes


def _source(tmp_path, rows):
    write_csv(tmp_path / "d.csv", rows)
    return Source.from_path(tmp_path / "d.csv")


def test_a_unique_id_column_is_the_key(tmp_path):
    src = _source(tmp_path, [{"code": f"c{i}", "name": f"n{i % 2}", "text": "t" * i} for i in range(1, 7)])
    assert guess_key(src, profile(src)) == (["code"], "'code' is unique and never empty")


def test_a_repeated_id_pairs_with_the_column_that_makes_it_unique(tmp_path):
    rows = [{"district_id": d, "year": "2024", "level": lv, "note": f"{d}{lv}"}
            for d in (1, 2, 3) for lv in ("elementary", "high")]
    src = _source(tmp_path, rows)
    key, why = guess_key(src, profile(src))
    assert key == ["district_id", "level"] and "together are unique" in why


def test_an_id_with_empty_values_is_not_a_key(tmp_path):
    src = _source(tmp_path, [{"id": "" if i == 2 else str(i), "text": f"t{i}"} for i in range(5)])
    assert guess_key(src, profile(src))[0] == []


def test_text_columns_leave_out_ids_constants_empties_and_names_a_template_cannot_read(tmp_path):
    rows = [{"id": i, "name": f"n{i}", "const": "x", "empty": "", "two words": f"w{i}", "n": i} for i in range(4)]
    src = _source(tmp_path, rows)
    cols, unnamed = text_columns(profile(src), ["id"])
    assert cols == ["name"] and unnamed == ["two words"]


def test_at_most_eight_columns_the_longest_texts(tmp_path):
    rows = [{f"c{j}": "x" * (j + 1) + str(i) for j in range(12)} for i in range(3)]
    cols, _ = text_columns(profile(_source(tmp_path, rows)))
    assert cols == [f"c{j}" for j in range(4, 12)]


def test_the_template_names_each_column_on_its_line():
    assert user_template(["district_name", "DistrictID", "notes"]) == (
        "District name: {{ district_name }}\nDistrict ID: {{ DistrictID }}\nNotes: {{ notes }}\n")


def test_a_draft_with_no_text_column_names_other_columns(tmp_path):
    write_csv(tmp_path / "n.csv", [{"id": i, "x": i * 2, "y": i * 3} for i in range(4)])
    d = draft_job(tmp_path / "n.csv", job_dir=tmp_path)
    assert d.columns == ["x", "y"] and d.doc["input"]["key"] == "id"

import json

from torchfast.report import Report, format_table


def test_table_and_json_roundtrip():
    r = Report("low-rank", summary={"layers": 2, "flops_ratio": 1.5})
    r.add_row(layer="conv1", rank=8, applied=True, reason=None)
    r.add_row(layer="fc", rank=None, applied=False, reason="not faster")
    text = str(r)
    assert "## low-rank" in text and "| layer" in text and "not faster" in text and "yes" in text
    d = json.loads(r.to_json())
    assert d["rows"][1]["reason"] == "not faster"
    assert Report.from_dict(d).rows == r.rows
    assert r.where(applied=False)[0]["layer"] == "fc"


def test_format_table_alignment():
    t = format_table([{"a": 1, "b": 1234567}, {"a": 0.5}])
    lines = t.splitlines()
    assert len({len(l) for l in lines}) == 1  # aligned
    assert "1,234,567" in t and "| -" in t.replace("  ", " ")

"""`make demo` must keep working: every row runs on the trained digits CNN and the table has them all."""
from torchfast import demo


def test_demo_prints_every_row():
    table = demo.run(batch_size=16, runs=2)
    names = [name for name, _ in demo.demo_rows(calibration=None)]
    assert "original (fp32)" in table
    for name in names:
        assert name in table
    # every row reports a test accuracy; the quantized rows' unknowable params/FLOPs print as "-", never 0
    body = [l for l in table.splitlines()[2:]]
    assert len(body) == len(names) + 1
    assert all("| 0 " not in l.split("|")[2] for l in body)

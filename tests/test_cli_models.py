"""Where the command line gets a model and inputs: MODEL specs, --input-shape / --input-dtype, random batches."""
import pytest
import torch

from torchfast.cli_models import SourceError, input_specs, load_source, make_inputs, parse_shape
from torchfast.specs import InputSpec


def test_parse_shape_spellings_and_errors():
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224) == parse_shape(" 1x3 x 224x224 ")
    with pytest.raises(SourceError, match=r"--input-shape '4,x': expected integers"):
        parse_shape("4,x")
    with pytest.raises(SourceError, match="every dimension must be >= 1"):
        parse_shape("0,3")


def test_input_specs_from_shapes_and_dtypes():
    specs = input_specs([(4, 16), (4, 7)], [torch.int64])
    assert specs == [InputSpec("input 0", (16,), "int64"), InputSpec("input 1", (7,), "int64")]  # last dtype repeats
    assert input_specs([(2,)], []) == [InputSpec("input 0", (), "float32")]
    a, b = make_inputs([InputSpec("x", (3,)), InputSpec("ids", (5,), "int64")], rows=6, seed=1, high=10)
    assert a.shape == (6, 3) and a.dtype == torch.float32
    assert b.shape == (6, 5) and b.dtype == torch.int64 and 0 <= int(b.min()) and int(b.max()) < 10
    torch.testing.assert_close(make_inputs([InputSpec("x", (3,))], 2, seed=1), make_inputs([InputSpec("x", (3,))], 2, seed=1))


def test_callable_source_with_shapes_and_dtype_spellings():
    src = load_source("pipeline_stages:build_mlp", ["4,16"], ["fp32"], calibration=3)
    assert src.example.shape == (4, 16) and src.example.dtype == torch.float32
    assert src.make_batch(7).shape == (7, 16)
    assert len(src.calibration) == 3 and len(src.validation) == 4
    assert not torch.equal(src.calibration[0], src.example)
    ids = load_source("pipeline_stages:TwoInputs", ["2,6", "2,6"], ["long"], calibration=0)
    assert [t.dtype for t in ids.example] == [torch.int64, torch.int64] and ids.calibration == []
    assert all(0 <= int(t.min()) and int(t.max()) < 100 for t in ids.example)  # token ids in [0, 100)


@pytest.mark.parametrize("args, msg", [
    (("pipeline_stages:build_mlp", ["4,16"], ["fp8"]), r"unknown --input-dtype 'fp8'.*float16 \(fp16, half\)"),
    (("pipeline_stages:build_mlp", None, None), "needs --input-shape"),
    (("nonsense", None, None), "not a file, and not kind:name"),
    (("zoo:nope", None, None), "unknown zoo model 'nope'"),
    (("missing_file.py:build", ["4,16"], None), "missing_file.py: no such file"),
    (("pipeline_stages:no_such", ["4,16"], None), "has no attribute 'no_such'"),
    (("pipeline_stages:CALLS", ["4,16"], None), "not an nn.Module"),
])
def test_usage_errors_name_the_option_or_value(args, msg):
    with pytest.raises(SourceError, match=msg):
        load_source(*args)


def test_negative_calibration_is_refused():
    with pytest.raises(SourceError, match="--calibration must be >= 0, got -1"):
        load_source("pipeline_stages:build_mlp", ["4,16"], calibration=-1)


def test_saved_artifact_is_a_source(tmp_path):
    import pipeline_stages as st
    import torchfast
    path = tmp_path / "m.pt2"
    torchfast.save(st.build_mlp(), str(path), example_inputs=torch.randn(2, 16))
    src = load_source(str(path), ["2,16"], calibration=1)
    assert src.model(src.example).shape == (2, 10) and src.description == f"artifact {path}"
    with pytest.raises(SourceError, match="a saved artifact needs --input-shape"):
        load_source(str(path))

"""torchfast.specs: the one input spec (checks, dynamic dims, maxima, JSON, examples) and the one dtype parser."""
from __future__ import annotations

import pytest
import torch

from torchfast import TorchfastError
from torchfast.specs import (DTYPES, InputError, InputSpec, SpecError, dtype_name, parse_dtype, specs_from_inputs)


@pytest.mark.parametrize("names, dtype", [
    (("float32", "fp32", "float", "FP32", "torch.float32", torch.float32), torch.float32),
    (("float16", "fp16", "half", "torch.half"), torch.float16),
    (("bfloat16", "bf16", " BF16 "), torch.bfloat16),
    (("float64", "fp64", "double"), torch.float64),
    (("int64", "long", "torch.int64"), torch.int64),
    (("int32", "int"), torch.int32),
    (("int16", "short"), torch.int16),
    (("int8",), torch.int8),
    (("uint8",), torch.uint8),
    (("bool",), torch.bool),
    (("float8_e4m3fn", "complex64"), None),   # any other torch dtype by its name
])
def test_parse_dtype_reads_every_spelling(names, dtype):
    for name in names:
        got = parse_dtype(name)
        assert got == (dtype if dtype is not None else getattr(torch, name)), name


@pytest.mark.parametrize("bad", ["fp8", "float33", "", "onnx", "__class__", 32, None, torch.float32.__class__])
def test_parse_dtype_error_names_the_setting_and_lists_the_accepted_names(bad):
    with pytest.raises(SpecError, match=r"unknown --input-dtype .*float32 \(fp32, float\), float16 \(fp16, half\), "
                                        r"bfloat16 \(bf16\).*int64.*uint8.*bool") as e:
        parse_dtype(bad, "--input-dtype")
    assert isinstance(e.value, TorchfastError) and isinstance(e.value, ValueError)


def test_dtype_name_canonical_and_short():
    assert dtype_name(torch.float16) == "float16" and dtype_name("half") == "float16"
    assert dtype_name(torch.float16, short=True) == "fp16" and dtype_name("bf16", short=True) == "bf16"
    assert dtype_name(torch.int64, short=True) == "int64" and dtype_name(torch.long) == "int64"
    assert dtype_name(torch.complex64) == "complex64"
    assert all(dtype_name(dt) in DTYPES for dt in DTYPES.values())


def test_dtype_is_stored_by_its_canonical_name():
    a = InputSpec("x", (3,), torch.float16)
    assert a == InputSpec("x", [3], "fp16") and a.dtype == "float16" and a.torch_dtype == torch.float16
    with pytest.raises(SpecError, match="unknown dtype for input 'x': 'f17'; use a torch.dtype or one of"):
        InputSpec("x", (3,), "f17")


def test_check_names_the_input_and_the_expected_and_received_shape_and_dtype():
    s = InputSpec("image", (3, -1), "float32")
    s.check(torch.zeros(5, 3, 7))
    s.check(torch.zeros(1, 3, 1))
    with pytest.raises(InputError, match=r"input 'image' must have shape \[batch, 3, \*\], got \[5, 4, 7\]"):
        s.check(torch.zeros(5, 4, 7))
    with pytest.raises(InputError, match=r"input 'image' must have shape \[batch, 3, \*\], got \[3, 7\]"):
        s.check(torch.zeros(3, 7))
    with pytest.raises(InputError, match="input 'image' must have dtype float32, got float64"):
        s.check(torch.zeros(2, 3, 7, dtype=torch.float64))
    with pytest.raises(InputError, match="input 'image' must have dtype float32, got int64; cast it"):
        s.check_dtype(torch.zeros(2, 3, 7, dtype=torch.long), hint="; cast it")
    with pytest.raises(InputError, match="input 'image' must be a tensor, got list"):
        s.check([[0.0]])
    assert issubclass(InputError, ValueError) and issubclass(InputError, TorchfastError)


def test_max_shape_bounds_the_dynamic_dims():
    s = InputSpec("ids", (-1,), "int64", (32,))
    s.check(torch.ones(4, 32, dtype=torch.long))
    with pytest.raises(InputError, match="input 'ids' has size 33 in dim 1, above the model's maximum of 32"):
        s.check(torch.ones(4, 33, dtype=torch.long))
    assert InputSpec("ids", (-1, 4), "int64", (None, None)).to_dict() == {"name": "ids", "shape": [-1, -1, 4],
                                                                          "dtype": "int64"}
    for bad in [(32, 1), (0,), (True,), ("32",)]:
        with pytest.raises(SpecError, match=r"input 'ids': max_shape .* must give a positive size or None"):
            InputSpec("ids", (-1,), "int64", bad)


@pytest.mark.parametrize("shape", [(0,), (-2, 3), (3.0,), (True,), "ab"])
def test_bad_shape_is_refused_naming_the_input(shape):
    with pytest.raises(SpecError, match="input 'x': shape"):
        InputSpec("x", shape)


def test_batch_dim_fixed_or_absent():
    fixed = InputSpec("x", (4,), batch=8)
    assert fixed.shape_str() == "[8, 4]" and fixed.dims() == (8, 4)
    with pytest.raises(InputError, match=r"must have shape \[8, 4\], got \[2, 4\]"):
        fixed.check(torch.zeros(2, 4))
    none = InputSpec("table", (7, -1), batch=None, max_shape=(None, 5))
    none.check(torch.zeros(7, 5))
    with pytest.raises(InputError, match=r"must have shape \[7, \*\], got \[1, 7, 5\]"):
        none.check(torch.zeros(1, 7, 5))
    with pytest.raises(InputError, match="size 6 in dim 1, above the model's maximum of 5"):
        none.check(torch.zeros(7, 6))
    assert none.to_dict() == {"name": "table", "shape": [7, -1], "dtype": "float32", "max_shape": [None, 5]}
    for bad in (0, -2, 1.5, True):
        with pytest.raises(SpecError, match="input 'x': batch must be -1"):
            InputSpec("x", (4,), batch=bad)


def test_to_dict_puts_the_batch_dim_first():
    assert InputSpec("ids", (-1,), "int64", (32,)).to_dict() == {
        "name": "ids", "shape": [-1, -1], "dtype": "int64", "max_shape": [None, 32]}
    assert InputSpec("input", (3, 224, 224)).to_dict() == {"name": "input", "shape": [-1, 3, 224, 224],
                                                           "dtype": "float32"}


def test_example_fits_the_spec():
    ids = InputSpec("ids", (-1,), "int64", (4,))
    t = ids.example(3)
    assert t.shape == (3, 4) and t.dtype == torch.int64 and bool((t == 1).all())
    ids.check(t)
    img = InputSpec("img", (3, -1))
    assert img.example().shape == (1, 3, 8) and not img.example().any()
    assert InputSpec("x", (2,), batch=5).example(3).shape == (5, 2)
    assert InputSpec("x", (2,), batch=None).example(3).shape == (2,)


def test_specs_from_example_tensors():
    x = torch.randn(4, 3, 8)
    assert InputSpec.from_tensor("x", x) == InputSpec("x", (3, 8), "float32")
    assert InputSpec.from_tensor("x", x, dynamic_dims=(0, -1)) == InputSpec("x", (3, -1))
    assert InputSpec.from_tensor("x", x, dynamic_dims=()) == InputSpec("x", (3, 8), batch=4)
    assert InputSpec.from_tensor("x", x, batched=False, dynamic_dims=(2,)) == InputSpec("x", (4, 3, -1), batch=None)
    assert InputSpec.from_tensor("s", torch.tensor(1.0)).batch is None
    assert InputSpec.from_tensor("x", x, dtype="fp16").dtype == "float16"
    with pytest.raises(SpecError, match="input 'x' must be a tensor, got float"):
        InputSpec.from_tensor("x", 0.5)
    assert InputSpec.from_dims("ids", (-1, 128), torch.int64) == InputSpec("ids", (128,), "int64")
    assert InputSpec.from_dims("n", (), torch.int64).batch is None

    ids = torch.ones(2, 6, dtype=torch.long)
    specs = specs_from_inputs([("input_ids", ids), ("pair", (x, {"mask": ids}))], {"input_ids": (0, 1)})
    assert list(specs) == ["input_ids", "pair[0]", "pair[1]['mask']"]
    assert specs["input_ids"] == InputSpec("input_ids", (-1,), "int64")
    assert specs["pair[1]['mask']"] == InputSpec("pair[1]['mask']", (6,), "int64")  # unnamed: batch dim only

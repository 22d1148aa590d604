"""TensorRT: the pure parts (input specs, shape ranges, precision mapping, settings) run everywhere;
the compile itself needs torch_tensorrt on a CUDA host (it cannot be installed on the CPU machines)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from torchfast.backends.tensorrt import (InputSpec, Options, batch_range, compile_settings, input_specs,
                                         precision_settings, shape_range)
from torchfast.config import ConfigError

HAS_TRT = importlib.util.find_spec("torch_tensorrt") is not None and torch.cuda.is_available()


def test_options_validate_on_construction():
    with pytest.raises(ConfigError, match="precision must be one of 'fp32', 'fp16', 'bf16', 'int8'"):
        Options(precision="fp8")
    with pytest.raises(ConfigError, match="optimization_level must be in"):
        Options(optimization_level=7)
    with pytest.raises(ConfigError, match="max_batch"):
        Options(min_batch=4, opt_batch=8, max_batch=6)
    with pytest.raises(ConfigError, match="min_block_size"):
        Options(min_block_size=0)


def test_static_and_dynamic_batch_ranges():
    assert batch_range(8, Options(), dynamic_batch=False) == (8, 8, 8)
    assert batch_range(8, Options(), dynamic_batch=True) == (1, 8, 32)
    assert batch_range(8, Options(min_batch=2, opt_batch=16, max_batch=64), dynamic_batch=True) == (2, 16, 64)
    with pytest.raises(ConfigError, match="min_batch <= opt_batch <= max_batch"):
        batch_range(8, Options(max_batch=4), dynamic_batch=True)   # example batch 8 above max 4


def test_input_specs_from_image_example():
    args, kwargs = input_specs(torch.randn(8, 3, 224, 224), dynamic_batch=True)
    assert kwargs == {}
    assert args == [InputSpec("input_0", (3, 224, 224), torch.float32)]   # any batch size
    batches = batch_range(8, Options(max_batch=64), dynamic_batch=True)
    assert shape_range(args[0], batches) == ((1, 3, 224, 224), (8, 3, 224, 224), (64, 3, 224, 224))
    static, _ = input_specs(torch.randn(8, 3, 224, 224), dynamic_batch=False)
    assert static[0].batch == 8
    assert shape_range(static[0], batch_range(8, Options(), False)) == ((8, 3, 224, 224),) * 3


def test_input_specs_from_tokenizer_example_keep_integer_dtypes():
    batch = {"input_ids": torch.zeros(4, 128, dtype=torch.long), "attention_mask": torch.ones(4, 128, dtype=torch.long)}
    _, kw = input_specs(batch, dynamic_batch=True, dtype=torch.float16)
    assert set(kw) == {"input_ids", "attention_mask"}
    assert kw["input_ids"].torch_dtype == torch.long      # ids are never cast to the compute dtype
    lo, _, hi = shape_range(kw["input_ids"], batch_range(4, Options(), dynamic_batch=True))
    assert lo == (1, 128) and hi == (16, 128)
    # floating inputs do take the compute dtype of a model cast to fp16
    args, _ = input_specs(torch.randn(2, 3), dtype=torch.float16)
    assert args[0].dtype == "float16"
    # an input without the batch dim keeps its whole shape, whatever the batch range
    _, kw = input_specs({"x": torch.randn(4, 3), "table": torch.randn(7, 5)}, dynamic_batch=True)
    assert kw["table"].batch is None and shape_range(kw["table"], (1, 4, 16)) == ((7, 5),) * 3


def test_non_tensor_input_is_named():
    from torchfast.backends import BackendError
    with pytest.raises(BackendError, match="input 'scale' is float"):
        input_specs({"x": torch.randn(2, 3), "scale": 0.5})


def test_precision_mapping_follows_strong_typing():
    assert precision_settings("fp32", torch.float32, None) == {"use_explicit_typing": True}
    assert precision_settings("fp16", torch.float32, None) == {
        "use_explicit_typing": True, "enable_autocast": True, "autocast_low_precision_type": torch.float16}
    assert precision_settings("bf16", torch.float32, None)["autocast_low_precision_type"] == torch.bfloat16
    # model cast by PyTorch: TensorRT keeps its types, fp32 accumulation for fp16 matmuls
    assert precision_settings("fp32", torch.float16, None) == {"use_explicit_typing": True, "use_fp32_acc": True}
    with pytest.raises(ConfigError, match="contradicts"):
        precision_settings("bf16", torch.float16, None)
    with pytest.raises(ConfigError, match="ModelOpt"):
        precision_settings("int8", torch.float32, None)
    assert precision_settings("int8", torch.float32, "modelopt") == {"use_explicit_typing": True}
    assert "enabled_precisions" not in precision_settings("fp16", torch.float32, None)  # deprecated in 2.14


def test_compile_settings_are_complete():
    s = compile_settings(Options(precision="fp16", optimization_level=5, workspace_size=1 << 30,
                                 min_block_size=3), torch.float32, None)
    assert s == {"ir": "dynamo", "min_block_size": 3, "require_full_compilation": False, "use_python_runtime": False,
                 "use_explicit_typing": True, "enable_autocast": True, "autocast_low_precision_type": torch.float16,
                 "optimization_level": 5, "workspace_size": 1 << 30}


def test_save_tensorrt_format_needs_a_tensorrt_model(tmp_path):
    import torchfast
    from torchfast.backends import BackendError
    with pytest.raises(BackendError, match="format='tensorrt' saves a model compiled with backend='tensorrt'"):
        torchfast.save(torch.nn.Linear(3, 3), tmp_path / "m.ep", format="tensorrt")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_TRT, reason="needs torch_tensorrt and a CUDA GPU (pip install torch-tensorrt fails on "
                                        "the CPU machines: its tensorrt libs come from NVIDIA's index)")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_compile_save_load(digits_cnn, tmp_path, precision):
    import torchfast
    from torchfast.measure import fidelity
    model, data = digits_cnn
    x = data.x_test[:8]
    fast = torchfast.compile(model, x, backend="tensorrt", precision=precision, dynamic_batch=True, min_block_size=1)
    fid = fidelity(model, fast, data.x_test[:64], eval_fn=data.eval_fn)
    assert fid.top1_agreement > 0.99
    path = torchfast.save(fast, tmp_path / "m.ep", format="tensorrt")
    import torch_tensorrt  # noqa: F401  registers the engine op for torch.export.load
    loaded = torch.export.load(str(path)).module()
    torch.testing.assert_close(loaded(x.cuda()).float().cpu(), fast(x).float().cpu(), atol=1e-3, rtol=1e-3)

"""Recipe strings: stage names, key=value parameters coerced to the config's field types, errors naming the
token. The test stages (noise, slow, ...) are in the stage table once pipeline_stages is imported."""
import pytest
import torch

import pipeline_stages as st
from torchfast.config import ConfigError
from torchfast.recipe_syntax import RecipeSyntaxError, parse_recipe, parse_value, recipe_help


def test_stages_and_parameters():
    assert parse_recipe("noise:scale=0.5,seed=3,slow-1ms+noise") == [st.Noise(0.5, 3), st.Slow(1.0), st.Noise()]
    assert parse_recipe("slow-1ms:ms=2")[0].ms == 2.0 and parse_recipe("slow")[0] == st.Slow()


@pytest.mark.parametrize("bad, msg", [
    ("nosuch", "unknown stage 'nosuch'"), ("scale=1,noise", "before any stage"),
    ("noise:bogus=1", "no parameter 'bogus'.*scale"), ("", "empty recipe"),
    ("noise:scale=", "empty key or value"),
])
def test_parse_errors_name_the_token(bad, msg):
    with pytest.raises(RecipeSyntaxError, match=msg):
        parse_recipe(bad)


def test_config_validation_errors_pass_through():
    with pytest.raises(ConfigError, match="Noise.scale"):
        parse_recipe("noise:scale=-1")


def test_dtype_parameters_take_every_dtype_spelling():
    assert parse_recipe("fp16:dtype=bf16")[0].torch_dtype == torch.bfloat16
    assert parse_recipe("bf16:dtype=torch.half")[0].torch_dtype == torch.float16
    with pytest.raises(RecipeSyntaxError, match=r"unknown HalfPrecision.dtype 'fp8'.*bfloat16 \(bf16\)"):
        parse_recipe("fp16:dtype=fp8")


def test_values_and_help():
    assert [parse_value(v) for v in ("true", "off", "none", "3", "0.5", "a/b", "x")] == \
        [True, False, None, 3, 0.5, ("a", "b"), "x"]
    assert "int8-static" in recipe_help() and "lowrank:ratio=0.5" in recipe_help()

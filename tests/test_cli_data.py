"""--calibration PATH: unlabeled data from a folder of images, a text file of sentences, a .pt/.npy file;
and `torchfast optimize --recipe auto --time-budget`."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from torchfast.cli import _duration, _search_space, main
from torchfast.cli_data import ImagePrep, load_data
from torchfast.cli_models import Source, SourceError, load_source
from torchfast.config import ConfigError
from torchfast.search import SearchSpace

CNN = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 5, 4)).eval()
'''


def _source(example, **kw) -> Source:
    return Source(torch.nn.Identity(), example, lambda n: example, **kw)


def test_a_folder_of_images_becomes_normalized_batches_of_the_example_shape(tmp_path):
    from PIL import Image
    for i in range(5):  # odd sizes and modes: each is converted and resized to the model's input
        Image.new("RGB" if i % 2 else "L", (10 + i, 7), color=(255, 0, 0) if i % 2 else 128).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    got = load_data(str(tmp_path), _source(torch.zeros(2, 3, 6, 5), image_prep=ImagePrep((0.5,), (0.5,))))
    assert [tuple(b.shape) for b in got] == [(2, 3, 6, 5), (2, 3, 6, 5), (1, 3, 6, 5)]
    red = got[0][1]   # image 1: pure red, scaled to [0, 1] then (x - 0.5) / 0.5
    torch.testing.assert_close(red[0], torch.ones(6, 5))
    torch.testing.assert_close(red[1], -torch.ones(6, 5))
    gray = load_data(str(tmp_path), _source(torch.zeros(4, 1, 3, 3)))[0][0]   # grayscale, no normalization
    torch.testing.assert_close(gray, torch.full((1, 3, 3), 128 / 255))
    with pytest.raises(SourceError, match=r"needs a model taking one image batch \[N, C, H, W\]"):
        load_data(str(tmp_path), _source(torch.zeros(2, 16)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="no image files in the folder"):
        load_data(str(empty), _source(torch.zeros(2, 3, 6, 5)))


def test_sentences_go_through_the_sources_tokenizer(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("first sentence\n\n  second one \nthird\n")
    seen = []

    def tokenize(texts):
        seen.append(texts)
        return {"input_ids": torch.ones(len(texts), 4, dtype=torch.long)}
    ex = {"input_ids": torch.ones(2, 4, dtype=torch.long)}
    got = load_data(str(path), _source(ex, tokenize=tokenize))
    assert seen == [["first sentence", "second one"], ["third"]] and got[1]["input_ids"].shape == (1, 4)
    with pytest.raises(SourceError, match="sentences need the model's tokenizer"):
        load_data(str(path), _source(torch.zeros(2, 16)))


def test_tensor_files_samples_batches_lists_dicts_and_their_errors(tmp_path):
    ex = torch.zeros(4, 16)
    torch.save(torch.randn(10, 16, dtype=torch.float64), tmp_path / "samples.pt")
    got = load_data(str(tmp_path / "samples.pt"), _source(ex))
    assert [b.shape[0] for b in got] == [4, 4, 2] and got[0].dtype == torch.float32   # cast to the example's dtype
    np.save(tmp_path / "batches.npy", np.zeros((3, 5, 16), np.float32))
    assert [tuple(b.shape) for b in load_data(str(tmp_path / "batches.npy"), _source(ex))] == [(5, 16)] * 3
    torch.save([torch.zeros(2, 16), torch.zeros(3, 16)], tmp_path / "list.pt")
    assert [b.shape[0] for b in load_data(str(tmp_path / "list.pt"), _source(ex))] == [2, 3]
    ids = {"input_ids": torch.ones(2, 8, dtype=torch.long), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    torch.save({k: v.repeat(3, 1) for k, v in ids.items()}, tmp_path / "dict.pt")
    got = load_data(str(tmp_path / "dict.pt"), _source(ids))
    assert len(got) == 3 and got[0]["input_ids"].dtype == torch.long and got[0]["attention_mask"].shape == (2, 8)
    torch.save(torch.zeros(10, 15), tmp_path / "wrong.pt")
    with pytest.raises(SourceError, match=r"shape \(10, 15\) is neither samples \[N, 16\]"):
        load_data(str(tmp_path / "wrong.pt"), _source(ex))
    torch.save([torch.zeros(2, 16), torch.zeros(2, 8)], tmp_path / "mixed.pt")
    with pytest.raises(SourceError, match=r"batch 1 \(input 0: \(2, 8\) float32\) does not match"):
        load_data(str(tmp_path / "mixed.pt"), _source(ex))
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(SourceError, match="unknown kind of data file '.csv'"):
        load_data(str(tmp_path / "x.csv"), _source(ex))
    with pytest.raises(SourceError, match="no such file or folder"):
        load_data(str(tmp_path / "missing.pt"), _source(ex))


def test_load_source_takes_a_number_or_a_path(tmp_path):
    (tmp_path / "cnn.py").write_text(CNN)
    torch.save(torch.randn(12, 3, 6, 5), tmp_path / "x.pt")
    src = load_source(f"{tmp_path / 'cnn.py'}:build", ["4,3,6,5"], None, str(tmp_path / "x.pt"))
    assert len(src.calibration) == 3 and src.validation == [] and "3 batch(es) from" in src.description
    assert len(load_source(f"{tmp_path / 'cnn.py'}:build", ["4,3,6,5"], None, "2").calibration) == 2


def test_durations():
    assert _duration("90") == _duration("90s") == 90 and _duration("10m") == 600 and _duration("1h30m") == 5400
    assert _duration("none") == math.inf
    for bad in ("", "soon", "0"):
        with pytest.raises(Exception, match="--time-budget"):
            _duration(bad)


def _optimize_auto(tmp_path, *flags: str) -> tuple[int, Path]:
    """``torchfast optimize --recipe auto`` on the test CNN with unlabeled calibration data; (exit code, report)."""
    (tmp_path / "cnn.py").write_text(CNN)
    torch.save(torch.randn(32, 3, 6, 5), tmp_path / "x.pt")
    report = tmp_path / "r.json"
    rc = main(["optimize", f"{tmp_path / 'cnn.py'}:build", "--input-shape", "4,3,6,5", "--calibration",
               str(tmp_path / "x.pt"), "--recipe", "auto", "--backend", "eager", *flags, "--runs", "3",
               "--no-progress", "--report", str(report)])
    return rc, report


def test_optimize_recipe_auto_on_unlabeled_data_within_a_budget(tmp_path, capsys):
    rc, report = _optimize_auto(tmp_path, "--time-budget", "3s")
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "recipe: auto (search, 3s budget)" in out.err and "optimize: auto" in out.out
    d = json.loads(report.read_text())
    assert d["title"] == "optimize: auto" and d["rows"] and "time budget" in d["summary"]
    assert main(["bench", f"{tmp_path / 'cnn.py'}:build", "--input-shape", "4,3,6,5", "--recipe", "auto",
                 "--batch", "1", "--no-progress"]) == 2
    assert "recipe 'auto' is a search" in capsys.readouterr().err


def test_search_space_spec_parses_to_a_search_space_and_names_what_is_wrong():
    space = _search_space("prune=0/0.3,lowrank=none/global,int8=static,backends=eager/torchscript,finalists=1")
    assert space == SearchSpace(prune=(0, 0.3), lowrank=(None, "global"), int8=("static",),
                                backends=("eager", "torchscript"), finalists=1)
    assert _search_space("lowrank=none,backends=none") == SearchSpace(lowrank=(None,), backends=None)
    with pytest.raises(Exception, match="unknown field.*prunning"):
        _search_space("prunning=0.3")
    with pytest.raises(ConfigError, match="SearchSpace.int8"):
        _search_space("int8=fp4")


def test_optimize_search_space_narrows_the_search_and_needs_recipe_auto(tmp_path, capsys):
    rc, report = _optimize_auto(tmp_path, "--time-budget", "none",
                                "--search-space", "prune=0,lowrank=none,int8=dynamic/none,finalists=0")
    out = capsys.readouterr()
    assert rc == 0, out.err
    names = [r["candidate"] for r in json.loads(report.read_text())["rows"]]
    assert names and all(n.startswith("original") for n in names), names
    assert not any("static" in n or "prune" in n or "lowrank" in n for n in names), names
    assert main(["optimize", f"{tmp_path / 'cnn.py'}:build", "--input-shape", "4,3,6,5", "--recipe", "int8-dynamic",
                 "--search-space", "prune=0", "--no-progress"]) == 2
    assert "--search-space shapes the search of --recipe auto" in capsys.readouterr().err

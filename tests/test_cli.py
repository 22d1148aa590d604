"""The torchfast command: optimize, bench, export, serve; exit codes 0 / 1 / 2 with messages naming the option."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from torchfast.cli import main

import pipeline_stages as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES_FILE = os.path.join(ROOT, "tests", "pipeline", "pipeline_stages.py")
FAST = ["--runs", "2", "--no-progress"]


def test_optimize_writes_report_and_artifact(tmp_path, capsys):
    rep, out = tmp_path / "r.json", tmp_path / "m.pt"
    rc = main(["optimize", "pipeline_stages:build_mlp", "--input-shape", "4,16", "--recipe",
               "noise:scale=0.0001,noise:scale=5", "--backend", "torchscript", "--report", str(rep),
               "--out", str(out), *FAST])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "| Noise(scale=0.0001)" in text and "rolled back: cosine" in text
    d = json.loads(rep.read_text())
    assert [r["applied"] for r in d["rows"]] == [True, True, False, True]
    loaded = torch.jit.load(str(out))  # plain torch, no torchfast
    x = torch.randn(4, 16)
    ref = st.build_mlp()(x)
    assert torch.nn.functional.cosine_similarity(loaded(x), ref).min() > 0.999


@pytest.mark.parametrize("argv, msg", [
    (["optimize", "torchvision:not_a_model"], "torchvision has no model 'not_a_model'"),
    (["optimize", "pipeline_stages:build_mlp"], "needs --input-shape"),
    (["optimize", "pipeline_stages:build_mlp", "--input-shape", "4,x"], "--input-shape '4,x'"),
    (["optimize", "pipeline_stages:build_mlp", "--input-shape", "4,16", "--recipe", "frobnicate"], "unknown stage 'frobnicate'"),
    (["optimize", "pipeline_stages:build_mlp", "--input-shape", "4,16", "--tolerance", "min_cos=1"], "unknown bound(s) min_cos"),
    (["optimize", "pipeline_stages:build_mlp", "--input-shape", "4,16", "--recipe", "none", "--backend", "warp"], "unknown backend 'warp'"),
    (["optimize", "no_such_module_xyz:build"], "cannot import 'no_such_module_xyz'"),
    (["bench", "pipeline_stages:build_mlp", "--input-shape", "4,16", "--batch", "0"], "batch sizes must be >= 1"),
    (["optimize", "pipeline_stages:build_mlp", "--bogus-flag"], "unrecognized arguments"),
])
def test_usage_errors_exit_2_with_a_message(argv, msg, capsys):
    assert main(argv + ["--no-progress"] if argv[0] != "bench" else argv) == 2
    assert msg in capsys.readouterr().err


def test_runtime_failure_exits_1(capsys):
    assert main(["optimize", "pipeline_stages:build_mlp", "--input-shape", "4,16", "--recipe", "boom", *FAST]) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in err and "--debug" in err
    assert main(["optimize", "pipeline_stages:build_mlp", "--input-shape", "4,16", "--recipe", "boom",
                 "--keep-going", *FAST]) == 0


def test_bench_table_and_export_round_trip(tmp_path, capsys):
    j = tmp_path / "b.json"
    assert main(["bench", "pipeline_stages:build_mlp", "--input-shape", "4,16", "--batch", "1,3",
                 "--backend", "torchscript", "--runs", "2", "--no-progress", "--json", str(j)]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "candidate samples/s" in out
    assert [r["batch"] for r in json.loads(j.read_text())["rows"]] == [1, 3]
    p = tmp_path / "m.pt2"
    assert main(["export", "pipeline_stages:build_mlp", "--input-shape", "2,16", "--out", str(p)]) == 0
    assert "cosine 1.0" in capsys.readouterr().out
    ep = torch.export.load(str(p))
    x = torch.randn(2, 16)
    torch.testing.assert_close(ep.module()(x), st.build_mlp()(x))
    # a saved artifact is a MODEL too: timed alone unless --baseline is given
    assert main(["bench", str(p), "--input-shape", "2,16", "--batch", "2", "--runs", "2", "--no-progress"]) == 0
    assert "timed alone" in capsys.readouterr().out


def test_serve_delegates_to_the_serving_module(monkeypatch, capsys):
    seen = {}
    fake = types.ModuleType("torchfast.serve.cli")
    fake.add_arguments = lambda p: p.add_argument("--port", type=int, default=8000)
    fake.run = lambda args: seen.setdefault("port", args.port) and 0
    monkeypatch.setitem(sys.modules, "torchfast.serve.cli", fake)
    import torchfast.serve
    monkeypatch.setattr(torchfast.serve, "cli", fake, raising=False)
    assert main(["serve", "--port", "9001"]) == 0 and seen["port"] == 9001
    assert main(["serve", "--help"]) == 0 and "--port" in capsys.readouterr().out
    monkeypatch.setattr(torchfast.serve, "cli", types.ModuleType("torchfast.serve.cli"), raising=False)
    monkeypatch.setitem(sys.modules, "torchfast.serve.cli", torchfast.serve.cli)
    assert main(["serve"]) == 1 and "no add_arguments()/run()" in capsys.readouterr().err


def test_subprocess_entry_point(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    h = subprocess.run([sys.executable, "-m", "torchfast", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert h.returncode == 0 and "optimize" in h.stdout and "bench" in h.stdout and "serve" in h.stdout
    r = subprocess.run([sys.executable, "-m", "torchfast", "optimize", f"{STAGES_FILE}:build_mlp", "--input-shape", "8,16",
                        "--recipe", "int8-dynamic", "--tolerance", "min_cosine=0.98", "--backend", "eager",
                        "--out", str(tmp_path / "q.pt2"), *FAST],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Int8Dynamic" in r.stdout and (tmp_path / "q.pt2").exists()


def _subcommands() -> list[str]:
    import argparse

    from torchfast.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub.choices)


@pytest.mark.parametrize("argv", [[], ["optimize"], ["bench"], ["export"], ["serve"]], ids=lambda a: a[0] if a else "top")
def test_help_does_not_import_torch(argv, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "torchfast", *argv, "--help"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "torchfast.cli" in imported  # the import log is real
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "numpy", "torchvision", "transformers"))
    assert not heavy, f"torchfast {' '.join(argv)} --help imported {heavy[:5]}"
    if not argv:
        subs = _subcommands()
        assert set(subs) >= {"optimize", "bench", "export", "serve"}
        for name in subs:
            assert f"\n  {name} " in r.stdout, f"{name} missing from --help:\n{r.stdout}"
    else:
        assert f"usage: torchfast {argv[0]}" in r.stdout

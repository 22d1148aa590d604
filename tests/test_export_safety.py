"""torchfast.load runs nothing from the file by default, for every format it reads.

Each crafted file carries a payload that creates MARKER when it runs. Where plain torch would run it, the
test shows that first (so the file really reaches the part in question), then checks that torchfast.load
refuses the file with an error naming the archive member, and that MARKER was never created.
"""
from __future__ import annotations

import io
import json
import pickle
import sys
import warnings
import zipfile

import pytest
import torch
from torch import nn

import torchfast
from torchfast.export import UnsafeArtifactError

TRUST = "allow_pickle=True only for files you trust"


class Payload:
    """Unpickling this opens MARKER for writing: the proof that loading ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("scale", torch.full((2,), 2.0))
        self.offset = torch.ones(2)          # a tensor constant in the ExportedProgram

    def forward(self, x):
        return self.lin(x) * self.scale + self.offset


class SetsState(nn.Module):
    """TorchScript whose __setstate__ (run by torch.jit.load) creates the file named in its state."""

    def __init__(self, marker: str):
        super().__init__()
        self.path = marker
        self.n = 0

    def forward(self, x):
        return x + 1

    @torch.jit.export
    def __getstate__(self) -> tuple[str, bool]:
        return (self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[str, bool]) -> None:
        self.path = state[0]
        self.training = state[1]
        self.n = int(torch.from_file(state[0], True, 4).sum())


X = torch.randn(4, 3)


@pytest.fixture()
def marker(tmp_path):
    return tmp_path / "MARKER"


@pytest.fixture()
def tiny(tmp_path):
    torch.manual_seed(0)
    model = Tiny().eval()
    pt2 = torchfast.save(model, tmp_path / "tiny.pt2", format="exported_program", example_inputs=X,
                         dynamic_batch=True)
    pt = torchfast.save(model, tmp_path / "tiny.pt", format="torchscript", example_inputs=X)
    return model, pt2, pt


def _saved(obj, **kw) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kw)
    return buf.getvalue()


def _rewrite(src, dst, edit):
    """Copy the zip ``src`` to ``dst`` with ``edit(files)`` applied to {name inside the root folder: bytes}."""
    with zipfile.ZipFile(src) as z:
        root = z.namelist()[0].split("/")[0]
        files = {n.split("/", 1)[1]: z.read(n) for n in z.namelist()}
    edit(files)
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in files.items():
            z.writestr(f"{root}/{name}", data)
    return dst


def _edit_json(name, fn):
    def edit(files):
        doc = json.loads(files[name])
        files[name] = json.dumps(fn(doc)).encode()
    return edit


def _plain_torch_runs_it(marker, fn) -> bool:
    """Whether plain torch, loading the crafted file with ``fn``, creates the marker (then removes it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception:
            pass
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


def _refused(path, marker, member):
    with pytest.raises(UnsafeArtifactError, match=TRUST) as e:
        torchfast.load(path)
    assert member in e.value.member and repr(e.value.member) in str(e.value)
    assert not marker.exists()
    return str(e.value)


# -- ExportedProgram: every part torch.export.load would unpickle ------------------------------------------

def _pickled_weight(marker):
    def edit(files):
        cfg = json.loads(files["data/weights/model_weights_config.json"])
        entry = next(iter(cfg["config"].values()))
        entry["use_pickle"] = True
        files["data/weights/model_weights_config.json"] = json.dumps(cfg).encode()
        files["data/weights/" + entry["path_name"]] = _saved(Payload(marker))
    return edit, "data/weights/weight_0"


def _pickled_constant(marker):
    def edit(files):
        cfg = json.loads(files["data/constants/model_constants_config.json"])
        entry = next(e for e in cfg["config"].values() if e["path_name"].startswith("tensor_"))
        entry["use_pickle"] = True
        files["data/constants/model_constants_config.json"] = json.dumps(cfg).encode()
        files["data/constants/" + entry["path_name"]] = _saved(Payload(marker))
    return edit, "data/constants/tensor_0"


def _opaque_object(marker):
    def edit(files):
        cfg = json.loads(files["data/constants/model_constants_config.json"])
        cfg["config"]["evil"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
                                 "tensor_meta": None}
        files["data/constants/model_constants_config.json"] = json.dumps(cfg).encode()
        files["data/constants/opaque_obj_0"] = pickle.dumps(Payload(marker))
    return edit, "data/constants/opaque_obj_0"


def _member(name):
    def make(marker):
        def edit(files):
            files[name] = _saved(Payload(marker))
        return edit, name
    return make


PT2_PICKLES = {
    "sample_inputs": _member("data/sample_inputs/model.pt"),    # weights_only, then a full-unpickle fallback
    "pickled_weight": _pickled_weight,                           # torch.load(weights_only=False)
    "pickled_constant": _pickled_constant,                       # torch.load(weights_only=False)
    "opaque_object": _opaque_object,                             # pickle.loads
    "legacy_weights": _member("data/weights/model.pt"),         # read before the weights config
    "legacy_constants": _member("data/constants/model.pt"),
}


@pytest.mark.parametrize("part", sorted(PT2_PICKLES))
def test_pt2_part_that_torch_would_unpickle_is_refused(tiny, tmp_path, marker, part):
    edit, member = PT2_PICKLES[part](marker)
    path = _rewrite(tiny[1], tmp_path / f"{part}.pt2", edit)
    assert _plain_torch_runs_it(marker, lambda: torch.export.load(str(path)))
    msg = _refused(path, marker, member)
    assert "io.open" in msg                                  # says what it would have called


def test_pt2_in_the_2_7_format_is_checked_too(tiny, tmp_path, marker):
    """torch.export.load falls back to the 2.7 layout (root-level serialized_*.pt) when the current one fails."""
    from torch._export.serde.schema import SCHEMA_VERSION
    from torch._export.serde.serialize import serialize
    art = serialize(torch.export.load(str(tiny[1])))
    path = tmp_path / "old.pt2"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("version", ".".join(map(str, SCHEMA_VERSION)))
        z.writestr("serialized_exported_program.json", art.exported_program)
        z.writestr("serialized_state_dict.pt", art.state_dict)
        z.writestr("serialized_constants.pt", art.constants)
        z.writestr("serialized_example_inputs.pt", _saved(Payload(marker)))
    assert _plain_torch_runs_it(marker, lambda: torch.export.load(str(path)))
    _refused(path, marker, "serialized_example_inputs.pt")


# -- ExportedProgram: strings of the program JSON that torch turns into Python ----------------------------

def _opens(marker) -> str:
    return f"open({str(marker)!r}, 'w')"


def _sym_expr(doc, marker):
    """sympy.sympify evals symbolic shapes, during torch.export.load."""
    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("expr_str"), str):
                node["expr_str"] = f"{_opens(marker)} and {node['expr_str']}"
                return True
            return any(walk(v) for v in node.values())
        return isinstance(node, list) and any(walk(v) for v in node)
    assert walk(doc)
    return doc


def _input_name(doc, marker):
    """Input names become parameters of the generated forward, exec'd during torch.export.load."""
    new = f"x={_opens(marker)}"
    doc = json.loads(json.dumps(doc).replace('{"name": "x"}', json.dumps({"name": new})))
    values = doc["graph_module"]["graph"]["tensor_values"]
    values[new] = values.pop("x")
    return doc


def _guards_code(doc, marker):
    """guards_code is exec'd into the input check that .module() builds, run on the first call."""
    doc["guards_code"] = [f"{_opens(marker)} is not None"]
    return doc


JSON_ATTACKS = {
    "sym_expr": (_sym_expr, lambda p: torch.export.load(str(p))),
    "input_name": (_input_name, lambda p: torch.export.load(str(p))),
    "guards_code": (_guards_code, lambda p: torch.export.load(str(p)).module()(X)),
}


@pytest.mark.parametrize("attack", sorted(JSON_ATTACKS))
def test_pt2_program_json_that_becomes_code_is_refused(tiny, tmp_path, marker, attack):
    craft, plain = JSON_ATTACKS[attack]
    path = _rewrite(tiny[1], tmp_path / f"{attack}.pt2",
                    _edit_json("models/model.json", lambda doc: craft(doc, marker)))
    assert _plain_torch_runs_it(marker, lambda: plain(path))
    msg = _refused(path, marker, "models/model.json")
    assert "would become Python code" in msg


def test_pt2_pytree_context_cannot_import_a_module(tiny, tmp_path, marker, monkeypatch):
    """Enum entries in a pytree context name a module that torch.export.load imports."""
    (tmp_path / "tf_import_marker.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport enum\nclass E(enum.Enum):\n    A = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    leaf = {"type": None, "context": None, "children_spec": []}
    spec = json.dumps([1, {"type": "builtins.dict", "children_spec": [leaf], "context": json.dumps(
        [{"__enum__": True, "fqn": "tf_import_marker:E", "name": "A"}])}])

    def fn(doc):
        doc["graph_module"]["module_call_graph"][0]["signature"]["out_spec"] = spec
        return doc
    path = _rewrite(tiny[1], tmp_path / "enum.pt2", _edit_json("models/model.json", fn))
    assert _plain_torch_runs_it(marker, lambda: torch.export.load(str(path)))
    monkeypatch.delitem(sys.modules, "tf_import_marker", raising=False)
    assert "already imported module" in _refused(path, marker, "models/model.json")


def test_pt2_native_code_and_ambiguous_zips_are_refused(tiny, tmp_path, marker):
    def aoti(files):
        files["data/aotinductor/model/model.so"] = b"\x7fELF not really"
    assert "AOTInductor" in _refused(_rewrite(tiny[1], tmp_path / "aoti.pt2", aoti), marker,
                                     "data/aotinductor/model/model.so")
    dup = tmp_path / "dup.pt2"             # Python's zip reader and torch's may pick different copies
    with zipfile.ZipFile(tiny[1]) as src, zipfile.ZipFile(dup, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")           # zipfile warns about the duplicate name
        names = src.namelist()
        for n in names:
            z.writestr(n, src.read(n))
        z.writestr(names[0], b"another copy")
    assert "duplicate" in _refused(dup, marker, names[0])


# -- torch.save files and pre-zip legacy files -----------------------------------------------------------

@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_torch_save_file_with_a_pickled_object_is_refused(tmp_path, marker, zipped):
    path = tmp_path / "obj.pt"
    path.write_bytes(_saved(Payload(marker), _use_new_zipfile_serialization=zipped))
    assert _plain_torch_runs_it(marker, lambda: torch.load(path, weights_only=False))
    msg = _refused(path, marker, "data.pkl" if zipped else "pickle stream")
    assert "io.open" in msg


# -- TorchScript ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("member", ["data.pkl", "constants.pkl"])
def test_torchscript_pickle_cannot_call_a_python_global(tiny, tmp_path, marker, member):
    """torch.jit.load's C++ unpickler resolves no Python global: the GLOBAL io.open reduce does not run."""
    def edit(files):
        files[member] = pickle.dumps(Payload(marker), protocol=2)
    path = _rewrite(tiny[2], tmp_path / "evil.pt", edit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="io.open"):
            torch.jit.load(str(path))            # torch itself refuses it ...
    assert not marker.exists()
    assert "io open" in _refused(path, marker, member)   # ... and torchfast says so before torch reads it


def test_torchbind_object_pickle_cannot_call_a_python_global(marker):
    """ExportedProgram custom_obj_* members go through the same C++ unpickler (torch._C._pickle_load_obj)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(Payload(marker), protocol=2))
        z.writestr("archive/version", "3\n")
    with pytest.raises(RuntimeError, match="io.open"):
        torch._C._pickle_load_obj(buf.getvalue())
    assert not marker.exists()


def test_torchscript_setstate_runs_at_load_and_is_refused(tmp_path, marker):
    """No Python runs, but a TorchScript __setstate__ does, and TorchScript can create files."""
    path = tmp_path / "setstate.pt"
    torch.jit.save(torch.jit.script(SetsState(str(marker))), str(path))
    assert not marker.exists()                     # scripting and saving do not call __setstate__
    assert _plain_torch_runs_it(marker, lambda: torch.jit.load(str(path)))
    assert "__setstate__" in _refused(path, marker, "code/__torch__/")


# -- what must keep working -------------------------------------------------------------------------------

def test_torchfast_artifacts_load_by_default_and_match(tiny, tmp_path):
    model, pt2, pt = tiny
    sd = torchfast.save(model, tmp_path / "w.pt", format="state_dict")
    ref = model(X).detach()
    for path in (pt2, pt):
        for allow in (False, True):
            torch.testing.assert_close(torchfast.load(path, allow_pickle=allow)(X), ref)
    assert isinstance(torchfast.load(pt2, program=True), torch.export.ExportedProgram)
    loaded = torchfast.load(sd)
    assert set(loaded) == set(model.state_dict())
    torch.testing.assert_close(loaded["lin.weight"], model.lin.weight.detach())
    torch.save(model, tmp_path / "pickled.pt")           # a pickled module: trusted files only
    with pytest.raises(UnsafeArtifactError, match=TRUST):
        torchfast.load(tmp_path / "pickled.pt")
    assert isinstance(torchfast.load(tmp_path / "pickled.pt", allow_pickle=True), Tiny)


def test_served_model_refuses_a_crafted_pt2(tiny, tmp_path, marker):
    """`torchfast serve x.pt2` loads through load_served_model: the crafted file is refused, unrun."""
    from torchfast.serve.model import load_served_model
    edit, member = PT2_PICKLES["sample_inputs"](marker)
    path = _rewrite(tiny[1], tmp_path / "served.pt2", edit)
    with pytest.raises(UnsafeArtifactError, match=TRUST):
        load_served_model(str(path))
    assert not marker.exists()
    served = load_served_model(str(tiny[1]))                  # the real artifact still serves
    torch.testing.assert_close(served.model(X), tiny[0](X).detach())

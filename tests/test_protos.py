"""The committed stubs in services/v1 are exactly what protos/ generates."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_protos(tmp_path: Path) -> None:
    written = _generator().generate(tmp_path)
    committed = ROOT / "services" / "v1"
    fresh = {p.name: p.read_bytes() for p in written}
    current = {p.name: p.read_bytes() for p in committed.iterdir() if p.is_file()}
    stale = sorted(n for n in fresh if current.get(n) != fresh[n])
    extra = sorted(set(current) - set(fresh))
    assert not stale, f"stale stubs (run `make protos`): {stale}"
    assert not extra, f"stubs with no .proto (remove them): {extra}"


def test_every_package_folder_is_packaged() -> None:
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    root = ROOT / "services"
    found = {
        ".".join(("jitgate", *init.parent.relative_to(root).parts))
        for init in root.rglob("__init__.py")
    }
    assert found == listed

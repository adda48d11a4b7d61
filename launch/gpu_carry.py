"""Writes the wheels that the lent GPU machine needs beyond its image, in pieces that each fit one transfer.

    python launch/gpu_carry.py                    # for the GPU image: Python 3.12, x86-64, into .carry/
    python launch/gpu_carry.py --python 3.11 --out DIR    # what `launch/gpu_check.sh rehearse` carries

What is carried: every runtime dependency of pyproject.toml, its ``serve`` extra (the server tests import it) and
its build requirement (setuptools: the project is built there offline, without build isolation), with their own
dependencies, wherever the image (launch/gpu_image.txt) lacks the package or has a version the requirement
excludes. DALI comes as the build for the image's CUDA 13 (nvidia-dali-cuda130 in place of nvidia-dali-cuda120).
The image's torch, torchvision and triton stay: they are its CUDA build, so a requirement they miss is reported,
not carried. Each package gets the newest release that its requirements allow.

Wheels are downloaded once into ~/.cache/dcris/carry/cpXY/ (manylinux x86-64 binaries; a package with only a
source release is built here when it builds to a pure-Python wheel), so a rerun is fast and offline. They are
packed into one tar split into OUT/piece0, OUT/piece1, ... of at most --piece-mb MB each, each piece beside a
copy of manifest.json (the wheels, the number of pieces and the tar's SHA-256). `launch/gpu_check.sh` takes one
piece a call and installs them all once the last has come (its header says how).
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections import deque
from pathlib import Path

from packaging import tags
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import NormalizedName, canonicalize_name, parse_wheel_filename
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "dcris" / "carry"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 4, -1)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64",
]  # fmt: skip  (pip matches each glibc version exactly: every one up to the image's)
IMAGE_CUDA_BUILDS = {"torch", "torchvision", "triton"}  # kept as the image has them
CUDA_BUILD_FOR_IMAGE = {"nvidia-dali-cuda120": "nvidia-dali-cuda130"}
SERVE_EXTRA = "serve"


class CarryError(Exception):
    """A requirement that cannot be met: one line for the user."""


def marker_environment(python: str) -> dict[str, str]:
    """PEP 508 marker values of CPython ``python`` (e.g. "3.12") on x86-64 Linux."""
    return dict(
        python_version=python, python_full_version=f"{python}.0", implementation_name="cpython",
        implementation_version=f"{python}.0", platform_python_implementation="CPython", sys_platform="linux",
        platform_system="Linux", platform_machine="x86_64", os_name="posix", platform_release="", platform_version="",
    )  # fmt: skip


def applies(req: Requirement, env: dict[str, str], extras: frozenset[str] = frozenset()) -> bool:
    """Whether ``req`` holds for the target (and, for a dependency's ``extra ==`` markers, for ``extras``)."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate(dict(env, extra=extra)) for extra in (extras or {""}))


def read_image(path: Path, env: dict[str, str]) -> dict[NormalizedName, Version | None]:
    """The image's packages for the target: name -> the version seen (None: not noted, taken to satisfy all)."""
    image: dict[NormalizedName, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        req = Requirement(line)
        if not applies(req, env):
            continue
        pins = [s.version for s in req.specifier if s.operator == "=="]
        image[canonicalize_name(req.name)] = Version(pins[0].removesuffix(".*")) if pins else None
    return image


def project_requirements(pyproject: Path) -> list[Requirement]:
    """pyproject.toml's dependencies, its serve extra and its build requirements, DALI for the image's CUDA."""
    data = tomllib.loads(pyproject.read_text())
    lines = [
        *data["project"]["dependencies"],
        *data["project"]["optional-dependencies"][SERVE_EXTRA],
        *data["build-system"]["requires"],
    ]
    reqs = [Requirement(line) for line in lines]
    for req in reqs:
        req.name = CUDA_BUILD_FOR_IMAGE.get(canonicalize_name(req.name), req.name)
    return reqs


def target_tags(python: str) -> set[tags.Tag]:
    version = tuple(int(p) for p in python.split("."))
    return set(tags.cpython_tags(version, platforms=PLATFORMS)) | set(
        tags.compatible_tags(version, f"cp{version[0]}{version[1]}", PLATFORMS)
    )


def requires_dist(wheel: Path) -> list[Requirement]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        metadata = email.parser.Parser().parsestr(zf.read(name).decode())
    return [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]


class WheelCache:
    """The target's wheels under ~/.cache/dcris/carry/cpXY/: the newest cached one that a requirement allows, or
    the newest release pip finds (a binary wheel for the target, else a pure-Python wheel built here)."""

    def __init__(self, python: str, directory: Path | None = None) -> None:
        self.python = python
        self.tags = target_tags(python)
        self.dir = directory or CACHE / f"cp{python.replace('.', '')}"
        self.dir.mkdir(parents=True, exist_ok=True)

    def find(self, req: Requirement) -> Path | None:
        name, found = canonicalize_name(req.name), []
        for path in self.dir.glob("*.whl"):
            wname, version, _, wtags = parse_wheel_filename(path.name)
            if wname == name and req.specifier.contains(version, prereleases=True) and wtags & self.tags:
                found.append((version, path))
        return max(found)[1] if found else None

    def get(self, req: Requirement) -> Path:
        cached = self.find(req)
        if cached is not None:
            return cached
        spec = f"{req.name}{req.specifier}"
        platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
        download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", self.python, "--implementation", "cp", *platforms, "-d", str(self.dir), spec]
        if subprocess.run(download, capture_output=True, text=True).returncode != 0:
            self._build_pure(req, spec)
        cached = self.find(req)
        if cached is None:
            raise CarryError(f"pip fetched no wheel of {spec} for Python {self.python} on x86-64 Linux")
        return cached

    def _build_pure(self, req: Requirement, spec: str) -> None:
        """A package without a binary wheel for the target: its source release built here, kept if pure."""
        with tempfile.TemporaryDirectory() as tmp:
            build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-binary", req.name, "-w", tmp, spec]
            done = subprocess.run(build, capture_output=True, text=True)
            wheels = list(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                raise CarryError(f"{spec}: no wheel for Python {self.python} on x86-64 Linux and no source build "
                                 f"({(done.stderr.strip().splitlines() or ['?'])[-1]})")  # fmt: skip
            if not parse_wheel_filename(wheels[0].name)[3] & self.tags:
                raise CarryError(f"{spec}: no wheel for Python {self.python}, and its source builds to the "
                                 f"machine-specific {wheels[0].name}")  # fmt: skip
            shutil.move(wheels[0], self.dir / wheels[0].name)


def resolve(
    reqs: list[Requirement], image: dict[NormalizedName, Version | None], cache: WheelCache, env: dict[str, str]
) -> tuple[dict[NormalizedName, Path], dict[NormalizedName, str], list[str]]:
    """The wheels to carry (name -> wheel), why each is carried, and notes on image packages a requirement
    misses but that stay. Each package gets the newest release its requirements allow: a walk over the
    requirements that starts again, with the requirement added, when one excludes a release already chosen."""
    bounds: dict[NormalizedName, SpecifierSet] = {}
    for _ in range(50):
        try:
            return _walk(reqs, image, cache, env, bounds)
        except _Excluded as exc:
            bounds[exc.name] = bounds.get(exc.name, SpecifierSet()) & exc.specifier
    raise CarryError("the requirements did not settle after 50 walks")


class _Excluded(Exception):
    def __init__(self, name: NormalizedName, specifier: SpecifierSet) -> None:
        self.name, self.specifier = name, specifier


def _walk(
    reqs: list[Requirement], image: dict[NormalizedName, Version | None], cache: WheelCache, env: dict[str, str],
    bounds: dict[NormalizedName, SpecifierSet],
) -> tuple[dict[NormalizedName, Path], dict[NormalizedName, str], list[str]]:  # fmt: skip
    """One breadth-first walk (see :func:`resolve`); raises _Excluded where a requirement excludes a choice."""
    chosen: dict[NormalizedName, Path] = {}
    why: dict[NormalizedName, str] = {}
    notes: list[str] = []
    queue: deque[tuple[Requirement, frozenset[str], str]] = deque((r, frozenset(), "pyproject.toml") for r in reqs)
    expanded: set[tuple[NormalizedName, frozenset[str]]] = set()
    while queue:
        req, extras, by = queue.popleft()
        if not applies(req, env, extras):
            continue
        name = canonicalize_name(req.name)
        if name in image and name not in chosen:
            seen = image[name]
            if seen is None or req.specifier.contains(seen, prereleases=True):
                continue
            if name in IMAGE_CUDA_BUILDS:
                notes.append(f"{by} asks for {req}; the image's {name} {seen} stays (its CUDA build)")
                continue
        if name in chosen:
            version = parse_wheel_filename(chosen[name].name)[1]
            if not req.specifier.contains(version, prereleases=True):
                if set(req.specifier) <= set(bounds.get(name, SpecifierSet())):  # already a bound: no way out
                    raise CarryError(f"{by} asks for {req}, but {name} {version} is what {why[name]} allows")
                raise _Excluded(name, req.specifier)
        else:
            bounded = Requirement(str(req))
            bounded.specifier &= bounds.get(name, SpecifierSet())
            chosen[name] = cache.get(bounded)
            have = "" if name not in image else f": the image has {image[name]}"
            why[name] = f"{by} ({req}{have})"
        key = (name, frozenset(req.extras))
        if key not in expanded:
            expanded.add(key)
            label = parse_wheel_filename(chosen[name].name)[0]
            queue.extend((dep, frozenset(req.extras), label) for dep in requires_dist(chosen[name]))
    return chosen, why, notes


def write_pieces(wheels: list[Path], out: Path, piece_bytes: int, python: str) -> dict:
    """One tar of ``wheels`` split into out/pieceK/carry.tar.K, each beside manifest.json; returns the manifest."""
    if out.exists() and any(out.iterdir()):
        if not (out / "manifest.json").is_file():
            raise CarryError(f"{out} holds other files: give --out an empty folder or an earlier carry's")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tar_path = out / "carry.tar"
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for wheel in wheels:
            tar.add(wheel, arcname=wheel.name)
    digest, size = hashlib.sha256(), tar_path.stat().st_size
    pieces = -(-size // piece_bytes)
    with tar_path.open("rb") as f:
        for k in range(pieces):
            chunk = f.read(piece_bytes)
            digest.update(chunk)
            (out / f"piece{k}").mkdir()
            (out / f"piece{k}" / f"carry.tar.{k}").write_bytes(chunk)
    tar_path.unlink()
    manifest = dict(
        python=python, pieces=pieces, tar_bytes=size, tar_sha256=digest.hexdigest(),
        wheels=[dict(file=w.name, bytes=w.stat().st_size) for w in wheels],
    )  # fmt: skip
    for k in range(pieces):
        (out / f"piece{k}" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch/gpu_carry.py", description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="3.12", help="the target's Python version (the GPU image's: 3.12)")
    parser.add_argument("--out", default=str(ROOT / ".carry"), help="where the pieces go (emptied first)")
    parser.add_argument("--piece-mb", type=int, default=55, help="largest piece, in MB (10^6 bytes)")
    parser.add_argument("--image", default=str(ROOT / "launch" / "gpu_image.txt"), help="the image's package list")
    args = parser.parse_args(argv)
    if not args.python.count(".") == 1 or not all(p.isdigit() for p in args.python.split(".")):
        parser.error(f"--python {args.python}: a version like 3.12")
    if args.piece_mb < 1:
        parser.error("--piece-mb must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = marker_environment(args.python)
    try:
        image = read_image(Path(args.image), env)
        chosen, why, notes = resolve(project_requirements(ROOT / "pyproject.toml"), image, WheelCache(args.python), env)
    except (CarryError, OSError) as exc:
        print(f"gpu_carry: {exc}", file=sys.stderr)
        return 1
    wheels = sorted(chosen.values(), key=lambda p: p.name.lower())
    try:
        manifest = write_pieces(wheels, Path(args.out), args.piece_mb * 10**6, args.python)
    except CarryError as exc:
        print(f"gpu_carry: {exc}", file=sys.stderr)
        return 1
    for name in sorted(chosen):
        print(f"{chosen[name].name:<72} {chosen[name].stat().st_size / 1e6:7.1f} MB  for {why[name]}")
    for note in notes:
        print(f"note: {note}")
    last = manifest["pieces"] - 1
    print(f"{len(wheels)} wheels for Python {args.python}, {manifest['tar_bytes'] / 1e6:.1f} MB in {last + 1} "
          f"piece(s) of at most {args.piece_mb} MB: {args.out}/piece0 .. piece{last}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

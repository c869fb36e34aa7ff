"""Static checks of the deployment: Dockerfiles (hadolint), Kubernetes manifests, pins that agree."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} is not installed (it is a test dependency: pip install -e .[test])"
    return path


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile.cpu", "docker/Dockerfile.gpu"])
def test_dockerfiles_pass_hadolint(dockerfile):
    proc = subprocess.run([_tool("hadolint"), str(ROOT / dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _validate(tmp_path: Path, manifest: dict | Path) -> subprocess.CompletedProcess:
    if isinstance(manifest, dict):
        path = tmp_path / f"{manifest['kind'].lower()}.yaml"
        path.write_text(yaml.safe_dump(manifest))
        manifest = path
    return subprocess.run([_tool("kubernetes-validate"), "--strict", str(manifest)], capture_output=True, text=True)


def test_grading_job_manifest_is_valid(tmp_path):
    for manifest in sorted((ROOT / "grading" / "k8s").glob("*.yaml")):
        proc = _validate(tmp_path, manifest)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_validator_rejects_a_broken_manifest(tmp_path):
    job = yaml.safe_load((ROOT / "grading" / "k8s" / "grade-job.yaml").read_text())
    job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"  # typo
    assert _validate(tmp_path, job).returncode != 0


def test_hub_gpu_profile_renders_to_a_valid_pod(tmp_path):
    """Render the z2jh GPU profile the way KubeSpawner would (the parts we set) and validate the Pod."""
    values = yaml.safe_load((ROOT / "docker" / "jupyterhub" / "values.yaml").read_text())
    single = values["singleuser"]
    gpu = next(p for p in single["profileList"] if "GPU" in p["display_name"])["kubespawner_override"]
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "jupyter-student"},
        "spec": {
            "securityContext": {"runAsUser": single["uid"], "fsGroup": single["fsGid"]},
            "tolerations": gpu["tolerations"],
            "volumes": gpu["volumes"],
            "containers": [{
                "name": "notebook", "image": gpu["image"],
                "resources": {"limits": {"cpu": str(gpu["cpu_limit"]), "memory": gpu["mem_limit"], **gpu["extra_resource_limits"]}},
                "env": [{"name": k, "value": v} for k, v in single["extraEnv"].items()],
                "volumeMounts": gpu["volume_mounts"],
            }],
        },
    }
    assert pod["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    proc = _validate(tmp_path, pod)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_file_parses_and_names_the_course_image():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert compose["services"]["hub"]["environment"]["LLMLAB_IMAGE"].startswith("llmlab/course-cpu:")


def test_torch_pin_agrees_everywhere():
    pins = {
        "pyproject [tool.llmlab]": tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["llmlab"]["torch"],
        "docker/install-course.sh": re.search(r"^TORCH_VERSION=(\S+)", (ROOT / "docker/install-course.sh").read_text(), re.M).group(1),
        "environment.yml": re.search(r"torch==(\S+)", (ROOT / "environment.yml").read_text()).group(1),
    }
    assert len(set(pins.values())) == 1, pins
    import torch

    assert torch.__version__.split("+")[0] == pins["docker/install-course.sh"]


def test_the_environment_has_its_bytecode_compiled():
    """install-course.sh compiles at install: a process that may not write bytecode (PYTHONDONTWRITEBYTECODE,
    the read-only sandbox) would otherwise compile every module it imports from source, at every start."""
    import importlib.util

    for module in ("torch", "torch.nn.modules.linear", "transformers", "transformers.models.llama.modeling_llama",
                   "transformers.models.bert.modeling_bert", "nbgrader", "nbformat", "llmlab.grading.worker"):
        source = importlib.util.find_spec(module).origin  # llmlab's: in lib/ (an editable install) or site-packages
        assert Path(importlib.util.cache_from_source(source)).is_file(), f"no bytecode for {source}"


IMPORTS = """
import importlib, pkgutil, sys, sysconfig
from pathlib import Path
import llmlab
for info in pkgutil.walk_packages(llmlab.__path__, "llmlab."):
    importlib.import_module(info.name)
import faiss, fastapi, gguf, ipykernel.kernelapp, matplotlib.pyplot, nbconvert.exporters, nbgrader.apps, papermill, peft, trl, uvicorn
import transformers
for name in ("LlamaForCausalLM", "BertModel", "GPT2LMHeadModel", "MixtralForCausalLM", "AutoModelForCausalLM"):
    getattr(transformers, name)
site = sysconfig.get_paths()["purelib"]
missing = [m.__file__ for m in list(sys.modules.values()) if (getattr(m, "__file__", None) or "").startswith(site)
           and m.__file__.endswith(".py") and not Path(importlib.util.cache_from_source(m.__file__)).is_file()]
print("\\n".join(sorted(missing)))
"""


def test_what_the_course_imports_has_bytecode():
    """The install leaves test suites and unused model families of transformers uncompiled; nothing the course imports is among them."""
    proc = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, env={"MPLBACKEND": "Agg", **os.environ})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not proc.stdout.strip(), "imported without bytecode (extend install-course.sh's list):\n" + proc.stdout[:3000]


def test_images_install_through_the_shared_script():
    for dockerfile in ("docker/Dockerfile.cpu", "docker/Dockerfile.gpu"):
        assert "docker/install-course.sh" in (ROOT / dockerfile).read_text()
    assert "docker/install-course.sh" in (ROOT / "Makefile").read_text()


def test_make_the_images_and_the_course_fill_the_asset_cache_with_one_command():
    """What to build is listed once, in the asset registry: every caller runs `llmlab build --missing`."""
    import inspect

    from llmlab import assets, cli

    built = [name for name, a in assets.REGISTRY.items() if a.builder]
    assert {"course-gpt", "tool-use-adapter"} <= set(built)
    makefile = (ROOT / "Makefile").read_text()
    test_recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    assert "llmlab build --missing" in test_recipe and "llmlab course" in makefile
    for path in ("Makefile", "docker/Dockerfile.cpu", "docker/Dockerfile.gpu"):
        text = (ROOT / path).read_text()
        assert path == "Makefile" or "llmlab build --missing" in text, path
        assert not any(re.search(rf"build {name}\b", text) for name in built), path
    course = inspect.getsource(cli.cmd_course)
    assert "assets.missing()" in course and not any(name in course for name in built)  # some built beside the labs

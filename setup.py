"""Build for mempo.

`kernels/` (Triton kernels) is installed as the subpackage `mempo.kernels`: the bare top-level
name `kernels` belongs to another PyPI project. The native extension `mempo._C` (csrc/) is
built here (C++ always, CUDA too when the installed torch has CUDA and nvcc is found); see
README "Native extension". MEMPO_BUILD_EXT=0 skips it: mempo then runs on its PyTorch paths.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

packages = find_packages(include=["mempo", "mempo.*"]) + ["mempo.kernels"]


def native_extension():
    """(ext_modules, cmdclass) building mempo._C from csrc/, or nothing if MEMPO_BUILD_EXT=0."""
    if os.environ.get("MEMPO_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:
        raise SystemExit(
            f"mempo's native extension (mempo._C) is built against the installed torch, which "
            f"could not be imported ({err}). Install torch first, then mempo without build "
            f"isolation:\n    pip install torch==2.13.0 && pip install --no-build-isolation -e .\n"
            f"(or set MEMPO_BUILD_EXT=0 to install without the extension)"
        ) from err
    here = os.path.dirname(os.path.abspath(__file__))

    def files(pattern: str) -> list[str]:  # relative to this file, as setuptools wants them
        return sorted(glob.glob(pattern, root_dir=here))

    sources = files("csrc/*.cpp") + files("csrc/cpu/*.cpp")
    # No -march: the hot loops carry their own AVX2/AVX-512 clones. No trapping math: lets GCC
    # turn the selects of the vector exp into blends, without which the AVX2 and SSE clones stay
    # scalar (values, NaN and inf are unchanged; only floating-point exception flags are not).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and shutil.which(
        os.path.join(CUDA_HOME, "bin", "nvcc")) is not None
    if with_cuda:
        sources += files("csrc/cuda/*.cu") + files("csrc/cuda/*.cpp")
        ext = CUDAExtension(
            "mempo._C", sources, include_dirs=[os.path.join(here, "csrc")],
            define_macros=[("MEMPO_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            "mempo._C", sources, include_dirs=[os.path.join(here, "csrc")],
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = native_extension()

setup(
    name="mempo",
    version="0.1.0",
    description="Performance-first MemPO (self-memory policy optimisation) trainer for LLM agents",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"mempo.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        # 2.13.0 is the CPU build the CI machines install from disk; the range admits the
        # GPU machine's 2.11 and never pulls a newer (CUDA) build on its own.
        "torch>=2.5,<2.14",
        "numpy",
        "transformers>=4.45",
        "tokenizers",
        "safetensors",
        "bm25s",
        # mempo.envs.retrieval_server; pure-Python wheels (h11, anyio, click), seconds to install
        "starlette>=0.37",
        "uvicorn>=0.30",
        "pyyaml",
        "rich",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "liger": ["liger-kernel>=0.5"],
        "vllm": ["vllm"],
        "flash-attn": ["flash-attn"],  # CUDA: flash_attn_with_kvcache for pure decode steps over the paged pool
        "parquet": ["pyarrow"],
        "tensorboard": ["tensorboard"],
        "wandb": ["wandb"],
        "bench": ["matplotlib"],  # the PNG plots of benchmarks/tiny_world.py
        # mempo.integrations (verl's policy-loss registry, TRL's GRPOTrainer); verl pins
        # transformers<5.11, so this extra moves transformers to 5.10.x
        "integrations": ["trl>=1.16,<2", "verl>=0.9.1,<0.10"],
        "test": ["pytest", "triton>=3.0", "liger-kernel>=0.5", "pyarrow", "ruff==0.17.6"],  # ruff: tests/test_style.py
    },
)

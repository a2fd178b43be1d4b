"""Build script for qmoe.

Native code comes in two optional-by-toolchain pieces:

* ``qmoe._codec_host``: the shared decode header ``codec/qmoe_codec.h`` compiled for the host with the
  C++ compiler, so CPU tests exercise exactly the logic the CUDA kernel runs. Always built.
* ``qmoe._cuda``: the CUDA decode+GEMM kernels in ``cuda/``, built when ``nvcc`` is found and
  ``QMOE_NO_CUDA`` is unset. It links the CUDA runtime statically and takes raw device pointers and
  a stream, so it needs no CUDA build of torch at build time. ``QMOE_CUDA_ARCHS`` overrides the
  target list (default ``80;86;89;90``).
"""
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
    import pybind11
except ImportError:  # pragma: no cover - pyproject lists pybind11 as a build requirement
    Pybind11Extension = None
    pybind11 = None

HERE = os.path.dirname(os.path.abspath(__file__))


def _nvcc():
    if os.environ.get("QMOE_NO_CUDA"):
        return None
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_root(nvcc):
    """The CUDA toolkit directory of ``nvcc``, asked from nvcc itself (it may be a wrapper script)."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, check=False).stderr
        for line in out.splitlines():
            if line.startswith("#$ _HERE_="):
                return os.path.dirname(line.split("=", 1)[1].strip())
    except OSError:
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


class BuildExt(build_ext):
    """Compiles ``.cu`` sources with nvcc, everything else with the default compiler."""

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if not cu_sources:
            return super().build_extension(ext)
        nvcc = _nvcc()
        archs = os.environ.get("QMOE_CUDA_ARCHS", "80;86;89;90").split(";")
        objects = []
        build_temp = os.path.join(self.build_temp, "cuda")
        os.makedirs(build_temp, exist_ok=True)
        for src in cu_sources:
            obj = os.path.join(build_temp, os.path.basename(src) + ".o")
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "--expt-relaxed-constexpr",
                   "-Xcompiler", "-fPIC", "-Werror", "all-warnings", "-Xcompiler", "-Wall",
                   "--threads", "0",  # one nvcc thread per target architecture
                   "-I", os.path.join(HERE, "codec"), "-I", os.path.join(HERE, "cuda")]
            for arch in archs:
                cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            objects.append(obj)
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        ext.extra_objects = list(ext.extra_objects or []) + objects
        cuda_root = _cuda_root(nvcc)
        for lib_dir in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                        os.path.join("targets", "sbsa-linux", "lib")):
            path = os.path.join(cuda_root, lib_dir)
            if os.path.exists(os.path.join(path, "libcudart_static.a")):
                ext.library_dirs = list(ext.library_dirs or []) + [path]
                break
        ext.libraries = list(ext.libraries or []) + ["cudart_static", "rt", "pthread", "dl"]
        # Keep the static runtime's symbols private whatever the toolkit's defaults: torch loads its own
        # libcudart globally, and exported cuda* symbols here would let the dynamic linker mix the two.
        ext.extra_link_args = list(ext.extra_link_args or []) + ["-Wl,--exclude-libs,ALL"]
        super().build_extension(ext)


def extensions():
    if Pybind11Extension is None:
        return []
    exts = [
        Pybind11Extension(
            "qmoe._codec_host",
            ["cuda/host_binding.cpp"],
            include_dirs=[os.path.join(HERE, "codec")],
            cxx_std=17,
            extra_compile_args=["-O3", "-Wall", "-Werror"],
        )
    ]
    if _nvcc() is not None:
        exts.append(
            Pybind11Extension(
                "qmoe._cuda",
                ["cuda/binding.cpp", "cuda/ternary_gemm.cu"],
                include_dirs=[os.path.join(HERE, "codec"), os.path.join(HERE, "cuda")],
                cxx_std=17,
                extra_compile_args=["-O3", "-Wall", "-Werror"],
            )
        )
    return exts


setup(
    name="qmoe",
    version="0.1.0",
    description="Sub-1-bit compression and inference for Switch Transformer Mixture-of-Experts models",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["qmoe", "qmoe.*"]),
    package_data={"qmoe": ["assets/*", "assets/**/*"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "numba>=0.59",
        "huggingface-hub>=0.24",
        "safetensors>=0.4",
        "zstandard>=0.22",
        "sentencepiece>=0.2",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": ["pytest>=8", "transformers==4.57.6"],
        "data": ["datasets>=2.18"],
        "plot": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["qmoe=qmoe.cli:main"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)

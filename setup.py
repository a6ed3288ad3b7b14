"""Builds amoeba_core and its extension amoeba_core._C through CMake.

Environment knobs:
  AMOEBA_CUDA=AUTO|ON|OFF      compile the CUDA byte engine (AUTO: when nvcc is found; default)
  AMOEBA_CUDA_ARCHITECTURES    e.g. "80;90" (default)
  CMAKE_BUILD_PARALLEL_LEVEL   parallel compile jobs
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        cuda = os.environ.get("AMOEBA_CUDA", "AUTO").upper()
        archs = os.environ.get("AMOEBA_CUDA_ARCHITECTURES", "80;90")
        configure = [
            "cmake", str(ROOT), f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DAMOEBA_CUDA={cuda}", f"-DAMOEBA_CUDA_ARCHITECTURES={archs}", "-DCMAKE_BUILD_TYPE=Release",
        ]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)
        summary = [line for line in (build_dir / "CMakeCache.txt").read_text().splitlines()
                   if line.startswith("AMOEBA_CUDA")]
        print("amoeba_core: built", self.get_ext_fullpath(ext.name), "with", "; ".join(summary))


setup(ext_modules=[CMakeExtension("amoeba_core._C")], cmdclass={"build_ext": CMakeBuild})

"""Package layout that pyproject.toml cannot express: `plugins/` installs as `dspark_trt_plugins`.

The design fixes `plugins/` as the home of the DSparkVerify op (torch reference, Triton kernel,
TensorRT plugin, ONNX Runtime op); a top-level package called `plugins` would collide with other
projects, so it is installed under a name of its own.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["dspark_trt", "dspark_trt.*"]) + ["dspark_trt_plugins"],
    package_dir={"dspark_trt_plugins": "plugins"},
)

"""Build script: packages ``ctal`` (and the Triton kernels in ``kernels/`` as ``ctal.kernels``)."""
from setuptools import find_packages, setup

packages = find_packages(include=["ctal", "ctal.*"]) + ["ctal.kernels"]
setup(packages=packages, package_dir={"ctal.kernels": "kernels"},
      package_data={"ctal": ["configs/*.yaml"]})

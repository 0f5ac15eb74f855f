"""Packaging that pyproject.toml cannot express: every package under pl_i2f/, plus the repository's top-level
callbacks/ folder (which the app imports as ``callbacks``) installed as ``pl_i2f.callbacks`` — one import path
for library users and no generic top-level name in site-packages. The project's metadata is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["pl_i2f", "pl_i2f.*"]), "pl_i2f.callbacks"],
    package_dir={"pl_i2f.callbacks": "callbacks"},
)

"""Package discovery: every package under thinpool/ and thinpool_bench/ (and cli/, as thinpool_cli) lands in the
wheel.

The metadata lives in pyproject.toml; this file only computes the package list, so that a new subpackage can
never be left out of a non-editable install.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["thinpool", "thinpool.*", "thinpool_bench", "thinpool_bench.*"])
packages += ["thinpool_cli" + p[len("cli"):] for p in find_packages(include=["cli", "cli.*"])]
package_dir = {"thinpool_cli": "cli"}

setup(packages=packages, package_dir=package_dir, package_data={"thinpool": ["py.typed"]})

"""A non-editable install (`pip install .`) ships the bundled shapes teacher, its evaluation models and the shapes
configs as package data under stepdistill/_bundled, so `stepdistill train` and evaluate work from any directory
(stepdistill.utils.bundled_path looks there first, then in the source tree an editable install runs from).
Everything else is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BUNDLED = ("configs/shapes", "assets/shapes-teacher", "assets/shapes-teacher-v", "assets/shapes-flow-teacher",
           "assets/shapes-eval")


class BuildPyWithBundled(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads them from the source tree
            return
        root = Path(__file__).resolve().parent
        for rel in BUNDLED:
            if (root / rel).is_dir():
                shutil.copytree(root / rel, Path(self.build_lib) / "stepdistill" / "_bundled" / rel,
                                dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildPyWithBundled})

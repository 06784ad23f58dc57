"""The package's metadata says what is there: one version, package data that exists."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import service

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_version_is_written_once() -> None:
    assert "version" not in PROJECT["project"]
    assert PROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "service.__version__"}
    assert version("jdcloud-image-sync") == service.__version__


def test_every_package_data_pattern_names_files_that_exist() -> None:
    for package, patterns in PROJECT["tool"]["setuptools"]["package-data"].items():
        for pattern in patterns:
            assert list((ROOT / package).glob(pattern)), f"{package}/{pattern} matches nothing"

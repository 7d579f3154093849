"""Packaging metadata: one version, a license, the frameworks' own import helpers."""

from __future__ import annotations

import configparser
import subprocess
import sys

import mutexowner
from tests.contrib.helpers import REPO


def test_the_version_is_defined_once_and_shown_by_the_cli() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg", encoding="utf-8")
    assert config["metadata"]["version"] == "attr: mutexowner.__version__"
    done = subprocess.run(
        [sys.executable, "-m", "mutexowner.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and done.stdout.strip() == f"mutexowner {mutexowner.__version__}"


def test_license_and_author_metadata() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg", encoding="utf-8")
    metadata = config["metadata"]
    assert metadata["license"] == "MIT" and metadata["license_files"] == "LICENSE"
    assert metadata["author"] == "mutexowner contributors"
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n") and "mutexowner contributors" in text

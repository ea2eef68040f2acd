"""No path of one machine: the shared material is found relative to the checkout or through
an environment variable (issue 15, item 8)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from asib_core import paths

ROOT = Path(__file__).resolve().parents[1]


def test_the_shared_folder_is_next_to_the_checkout_unless_the_environment_says_otherwise(monkeypatch, tmp_path):
    monkeypatch.delenv("ASIB_SHARED_DIR", raising=False)
    monkeypatch.delenv("ASIB_CIFAR10_JPEG_TAR", raising=False)
    assert paths.shared_dir() == ROOT.parent / "shared"
    assert paths.cifar10_jpeg_tarball() == ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"
    monkeypatch.setenv("ASIB_SHARED_DIR", str(tmp_path))
    assert paths.cifar10_jpeg_tarball() == tmp_path / "data/cifar10-jpeg.tar.gz"
    monkeypatch.setenv("ASIB_CIFAR10_JPEG_TAR", str(tmp_path / "c.tgz"))
    assert paths.cifar10_jpeg_tarball() == tmp_path / "c.tgz"


def test_no_tracked_file_names_an_absolute_path_of_the_development_machine():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"(?<![\w.])/(work|home/\w+|Users/\w+)/")
    found = [f"{name}:{number}" for name in files if Path(ROOT / name).suffix in {".py", ".md", ".yaml", ".yml", ".toml"}
             for number, line in enumerate((ROOT / name).read_text(encoding="utf-8").splitlines(), 1)
             if pattern.search(line)]
    assert found == []

"""What a user installs: the distribution's name everywhere it is written, the license, Lightning optional."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from memguard.errors import DISTRIBUTION, MissingDependencyError, require

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _documents() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", *ROOT.glob("examples/**/*.*"),
             *ROOT.glob("memguard/**/*.py"), *ROOT.glob("benchmarks/*.md")]
    return [f for f in files if f.suffix in (".md", ".py", ".yml", ".yaml", ".sh")]


def test_the_distribution_name_is_ours_everywhere():
    assert _pyproject()["project"]["name"] == DISTRIBUTION == "memguard-train"
    assert _pyproject()["project"]["scripts"] == {"memguard": "memguard.cli:main"}
    seen = 0
    # every requirement named after `pip install` that starts with "memguard" must be ours
    for path in _documents():
        for line in path.read_text().splitlines():
            for args in re.findall(r"pip install ([^`\n]*)", line):
                for word in re.split(r"&&|;|\|", args)[0].split():
                    req = word.strip("'\"")
                    if req.startswith("memguard"):
                        seen += 1
                        name = re.split(r"[\[<>=!~;]", req)[0]
                        assert name == "memguard-train", f"{path}: {line.strip()}"
    assert seen >= 5  # README, the CI example, the error hints


def test_missing_dependency_hint_names_our_distribution(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'memguard-train\[plot\]'"):
        require("matplotlib", "plot", "memguard plot")


def test_license_file_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    assert _pyproject()["project"]["license"] == "Apache-2.0"
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text
    assert len(text.splitlines()) == 201


def test_lightning_is_an_extra_and_the_dev_extra_has_both_packages():
    project = _pyproject()["project"]
    deps = [re.split(r"[<>=!~\[ ]", d)[0] for d in project["dependencies"]]
    assert "pytorch-lightning" not in deps and "lightning" not in deps
    extras = project["optional-dependencies"]
    assert extras["lightning"] == ["lightning>=2.2"]
    assert extras["pytorch-lightning"] == ["pytorch-lightning>=2.2"]
    dev = [re.split(r"[<>=!~\[ ]", d)[0] for d in extras["dev"]]
    assert {"lightning", "pytorch-lightning", "matplotlib", "peft", "pytest"} <= set(dev)


def test_import_memguard_without_lightning_and_memguard_says_what_to_install():
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None\n"
        "sys.modules['pytorch_lightning'] = None\n"
        "import memguard\n"
        "from memguard.integrations.transformers import MemGuardCallback\n"
        "try:\n"
        "    from memguard import MemGuard\n"
        "except memguard.MissingDependencyError as exc:\n"
        "    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ("MemGuard (the Lightning callback) needs Lightning, which is not installed; install it "
                           "with: pip install 'memguard-train[lightning]' (or pytorch-lightning, if your code "
                           "imports pytorch_lightning)\n")

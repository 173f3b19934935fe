"""`make data`: Debian's dataset-fashion-mnist through apt-get (stubbed here), then the one-time assets
(difflab.cli.assets: the feature classifier), idempotent. Nothing here needs Fashion-MNIST itself."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from difflab.cli.assets import main, prepare_assets

ROOT = Path(__file__).resolve().parents[1]


def test_assets_train_the_classifier_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DIFFLAB_CLASSIFIER_OVERRIDES", "trainer.max_steps=5")
    path = prepare_assets("digits", cache_dir=tmp_path)  # conf/data/digits.yaml: 8 px
    assert path == tmp_path / "classifiers" / "digits_8px.ckpt" and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert main(["digits", "--cache-dir", str(tmp_path)]) == 0  # found: nothing is trained again
    assert path.stat().st_mtime_ns == stamp and "already there" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"data='cifar10' has no one-time assets; choose one of \('digits', 'mnist'"):
        prepare_assets("cifar10", cache_dir=tmp_path)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_data_installs_with_apt_get_then_stops_by_name_without_the_files(tmp_path):
    """As root with a stub apt-get (which installs nothing), a package dir that stays empty and no files under
    data/: make data asks apt-get for dataset-fashion-mnist, then the assets step exits 2 naming the package."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    log = tmp_path / "apt.log"
    (stubs / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (stubs / "id").write_text("#!/bin/sh\necho 0\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "DIFFLAB_CACHE_DIR": str(tmp_path / "cache"),
           "DIFFLAB_DATA_DIR": str(tmp_path / "data"), "DIFFLAB_CLASSIFIER_OVERRIDES": "data.system_dir=null "
           "data.download=false"}
    proc = subprocess.run(["make", "--no-print-directory", "-o", ".venv/.difflab-installed", "data",
                           f"FASHION_MNIST_DIR={tmp_path / 'none'}", f"BIN={Path(sys.executable).parent}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert log.read_text().splitlines() == ["install -y -q dataset-fashion-mnist"]
    assert proc.returncode != 0, proc.stdout
    assert "fashion_mnist: FashionMNISTDataModule: training files not found" in proc.stderr
    assert "apt-get install dataset-fashion-mnist" in proc.stderr
    assert not (tmp_path / "cache" / "classifiers" / "fashion_mnist_32px.ckpt").exists()

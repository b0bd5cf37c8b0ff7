"""Digits preparation, both loader backends, rank shards and bad-input errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guard_fast.data import build_loader
from guard_fast.data.digits import prepare_digits, stratified_split
from guard_fast.data.folder import ShardSampler, read_rgb, scan_folder, to_tensor
from guard_fast.data.presets import DATASETS
from guard_fast.runtime.config import DataConfig
from guard_fast.runtime.errors import GuardFastError
from tests.conftest import PYTHON, REPO, subprocess_env


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "launchers.cli", *args], capture_output=True, text=True,
                          env=subprocess_env(), cwd=REPO, timeout=300)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0
    # progress bars and library warnings also go to stderr; the error itself is one line
    lines = [ln for ln in r.stderr.strip().splitlines() if "error" in ln.lower()]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    return lines[0]


@pytest.fixture(scope="module")
def beton_dir(digits_dir, tmp_path_factory) -> Path:
    from guard_fast.data.ffcv_backend import write_beton

    root = tmp_path_factory.mktemp("beton")
    for split in ("train", "val"):
        write_beton(digits_dir / split, root / f"{split}.beton", mode="raw", workers=1)
    return root


# ------------------------------------------------------------------------------------------------------- digits

def test_digits_counts_and_split(digits_dir):
    m = json.loads((digits_dir / "manifest.json").read_text())
    assert (m["train"], m["val"]) == (1438, 359)
    train, val = set(m["train_ids"]), set(m["val_ids"])
    assert not train & val and len(train | val) == 1797
    for split, n in (("train", 1438), ("val", 359)):
        classes, samples = scan_folder(digits_dir / split)
        assert classes == [str(c) for c in range(10)] and len(samples) == n
    per_class = {c: m["counts"]["train"][c] + m["counts"]["val"][c] for c in m["counts"]["val"]}
    from sklearn.datasets import load_digits

    values, counts = np.unique(load_digits().target, return_counts=True)
    assert per_class == {str(c): int(k) for c, k in zip(values, counts, strict=True)}
    for c, k in per_class.items():  # stratified: each class holds out round(20%)
        assert m["counts"]["val"][c] == round(k * 0.2)
    img = Image.open(next((digits_dir / "val" / "3").iterdir()))
    assert img.mode == "RGB" and img.size == (32, 32)


def test_split_stable_and_seeded():
    labels = np.repeat(np.arange(5), 20)
    a, b, c = stratified_split(labels, 0.2, 0), stratified_split(labels, 0.2, 0), stratified_split(labels, 0.2, 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


def test_prepare_is_idempotent(digits_dir):
    before = (digits_dir / "manifest.json").stat().st_mtime_ns
    prepare_digits(digits_dir, size=32, val_fraction=0.2, seed=0)
    assert (digits_dir / "manifest.json").stat().st_mtime_ns == before


def test_digits_preset_statistics(digits_dir):
    pix = torch.cat([torch.stack([to_tensor(read_rgb(p)) for p, _ in scan_folder(digits_dir / s)[1]])
                     for s in ("train", "val")])
    spec = DATASETS["digits"]
    assert abs(pix.mean().item() - spec.mean[0]) < 0.005 and abs(pix.std().item() - spec.std[0]) < 0.005


# ---------------------------------------------------------------------------------------------------- loaders

def test_torch_loader_batches_and_determinism(digits_dir):
    cfg = DataConfig(path=str(digits_dir), workers=0, batch_size=32)
    loader = build_loader(cfg, "train", seed=3)
    assert len(loader) == 1438 // 32
    x, y = next(iter(loader))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0 and x.max() <= 1
    x_again, y_again = next(iter(build_loader(DataConfig(path=str(digits_dir), workers=2, batch_size=32), "train",
                                              seed=3)))
    assert torch.equal(x, x_again) and torch.equal(y, y_again)  # same views whatever the worker count
    loader.set_epoch(1)
    x1, _ = next(iter(loader))
    assert not torch.equal(x, x1)
    val = list(build_loader(cfg, "val"))
    assert sum(len(b[1]) for b in val) == 359  # val keeps the last partial batch


def test_ffcv_raw_round_trip_is_bit_exact(digits_dir, beton_dir):
    cfg = DataConfig(path=str(beton_dir), backend="ffcv", workers=1, eval_batch_size=100)
    batches = list(build_loader(cfg, "val"))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    _, samples = scan_folder(digits_dir / "val")
    expect = torch.stack([to_tensor(read_rgb(p)) for p, _ in samples])
    assert torch.equal(x, expect)
    assert y.tolist() == [label for _, label in samples]


def test_backends_agree(digits_dir, beton_dir):
    t = build_loader(DataConfig(path=str(digits_dir), workers=0), "val")
    f = build_loader(DataConfig(path=str(beton_dir), backend="ffcv", workers=1), "val")
    (xt, yt), (xf, yf) = next(iter(t)), next(iter(f))
    assert torch.equal(yt, yf) and xt.shape == xf.shape and xf.dtype == xt.dtype
    assert torch.equal(xt, xf)  # native size, crop ratio 1: both return the stored pixels
    assert len(t) == len(f) and t.num_classes == f.num_classes == 10
    tr = build_loader(DataConfig(path=str(beton_dir), backend="ffcv", workers=1), "train")
    xb, yb = next(iter(tr))
    assert xb.shape == (64, 3, 32, 32) and 0 <= xb.min() and xb.max() <= 1 and yb.dtype == torch.int64
    assert len(tr) == len(build_loader(DataConfig(path=str(digits_dir), workers=0), "train"))


@pytest.mark.parametrize("n, world", [(10, 2), (11, 2), (359, 3)])
def test_shard_sampler_disjoint_and_complete(n, world):
    for shuffle, even in ((True, True), (False, False)):
        shards = []
        for r in range(world):
            s = ShardSampler(n, r, world, shuffle=shuffle, seed=5, even=even)
            s.set_epoch(2)
            shards.append(s.indices())
            assert len(shards[-1]) == len(s)
        flat = [i for sh in shards for i in sh]
        assert len(flat) == len(set(flat))
        assert len(flat) == (n - n % world if even else n)


SHARD_SCRIPT = """
import json, sys, torch
from guard_fast.runtime.config import DataConfig
from guard_fast.data import build_loader
from guard_fast.runtime.distributed import init_distributed, all_gather_objects, teardown
info = init_distributed()
out = {}
for backend, path in (("torch", sys.argv[1]), ("ffcv", sys.argv[2])):
    cfg = DataConfig(path=path, backend=backend, workers=1, eval_batch_size=50)
    ids = []
    for x, y in build_loader(cfg, "val", rank=info.rank, world=info.world):
        ids += [round(float(v), 6) for v in x.flatten(1).sum(1)]  # content fingerprint of each image
    out[backend] = all_gather_objects(ids)
if info.rank == 0:
    print("RESULT " + json.dumps(out))
teardown()
"""


@pytest.mark.multirank
@pytest.mark.subprocess
def test_two_gloo_ranks_get_disjoint_shards(digits_dir, beton_dir, tmp_path):
    script = tmp_path / "shards.py"
    script.write_text(SHARD_SCRIPT)
    r = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
                        str(script), str(digits_dir), str(beton_dir)], capture_output=True, text=True,
                       env=subprocess_env(), cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    single = [round(float(v), 6) for x, _ in build_loader(DataConfig(path=str(digits_dir), workers=0), "val")
              for v in x.flatten(1).sum(1)]
    for backend in ("torch", "ffcv"):
        a, b = result[backend]
        assert len(a) + len(b) == 359 and abs(len(a) - len(b)) <= 1
        assert sorted(a + b) == sorted(single)  # the union is the full set, each image once
        assert a == single[0::2] and b == single[1::2]  # rank r takes positions r, r+2, ...


# ---------------------------------------------------------------------------------------------- bad input

@pytest.fixture
def small_folder(digits_dir, tmp_path) -> Path:
    root = tmp_path / "small"
    for split in ("train", "val"):
        for c in ("0", "1", "2"):
            dst = root / split / c
            dst.mkdir(parents=True)
            for p in sorted((digits_dir / split / c).iterdir())[:4]:
                shutil.copy(p, dst / p.name)
    return root


@pytest.mark.subprocess
def test_missing_path_errors(tmp_path):
    with pytest.raises(GuardFastError, match="data.path: .*nowhere/train not found"):
        build_loader(DataConfig(path=str(tmp_path / "nowhere")), "train")
    msg = one_line_error(cli("data", "to-ffcv", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")))
    assert "image folder not found" in msg and "nowhere" in msg


def test_empty_class_folder(small_folder):
    (small_folder / "train" / "3").mkdir()
    with pytest.raises(GuardFastError, match="train/3: empty class folder"):
        build_loader(DataConfig(dataset="imagefolder", path=str(small_folder), image_size=32), "train")


@pytest.mark.subprocess
def test_truncated_image_named_or_skipped(small_folder, tmp_path):
    bad = small_folder / "val" / "1" / "zz_truncated.png"
    good = next((small_folder / "val" / "1").iterdir()).read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    cfg = DataConfig(dataset="imagefolder", path=str(small_folder), image_size=32, workers=0)
    with pytest.raises(GuardFastError, match="unreadable image .*zz_truncated.png"):
        list(build_loader(cfg, "val"))
    cfg.skip_corrupt = True
    loader = build_loader(cfg, "val")
    n = sum(len(y) for _, y in loader)
    assert n == 12 and loader.skipped == 1
    msg = one_line_error(cli("data", "to-ffcv", "--src", str(small_folder / "val"), "--out",
                             str(tmp_path / "v.beton")))
    assert "zz_truncated.png" in msg and not (tmp_path / "v.beton").exists()


def test_grayscale_and_rgba_are_converted(small_folder):
    d = small_folder / "val" / "0"
    Image.new("L", (20, 24), 128).save(d / "gray.png")
    Image.new("RGBA", (24, 20), (10, 20, 30, 40)).save(d / "rgba.png")
    Image.new("P", (32, 32)).save(d / "palette.png")
    cfg = DataConfig(dataset="imagefolder", path=str(small_folder), image_size=16, workers=0, crop_ratio=1.0)
    x, y = next(iter(build_loader(cfg, "val", batch_size=64)))
    assert x.shape == (15, 3, 16, 16)


def test_class_count_mismatch(small_folder, beton_dir):
    with pytest.raises(GuardFastError, match="3 class folders, but the config/preset says 10 classes"):
        build_loader(DataConfig(path=str(small_folder)), "val")
    with pytest.raises(GuardFastError, match="labels go up to 9, but the config/preset says 4 classes"):
        build_loader(DataConfig(path=str(beton_dir), backend="ffcv", num_classes=4), "val")


def test_unreadable_beton(tmp_path):
    (tmp_path / "val.beton").write_bytes(b"not a beton file at all" * 10)
    with pytest.raises(GuardFastError, match="unreadable .beton file .*val.beton"):
        build_loader(DataConfig(path=str(tmp_path), backend="ffcv"), "val")

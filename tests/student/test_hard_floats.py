"""The stored distilled set is its float tensors: students train on them by default (as the authors' evaluate_synset,
which gets the optimized tensors), quantize = true trains on the 8-bit PNG view, exactly as a PNG-only set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from guard_fast.data.synthetic import FLOATS, load_synthetic, to_uint8, write_synthetic
from guard_fast.runtime.config import load_config
from guard_fast.runtime.errors import GuardFastError
from tests.conftest import ONE

ITEMS = [{"label": c, "ipc_index": k} for c in range(10) for k in range(2)]


def floats() -> torch.Tensor:
    """Pixel-unit floats well off the 8-bit grid and partly outside [0, 1] (unclamped, as DC's noise init)."""
    return torch.randn((20, 3, 16, 16), generator=torch.Generator().manual_seed(0)) * 0.6 + 0.5


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("float-sets")
    x = floats()
    names = [str(c) for c in range(10)]
    write_synthetic(root / "float", to_uint8(x), [dict(i) for i in ITEMS], names, {"ipc": 2}, floats=x)
    write_synthetic(root / "png", to_uint8(x), [dict(i) for i in ITEMS], names, {"ipc": 2})
    return {"float": root / "float", "png": root / "png"}


def test_float_set_round_trips_and_is_checked(sets, tmp_path):
    s = load_synthetic(sets["float"], 10)
    assert torch.equal(s.floats, floats()) and s.floats.min() < 0 and s.floats.max() > 1
    assert torch.equal(s.train_pixels(), s.floats) and torch.equal(s.train_pixels(quantize=True), s.pixels / 255)
    png = load_synthetic(sets["png"], 10)
    assert png.floats is None and png.content_hash == s.content_hash  # the same 8-bit view
    torch.testing.assert_close(png.train_pixels(), s.train_pixels(quantize=True), rtol=0, atol=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in sets["float"].rglob("*"):
        if p.is_file():
            (bad / p.relative_to(sets["float"])).parent.mkdir(parents=True, exist_ok=True)
            (bad / p.relative_to(sets["float"])).write_bytes(p.read_bytes())
    blob = torch.load(bad / FLOATS, weights_only=True)
    blob["pixels"][0, 0, 0, 0] += 1e-3
    torch.save(blob, bad / FLOATS)
    with pytest.raises(GuardFastError, match="float images differ"):
        load_synthetic(bad, 10)


def train(digits_dir: Path, images: Path, out: Path, *extra: str) -> dict:
    from guard_fast.student.hard import HardTrainConfig, run_train_hard

    args = [f"--data.path={digits_dir}", "--data.image_size=16", "--data.workers=0", "--data.eval_batch_size=128",
            "--output.progress=false", "--model.width=4", f"--images={images}", f"--output.dir={out}",
            "--batch_size=8", "--optim.epochs=2", "--augment=dsa", "--val_batches=1", *extra]
    return run_train_hard(load_config(HardTrainConfig, None, args), ONE)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "student.pt", weights_only=True)


def test_students_train_on_floats_unless_quantized(digits_dir, sets, tmp_path):
    assert train(digits_dir, sets["float"], tmp_path / "f")["trained_on"] == "floats"
    assert train(digits_dir, sets["float"], tmp_path / "q", "--quantize=true")["trained_on"] == "8-bit"
    assert train(digits_dir, sets["png"], tmp_path / "p")["trained_on"] == "8-bit"
    f, q, p = weights(tmp_path / "f"), weights(tmp_path / "q"), weights(tmp_path / "p")
    assert all(torch.equal(q[k], p[k]) for k in q)  # quantize = the PNG-only set, bit for bit
    assert any(not torch.allclose(f[k], q[k]) for k in f)  # the floats are another training set
    assert json.loads((tmp_path / "f/config.json").read_text())["dsa_space"] == "normalized"

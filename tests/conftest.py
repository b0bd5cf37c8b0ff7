"""Shared fixtures: the bundled digits (prepared once per session), digits subsets, tiny models, and the toy SRe2L
chain (teacher -> recovered set -> relabeled set) that several areas test against.

Markers (pyproject.toml): `subprocess` (starts a process: a launcher, torchrun, deepspeed), `multirank` (several ranks),
`slow`. `make test-fast` runs everything else, in-process and under two minutes; `make test` runs all of it (CI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guard_fast.runtime.config import DataConfig, load_config
from guard_fast.runtime.distributed import DistInfo

# torch.compile's inductor otherwise compiles in a pool of worker processes: in-process keeps the fast lane free of
# subprocesses (its guard below refuses them) and a 2-core machine free of a pool per test process.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
ONE = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
"""one CPU process, for calling a stage's run function in-process"""


def subprocess_env() -> dict[str, str]:
    """Environment for launching the project's scripts in subprocesses (single-threaded, repo importable)."""
    env = dict(os.environ)
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)  # left by an in-process 1-rank group (engine.ensure_process_group); the child makes its own
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


LAUNCHERS = ("python", "torchrun", "deepspeed")


def _inductor_load_probe(args) -> bool:
    """torch.compile's one-off check that its compiled vector-ISA test library loads (`python -c` running
    cdll.LoadLibrary, torch/_inductor/cpu_vec_isa.py `_probe_load`): a machine whose inductor cache is fresh runs it
    on its first compile (a warm cache skips it), so it is torch's probe, not a launch of ours."""
    return (isinstance(args, (list, tuple)) and len(args) == 3 and args[1] == "-c"
            and "cdll.LoadLibrary" in str(args[2]))


def _guard_launches(message: str):
    """Patch subprocess.Popen so launching Python (a launcher, torchrun, deepspeed) raises `message`; other
    programs (git) still run. Returns the original __init__."""
    real = subprocess.Popen.__init__

    def guarded(self, args, *a, **k):
        first = Path(str(args[0] if isinstance(args, (list, tuple)) else str(args).split()[0])).name
        if (first.startswith(LAUNCHERS) or first == Path(PYTHON).name) and not _inductor_load_probe(args):
            raise AssertionError(f"{message} (it starts {first!r})")
        real(self, args, *a, **k)

    subprocess.Popen.__init__ = guarded
    return real


def pytest_configure(config):
    """In the fast lane (`-m "not subprocess ..."`) nothing may launch Python, fixtures of any scope included."""
    if "not subprocess" in (config.getoption("markexpr") or ""):
        _guard_launches("the fast lane launched Python: mark the tests using this test or fixture "
                        "@pytest.mark.subprocess")


@pytest.fixture(autouse=True)
def _processes_are_marked(request):
    """A test that launches Python must carry @pytest.mark.subprocess, so the fast lane really runs in-process
    (fixtures of a wider scope run before this guard; the fast lane's session-wide guard covers them)."""
    if request.node.get_closest_marker("subprocess") is not None:
        yield
        return
    real = _guard_launches(f"{request.node.nodeid}: mark it @pytest.mark.subprocess")
    try:
        yield
    finally:
        subprocess.Popen.__init__ = real


def copy_subset(digits_dir: Path, root: Path, per_class: dict[str, int]) -> Path:
    """The first per_class[split] images of every class of each split, copied under root."""
    for split, k in per_class.items():
        for c in sorted(p.name for p in (digits_dir / split).iterdir()):
            dst = root / split / c
            dst.mkdir(parents=True)
            for p in sorted((digits_dir / split / c).iterdir())[:k]:
                shutil.copy(p, dst / p.name)
    return root


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn digits as a 32 px RGB ImageFolder (train/ and val/), prepared once per test session."""
    from guard_fast.data.digits import prepare_digits

    root = tmp_path_factory.mktemp("digits")
    prepare_digits(root, size=32, val_fraction=0.2, seed=0)
    return root


@pytest.fixture(scope="session")
def digits_subset(digits_dir, tmp_path_factory):
    """digits_subset(train, val): the first `train` / `val` images of every class, copied once per session per size
    (read-only for tests: copy it again with copy_subset to damage it)."""
    made: dict[tuple[int, int], Path] = {}

    def get(train: int, val: int) -> Path:
        if (train, val) not in made:
            made[train, val] = copy_subset(digits_dir, tmp_path_factory.mktemp(f"digits_{train}_{val}"),
                                           {"train": train, "val": val})
        return made[train, val]

    return get


@pytest.fixture(scope="session")
def tiny_fmnist(tmp_path_factory) -> Path:
    """A tiny Fashion-MNIST folder as `prepare-fashion-mnist` writes it (60 train / 20 test IDX images, no holdout)."""
    from guard_fast.data.mnist import prepare_mnist_family
    from tests.data.test_mnist import write_idx_set

    root = tmp_path_factory.mktemp("fm")
    write_idx_set(root / "idx", n_train=60, n_test=20)
    prepare_mnist_family("fashion-mnist", root / "data", "idx", root / "idx", holdout_fraction=0)
    return root / "data"


@pytest.fixture
def tiny_model():
    """Factory for a width-8 ResNet-18 on [0,1] images (seeded inside the fixture, not at import)."""
    from guard_fast.models import build_model

    def make(num_classes: int = 10, arch: str = "resnet18-cifar", width: int = 8, seed: int = 0, double=False):
        torch.manual_seed(seed)
        model = build_model(arch, num_classes, (0.2, 0.3, 0.4), (0.3, 0.25, 0.2), width=width)
        return model.double() if double else model

    return make


# ---------------------------------------------------------------------------------------------------------------
# The toy SRe2L chain (tests/chain.py runs the stages)


@pytest.fixture(scope="session")
def teacher(digits_dir, tmp_path_factory) -> Path:
    """A width-4 teacher whose BatchNorm running statistics come from real digits (16 px)."""
    from guard_fast.data import build_loader
    from guard_fast.data.presets import DATASETS
    from guard_fast.models import build_model, save_checkpoint

    spec = DATASETS["digits"]
    torch.manual_seed(0)
    model = build_model("resnet18-cifar", 10, spec.mean, spec.std, width=4)
    cfg = load_config(DataConfig, None,
                      [f"--path={digits_dir}", "--image_size=16", "--workers=0", "--batch_size=128"])
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the batches below
    with torch.no_grad():
        for i, (x, _) in enumerate(build_loader(cfg, "train", seed=0)):
            if i == 4:
                break
            model.train()(x)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="session")
def recovered(digits_dir, teacher, tmp_path_factory) -> Path:
    from tests import chain

    out = tmp_path_factory.mktemp("recovered")
    chain.recover(digits_dir, teacher, out)
    return out


@pytest.fixture(scope="session")
def relabeled(digits_dir, teacher, recovered, tmp_path_factory) -> Path:
    from tests import chain

    out = tmp_path_factory.mktemp("relabeled")
    chain.relabel(digits_dir, teacher, recovered, out)
    return out

"""The dc stage's settings (DC, DSA, GUARD(DC), GUARD(DSA)): `DCConfig`, DC's loop table and the valid choices.

guard_fast/distill/dc.py runs the stage and documents the semantics (and where they follow the authors' code)."""

from __future__ import annotations

from dataclasses import dataclass, field

from guard_fast.data.dsa import SPACES as DSA_SPACES
from guard_fast.data.dsa import STRATEGY, check_strategy
from guard_fast.models import ModelConfig
from guard_fast.runtime.bounds import NonNegative, Positive, Radius
from guard_fast.runtime.config import DataConfig, DistConfig, OutputConfig
from guard_fast.runtime.errors import ConfigError

LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}  # DC's get_loops
INITS = ("real", "noise")
CPU_CHUNK = 16  # images per forward/backward pass on a CPU (small passes stay in cache; DCConfig.chunk)
SPACES = ("pixel", "normalized")


@dataclass
class DCConfig:
    data: DataConfig = field(default_factory=DataConfig)
    """the real dataset (its train split is matched; loaded once into memory, resized, no augmentation)"""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(arch="convnet", width=128))
    """the network sampled fresh every outer iteration (DC: ConvNet width 128)"""
    dist: DistConfig = field(default_factory=DistConfig)
    output: OutputConfig = field(default_factory=lambda: OutputConfig(dir="runs/dc"))
    ipc: int = 10
    """synthetic images per class"""
    init: str = "noise"
    """noise (standard normal in the units of `space`: DC's and main_CURE.py's default) or real (random real images
    of the class)"""
    space: str = "pixel"
    """what the images are: pixel (raw pixel-unit tensors, networks normalize: main_CURE.py, the paper's Table 5) or
    normalized ((x - mean) / std tensors: VICO's original DC)"""
    clamp: bool = False
    """clip the images to the [0,1] pixel range after every step (neither authors' code does)"""
    iterations: int = 1000
    """outer iterations, each with a fresh network (paper: 1000)"""
    outer_loop: int = 0
    """image steps per outer iteration (0 = DC's table by IPC: 1 -> 1, 10 -> 10, 50 -> 50)"""
    inner_loop: int = 0
    """network epochs on the synthetic set between image steps (0 = DC's table: 1 -> 1, 10 -> 50, 50 -> 10)"""
    lr_img: Positive = 0.1
    """SGD learning rate of the synthetic images (in the units of `space`)"""
    momentum_img: NonNegative = 0.5
    """SGD momentum of the synthetic images"""
    lr_net: Positive = 0.01
    """SGD learning rate of the network in the inner loop (no momentum)"""
    batch_real: int = 256
    """real images per class per matching step (all of the class if it has fewer)"""
    batch_train: int = 256
    """synthetic images per inner-loop network step"""
    dsa: bool = False
    """DSA (Zhao & Bilen 2021): one DSA draw per class and matching step, applied to the real and the synthetic batch
    alike (siamese), and one draw per image on every inner-loop batch (VICO main.py --method DSA)"""
    dsa_strategy: str = STRATEGY
    """dsa = true: DSA groups joined by '_' (VICO's README command: color_crop_cutout_flip_scale_rotate)"""
    dsa_space: str = "normalized"
    """dsa = true: where the augmentation acts: normalized (VICO: data normalized at load) or pixel ([0,1] pixels)"""
    guard: bool = False
    """GUARD(DC): add lam * R (paper Eq. 11) to the real-batch loss whose gradient is matched"""
    lam: NonNegative = 100.0
    """GUARD weight on R, R from batch-mean losses (main_CURE.py's lamda: 100 newest, 500 first version)"""
    h: Positive = 0.6
    """GUARD finite-difference step: L2 length of z in [0,1] pixel units (main_CURE.py: 0.6 newest, 3 first)"""
    attack: str = "none"
    """none, or pgd: match gradients on PGD-attacked real batches (the authors' `Attack` baseline; bench/ compares)"""
    attack_eps: Radius = 8 / 255
    """attack = pgd: L-inf radius in [0,1] pixel units (main_CURE.py's CIFAR value, commented there; MNIST 0.3)"""
    attack_alpha: Radius = 2 / 255
    """attack = pgd: step size in [0,1] pixel units"""
    attack_steps: int = 10
    """attack = pgd: steps (random start, as torchattacks.PGD)"""
    ckpt_every: int = 10
    """outer iterations between checkpoints of the images (rank 0; a rerun resumes from the newest)"""
    chunk: int = 0
    """images per forward/backward pass of the real-batch gradient and of an inner-loop step (0 = CPU_CHUNK on a
    CPU, the whole batch on a GPU); the gradient is the passes' sum, the one-pass gradient up to float rounding. On
    one CPU thread ConvNet-128's real gradient of 256 Fashion-MNIST images took 0.7 s in passes of 16 and 1.26 s in
    one pass (docs/reproduction.md, Cost). Not part of the images' key (like the rank count)"""
    float64: bool = False
    """run in float64 (tests: exact 1 vs 2 rank parity)"""
    grid_classes: int = 10
    """classes (rows) shown in grid.png"""
    stop_after: int = 0
    """stop after this many outer iterations of this run as if killed (0 = run to the end; for tests)"""

    def loops(self) -> tuple[int, int]:
        if self.outer_loop and self.inner_loop:
            return self.outer_loop, self.inner_loop
        if self.ipc not in LOOPS:
            raise ConfigError(f"ipc = {self.ipc}: DC's loop table covers {sorted(LOOPS)}; set outer_loop and "
                              "inner_loop")
        outer, inner = LOOPS[self.ipc]
        return self.outer_loop or outer, self.inner_loop or inner

    def validate(self) -> None:
        if min(self.ipc, self.iterations, self.batch_real, self.batch_train) < 1:
            raise ConfigError("ipc, iterations, batch_real and batch_train must be >= 1")
        if self.attack not in ("none", "pgd"):
            raise ConfigError(f"attack = {self.attack!r}: valid values are 'none', 'pgd'")
        if self.init not in INITS:
            raise ConfigError(f"init = {self.init!r}: valid values are {', '.join(INITS)}")
        if self.space not in SPACES:
            raise ConfigError(f"space = {self.space!r}: valid values are {', '.join(SPACES)}")
        if self.dsa_space not in DSA_SPACES:
            raise ConfigError(f"dsa_space = {self.dsa_space!r}: valid values are {', '.join(DSA_SPACES)}")
        try:
            check_strategy(self.dsa_strategy)
        except ValueError as e:
            raise ConfigError(f"dsa_strategy: {e}") from None
        if self.dsa and self.attack != "none":
            raise ConfigError("dsa = true with attack = pgd: not supported (the attacked batch would leave [0,1] "
                              "after augmentation); set one of them")
        if min(self.outer_loop, self.inner_loop, self.ckpt_every, self.stop_after, self.chunk) < 0:
            raise ConfigError("outer_loop, inner_loop, ckpt_every, stop_after and chunk must be >= 0")
        if self.lr_img <= 0 or self.lr_net <= 0 or self.h <= 0 or self.lam < 0:
            raise ConfigError("lr_img, lr_net and h must be > 0, lam >= 0")
        self.loops()

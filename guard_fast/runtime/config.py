"""Typed, strict configuration: dataclass sections, TOML presets, `--section.key=value` overrides.

Precedence: CLI override > TOML preset > dataclass default. Every field carries an attribute docstring (the string
literal under it) with its unit; `describe()` prints them. Unknown keys, wrong types and failed cross-field checks
raise `ConfigError` naming the key; the CLI turns that into a one-line message and exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from guard_fast.runtime.bounds import check_bounds, split_bound
from guard_fast.runtime.errors import ConfigError
from guard_fast.runtime.fielddocs import field_docs

C = TypeVar("C")

# ----------------------------------------------------------------------------------------------------------------
# Shared sections


@dataclass
class DataConfig:
    dataset: str = "digits"
    """dataset preset: digits, imagenette, tiny-imagenet, imagenet-1k, or imagefolder (any class-per-folder tree)"""
    path: str = "data/digits"
    """root holding train/ and val/ ImageFolders (torch backend) or train.beton and val.beton (ffcv backend)"""
    backend: str = "torch"
    """loader backend: torch (torchvision ImageFolder + DataLoader) or ffcv (.beton files, CPU decode workers)"""
    image_size: int = 0
    """side of the square model input in pixels; 0 = the preset's size"""
    num_classes: int = 0
    """class count; 0 = the preset's (or the folder's, for imagefolder); a mismatch with the data is an error"""
    mean: list[float] = field(default_factory=list)
    """per-channel mean in [0,1] pixel units used by the model's normalization layer; empty = the preset's"""
    std: list[float] = field(default_factory=list)
    """per-channel std in [0,1] pixel units used by the model's normalization layer; empty = the preset's"""
    batch_size: int = 64
    """images per rank per step"""
    eval_batch_size: int = 256
    """images per rank per step during validation"""
    workers: int = 2
    """loader worker processes per rank (0 = load in the main process)"""
    crop_scale_min: float = 0.08
    """lower bound of RandomResizedCrop's area fraction for training images"""
    crop_ratio: float = 0.0
    """validation center-crop fraction: resize to image_size/crop_ratio, crop image_size; 0 = the preset's"""
    skip_corrupt: bool = False
    """skip unreadable images (counted and reported) instead of stopping with an error naming the file"""

    def validate(self) -> None:
        if self.image_size < 0:
            raise ConfigError(f"data.image_size = {self.image_size}: must be >= 1 pixels (or 0 for the preset's)")
        if self.num_classes < 0:
            raise ConfigError(f"data.num_classes = {self.num_classes}: must be >= 1 (or 0 for the preset's / the "
                              "folder's count)")
        if self.backend not in ("torch", "ffcv"):
            raise ConfigError(f"data.backend = {self.backend!r}: valid values are 'torch', 'ffcv'")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1")
        if self.workers < 0:
            raise ConfigError(f"data.workers = {self.workers}: must be >= 0")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ConfigError(f"data.crop_scale_min = {self.crop_scale_min}: must be in (0, 1]")
        if not 0.0 <= self.crop_ratio <= 1.0:
            raise ConfigError(f"data.crop_ratio = {self.crop_ratio}: must be in (0, 1] (or 0 for the preset's)")
        if len(self.mean) not in (0, 1, 3) or len(self.std) not in (0, 1, 3):
            raise ConfigError("data.mean and data.std take one value per channel (3 for RGB, 1 for grayscale) or none")
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"data.std = {self.std}: every value must be > 0")


@dataclass
class DistConfig:
    backend: str = "auto"
    """process-group backend: auto (nccl on CUDA, gloo on CPU), nccl or gloo"""
    device: str = "auto"
    """auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu or cuda"""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 (DDP-like), 1 (shard optimizer state) or 2 (also shard gradients)"""
    precision: str = "fp32"
    """fp32, or bf16 (mixed precision; for GPUs, BatchNorm buffers kept in bf16 as DeepSpeed requires)"""
    seed: int = 0
    """global seed; each rank derives its own streams from it"""
    timeout_s: float = 600.0
    """seconds a collective may wait for the slowest rank; a lost node or a stuck rank ends the job after this
    (docs/cluster.md)"""
    cpu_threads: int = 0
    """torch CPU threads per rank (0 = this node's cores // processes on this node)"""

    def validate(self) -> None:
        if self.timeout_s <= 0 or self.cpu_threads < 0:
            raise ConfigError("dist.timeout_s must be > 0 seconds and dist.cpu_threads >= 0")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ConfigError(f"dist.backend = {self.backend!r}: valid values are 'auto', 'nccl', 'gloo'")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"dist.device = {self.device!r}: valid values are 'auto', 'cpu', 'cuda'")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"dist.zero_stage = {self.zero_stage}: valid values are 0, 1, 2")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"dist.precision = {self.precision!r}: valid values are 'fp32', 'bf16'")


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    """run folder: resolved config, environment, metrics.jsonl, checkpoints and results go here"""
    log_every: int = 10
    """steps between metric lines (and host-device syncs for logging)"""
    ckpt_every: int = 0
    """steps between checkpoints (0 = only at epoch end)"""
    progress: bool = True
    """show progress bars on rank 0"""
    overwrite: bool = False
    """a fresh run (no --resume) may replace another run's record and checkpoints in output.dir (else an error)"""
    loggers: list[str] = field(default_factory=list)
    """training metrics also as: tensorboard (event files in output.dir/tensorboard), csv (output.dir/metrics.csv);
    metrics.jsonl is always written"""

    def validate(self) -> None:
        if self.log_every < 1:
            raise ConfigError(f"output.log_every = {self.log_every}: must be >= 1")
        if bad := [x for x in self.loggers if x not in ("tensorboard", "csv")]:
            raise ConfigError(f"output.loggers = {bad}: valid values are 'tensorboard', 'csv'")
        if self.ckpt_every < 0:
            raise ConfigError(f"output.ckpt_every = {self.ckpt_every}: must be >= 0")


# ----------------------------------------------------------------------------------------------------------------
# Machinery


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one value to the field's annotated type; raise ConfigError naming the key."""
    tp, _ = split_bound(tp)  # the bound itself is checked by validate(), for defaults too
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):  # "a,b" or "[a, b]" that TOML could not read (e.g. fractions like 1/255)
            text = value.strip()
            text = text[1:-1] if text.startswith("[") and text.endswith("]") else text
            value = [v for v in text.split(",") if v.strip()]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # --ipc=10: a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.strip().lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            if math.isnan(value):
                raise ConfigError(f"{key}: nan is not a number a config may hold")
            return float(value)
        if isinstance(value, str):
            try:  # fractions such as 1/255 are the natural way to write pixel epsilons
                return float(Fraction(value.strip()))
            except (ValueError, ZeroDivisionError):
                pass
        raise ConfigError(f"{key}: expected a number (e.g. 0.5 or 1/255), got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")


def _apply(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Set fields of dataclass `obj` from a nested dict; unknown keys are an error listing the valid ones."""
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'; valid keys{' in ' + prefix[:-1] if prefix else ''}: "
                              f"{', '.join(names)}")
        tp = hints[key]
        if _is_section(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"'{full}' is a section; set its keys as {full}.KEY")
            _apply(getattr(obj, key), value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, tp, full))


def _parse_cli_value(text: str) -> Any:
    """A CLI value as TOML would read it (numbers, booleans, [lists]); anything else stays a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def overrides_to_dict(cls: type, overrides: list[str]) -> dict[str, Any]:
    """['--squeeze.lr=0.1', '--resume'] -> {'squeeze': {'lr': 0.1}, 'resume': True}."""
    out: dict[str, Any] = {}
    for arg in overrides:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        body = arg[2:]
        key, sep, text = body.partition("=")
        path = key.split(".")
        # `--flag` alone means true for a boolean field
        value: Any = _parse_cli_value(text) if sep else True
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{key}' conflicts with an earlier override")
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def validate(cfg: Any) -> None:
    """Bounded fields first (Radius, Positive, ...: one check for every config class), then every section's
    `validate()`, then the stage's own cross-field checks."""
    check_bounds(cfg)
    _validate_sections(cfg)


def _validate_sections(cfg: Any) -> None:
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _validate_sections(value)
    check = getattr(cfg, "validate", None)
    if check is not None:
        check()


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); TOML files must be UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or e})") from None


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Defaults <- TOML file <- CLI overrides, then validation. Raises ConfigError."""
    values: dict[str, Any] = read_toml(path) if path else {}
    values = _merge(values, overrides_to_dict(cls, overrides or []))
    cfg = cls()
    _apply(cfg, values)
    validate(cfg)
    return cfg


def from_dict(cls: type[C], values: dict[str, Any]) -> C:
    """A config from a nested dict such as a run folder's config.json (unknown keys are an error), validated."""
    cfg = cls()
    _apply(cfg, values)
    validate(cfg)
    return cfg


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Apply `--section.key=value` overrides to an existing config in place and validate it (CLI > what it held)."""
    _apply(cfg, overrides_to_dict(type(cfg), overrides))
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Any) -> str:
    """Resolved config as TOML (top-level scalars first, then one table per section)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    def emit(d: dict[str, Any], name: str, lines: list[str]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in d.items() if isinstance(v, dict)}
        if name:
            lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {fmt(v)}" for k, v in scalars.items())
        for k, v in tables.items():
            emit(v, f"{name}.{k}" if name else k, lines)

    lines: list[str] = []
    emit(to_dict(cfg), "", lines)
    return "\n".join(lines).lstrip() + "\n"


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """One line per key: `section.key (type, default): doc` for --help output. A section's defaults are those of
    the enclosing config's instance (a stage's `default_factory` may set them apart from the section class's own)."""
    lines = []
    hints = _hints(cls)
    docs = field_docs(cls)
    defaults = cls() if defaults is None else defaults
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            lines.extend(describe(tp, f"{prefix}{f.name}.", getattr(defaults, f.name)))
        else:
            tname = getattr(tp, "__name__", str(tp)).replace("typing.", "")
            lines.append(f"  --{prefix}{f.name}={getattr(defaults, f.name)!r}  ({tname}) {docs.get(f.name, '')}")
    return lines


def parse_args(cls: type[C], argv: list[str], prog: str, needs_args: bool = True) -> C:
    """`[--config FILE] [--section.key=value ...] [--help]` -> validated config. `--help` prints keys and exits 0;
    no arguments at all (for a command that needs its inputs named: `needs_args`) prints the usage and exits 2,
    instead of starting a default run."""
    if needs_args and not argv:
        print(f"usage: {prog} [--config FILE.toml] [--section.key=value ...]\n{prog}: error: no arguments; name the "
              f"run's inputs and output.dir (e.g. --config FILE.toml); '{prog} --help' lists the keys",
              file=sys.stderr)
        raise SystemExit(2)
    if any(a in ("-h", "--help") for a in argv):
        print(f"usage: {prog} [--config FILE.toml] [--section.key=value ...]\n\nkeys (CLI > TOML > default):")
        print("\n".join(describe(cls)))
        raise SystemExit(0)
    path = None
    rest: list[str] = []
    it = iter(argv)
    for a in it:
        if a.startswith("--local_rank"):  # added by the deepspeed launcher; LOCAL_RANK is also in the environment
            if "=" not in a:
                next(it, None)
        elif a == "--config":
            path = next(it, None)
            if path is None:
                raise ConfigError("--config needs a file path")
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
    return load_config(cls, path, rest)

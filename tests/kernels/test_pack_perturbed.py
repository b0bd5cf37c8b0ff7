"""kernels/pack_perturbed.py: the Triton kernels against the torch reference, the reference against the formula.

Triton decides at import time whether `@triton.jit` builds a compiled or an interpreted kernel, and its own
library functions (tl.sum, ...) are decorated when triton is first imported; so TRITON_INTERPRET=1 must be set before
the first `import triton` of the process. Other test modules import triton indirectly (torch.compile, objectives), so
the interpreted kernels run in one subprocess started with the variable set (this file doubles as that worker); the
parametrized tests below compare its results with the reference computed here. On a CUDA machine the compiled
kernels are also tested in-process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.pack_perturbed import PackPerturbed, pack_perturbed, pack_perturbed_reference

H = 3.0  # the reference step length (docs/spec.md section 2) in normalized units

# (case id, shape, channels_last, dtype, atol, rtol, block). Tolerances: the kernel and the reference both compute in
# fp32 and round once to the output dtype, but multiply in a different order (h * (g+eps) / n vs (g+eps) * (h / n)),
# so results may differ by one fp32 ulp before the final rounding, which can flip that rounding: fp32 ~1e-6 of values
# up to |u| + h ~ 8; bf16 one ulp (2^-7 relative, 0.03 at 4-8); fp16 one ulp (2^-10 relative). Small blocks force
# several chunks per row, so the cross-chunk norm reduction and the tail masks are exercised on small tensors.
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CASES = [
    ("B1-D1823", (1, 1823), False, F32, 1e-6, 1e-6, 128),
    ("B7-D1823", (7, 1823), False, F32, 1e-6, 1e-6, 256),
    ("B13-D1", (13, 1), False, F32, 1e-6, 1e-6, 128),
    ("B2-D1823-default-block", (2, 1823), False, F32, 1e-6, 1e-6, None),
    ("B5-3x7x11-contig", (5, 3, 7, 11), False, F32, 1e-6, 1e-6, 64),
    ("B5-3x7x11-channels-last", (5, 3, 7, 11), True, F32, 1e-6, 1e-6, 64),
    ("B3-2x5x13-channels-last-bf16", (3, 2, 5, 13), True, BF16, 1e-2, 1e-2, 32),
    ("B11-97-bf16", (11, 97), False, BF16, 1e-2, 1e-2, 32),
    ("B3-1823-fp16", (3, 1823), False, F16, 1e-3, 1e-3, 512),
    ("B2-3x5x5-channels-last-fp16", (2, 3, 5, 5), True, F16, 1e-3, 1e-3, 16),
]
IDS = [c[0] for c in CASES]


def _inputs(shape, channels_last: bool, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """u, g and an upstream gradient w for the (2B, ...) output; g's row 0 is all zeros (the no-NaN edge case)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen) * 1e-3  # input gradients are small; the direction is what matters
    g[0] = 0.0
    w = torch.randn((2 * shape[0], *shape[1:]), generator=gen)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {k: v.to(dtype).contiguous(memory_format=fmt) for k, v in {"u": u, "g": g, "w": w}.items()}


def _run_kernel(inp: dict[str, torch.Tensor], block: int | None) -> dict:
    """Forward and backward through the Triton autograd Function (or the forced dispatch when block is None)."""
    u = inp["u"].clone().requires_grad_(True)
    g = inp["g"].clone().requires_grad_(True)  # must get no gradient: z is a constant
    out = pack_perturbed(u, g, H, backend="triton") if block is None else PackPerturbed.apply(u, g, H, block)
    out.backward(inp["w"])
    return {"out": out.detach(), "grad_u": u.grad, "g_grad_is_none": g.grad is None,
            "channels_last": out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()}


def _worker(in_path: str, out_path: str) -> None:
    """Subprocess entry (TRITON_INTERPRET=1 set by the parent before python started)."""
    import kernels.pack_perturbed as kp

    inputs = torch.load(in_path)
    results = {"kernel_type": type(kp._pack_kernel).__name__}
    for case_id, _, _, _, _, _, block in CASES:
        results[case_id] = _run_kernel(inputs[case_id], block)
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> tuple[dict, dict]:
    """(inputs, results) of every case, the kernels run once under the Triton interpreter in a subprocess."""
    from tests.conftest import PYTHON, subprocess_env

    tmp = tmp_path_factory.mktemp("kernels")
    inputs = {c[0]: _inputs(c[1], c[2], c[3], seed=i) for i, c in enumerate(CASES)}
    torch.save(inputs, tmp / "inputs.pt")
    env = subprocess_env()
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([PYTHON, str(Path(__file__).resolve()), str(tmp / "inputs.pt"), str(tmp / "results.pt")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return inputs, torch.load(tmp / "results.pt")


def _reference(inp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    u = inp["u"].clone().requires_grad_(True)
    out = pack_perturbed_reference(u, inp["g"], H)
    out.backward(inp["w"])
    return out.detach(), u.grad


def _check_against_reference(inp: dict, got: dict, case: tuple) -> None:
    _, shape, channels_last, dtype, atol, rtol, _ = case
    ref_out, ref_grad = _reference(inp)
    B = shape[0]
    assert got["out"].shape == (2 * B, *shape[1:]) and got["out"].dtype == dtype
    assert got["channels_last"] == channels_last  # the conv after it keeps its layout
    assert torch.isfinite(got["out"]).all()
    torch.testing.assert_close(got["out"][:B], ref_out[:B], atol=atol, rtol=rtol)
    assert torch.equal(got["out"][B:], inp["u"])  # the clean half is a copy, bit for bit
    # The backward is one exact addition of two upstream values, the same in both: bit-for-bit equal.
    torch.testing.assert_close(got["grad_u"], ref_grad, atol=0, rtol=0)
    assert got["g_grad_is_none"]


@pytest.mark.subprocess
def test_interpreter_really_ran(interpreted):
    _, results = interpreted
    assert results["kernel_type"] == "InterpretedFunction"


@pytest.mark.subprocess
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_reference_interpreted(interpreted, case):
    inputs, results = interpreted
    _check_against_reference(inputs[case[0]], results[case[0]], case)


@pytest.mark.subprocess
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_zero_gradient_row_interpreted(interpreted, case):
    """Row 0 of g is zero: ||g|| = 0, so z = h * 1e-7 / 1e-7 = h in every element (the formula's value), no NaN."""
    inputs, results = interpreted
    u, out = inputs[case[0]]["u"].float(), results[case[0]]["out"].float()
    torch.testing.assert_close(out[0], u[0] + H, atol=case[4] * 4, rtol=case[5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled Triton kernels need a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_reference_cuda(case):
    inp = {k: v.cuda() for k, v in _inputs(case[1], case[2], case[3], seed=0).items()}
    got = _run_kernel(inp, case[6])
    ref_out, ref_grad = _reference(inp)
    _check_against_reference(inp, got, case)
    assert torch.equal(pack_perturbed(inp["u"], inp["g"], H), got["out"])  # auto picks Triton on CUDA


@pytest.mark.parametrize("shape,channels_last", [((1, 5), False), ((7, 3, 4, 5), False), ((4, 3, 5, 6), True)])
def test_reference_matches_formula(shape, channels_last):
    """The reference against a per-row loop in float64, written straight from the formula in docs/spec.md section 2."""
    inp = _inputs(shape, channels_last, torch.float32, seed=1)
    u, g = inp["u"].double(), inp["g"].double()
    expected = torch.stack([u[i] + H * (g[i] + 1e-7) / (g[i].norm() + 1e-7) for i in range(shape[0])])
    out = pack_perturbed_reference(inp["u"], inp["g"], H)
    torch.testing.assert_close(out[: shape[0]].double(), expected, atol=1e-5, rtol=1e-6)
    assert torch.equal(out[shape[0]:], inp["u"])
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_reference_gradient_sums_halves_and_ignores_g():
    inp = _inputs((3, 2, 4, 4), False, torch.float32, seed=2)
    u = inp["u"].clone().requires_grad_(True)
    g = inp["g"].clone().requires_grad_(True)
    pack_perturbed_reference(u, g, H).backward(inp["w"])
    torch.testing.assert_close(u.grad, inp["w"][:3] + inp["w"][3:], atol=0, rtol=0)
    assert g.grad is None


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    def fail(*args):
        raise AssertionError("the Triton path must not run for CPU tensors")

    monkeypatch.setattr(PackPerturbed, "apply", fail)
    inp = _inputs((4, 3, 5, 5), True, torch.float32, seed=3)
    out = pack_perturbed(inp["u"], inp["g"], H)
    assert torch.equal(out, pack_perturbed_reference(inp["u"], inp["g"], H))
    assert torch.equal(pack_perturbed(inp["u"], inp["g"], H, backend="torch"), out)


def test_launcher_rejects_bad_inputs():
    u = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="backend"):
        pack_perturbed(u, u, H, backend="cuda")
    from kernels.pack_perturbed import pack_perturbed_triton

    with pytest.raises(ValueError, match="same shape"):
        pack_perturbed_triton(u, torch.zeros(2, 6), H)
    with pytest.raises(ValueError, match="dtype"):
        pack_perturbed_triton(u, u.double(), H)
    with pytest.raises(ValueError, match="not supported"):
        pack_perturbed_triton(u.double(), u.double(), H)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (the test fixture does this)")
    _worker(sys.argv[1], sys.argv[2])

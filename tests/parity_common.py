"""What the parity tests of DPSOM (test_parity.py) and T-DPSOM (test_tdpsom_parity.py) share: a comparison's
result (Check), elementwise and yes/no comparisons, TF1 Adam's updates from zero slots, and the table of measured
errors that `python tests/test_parity.py` and `python tests/test_tdpsom_parity.py` print."""
from typing import NamedTuple

import numpy as np
import torch


class Check(NamedTuple):
    quantity: str
    abs_err: float
    rel_err: float       # abs_err / max |reference|
    ok: bool
    detail: str

    def message(self) -> str:
        if np.isnan(self.abs_err):
            return f"{self.quantity}: {self.detail}"
        rel = "" if np.isnan(self.rel_err) else f" (rel. to max|ref| {self.rel_err:.3g})"
        return f"{self.quantity}: max abs error {self.abs_err:.3g}{rel}; {self.detail}"


def close(quantity: str, got, ref, atol: float = 0.0, rtol: float = 0.0) -> Check:
    """Elementwise |got - ref| <= atol + rtol * |ref|; float32 pairs stay float32 (the head is 64.6M entries)."""
    got = got if isinstance(got, torch.Tensor) else torch.as_tensor(np.asarray(got))   # Python floats: float64
    ref = torch.as_tensor(np.asarray(ref))
    if got.shape != ref.shape:
        return Check(quantity, float("inf"), float("inf"), False, f"shape {tuple(got.shape)} != {tuple(ref.shape)}")
    dtype = torch.promote_types(got.dtype, ref.dtype)
    dtype = dtype if dtype.is_floating_point else torch.float64
    got, ref = got.to(dtype), ref.to(dtype)
    diff = (got - ref).abs_()
    err = diff.max().item() if diff.numel() else 0.0
    lo, hi = ref.aminmax() if ref.numel() else (torch.tensor(0.0), torch.tensor(0.0))
    scale = max(-lo.item(), hi.item())
    ok = err <= atol if rtol == 0 else bool((diff <= atol + rtol * ref.abs()).all())
    return Check(quantity, err, err / scale if scale else err, ok, f"allowed atol {atol:.3g} + rtol {rtol:.3g}*|ref|")


def fact(quantity: str, ok: bool, detail: str) -> Check:
    """A yes/no check (exact zeros, names): no error to measure."""
    return Check(quantity, float("nan"), float("nan"), ok, detail)


def within(quantity: str, got: torch.Tensor, ref: torch.Tensor, allowed: torch.Tensor, note: str = "") -> Check:
    """|got - ref| <= allowed entry by entry, each entry with its own derived bound (float64)."""
    got, ref, allowed = (torch.as_tensor(t).double() for t in (got, ref, allowed))
    if got.shape != ref.shape:
        return Check(quantity, float("inf"), float("inf"), False, f"shape {tuple(got.shape)} != {tuple(ref.shape)}")
    diff = (got - ref).abs()
    bad = int((diff > allowed).sum())
    err, scale = (diff.max().item(), ref.abs().max().item()) if diff.numel() else (0.0, 0.0)
    return Check(quantity, err, err / scale if scale else err, bad == 0,
                 f"{bad} of {diff.numel()} entries beyond their bound (largest bound {allowed.max().item():.3g}){note}")


def one_minus(b: float) -> float:
    """1 - b as TF forms it, in float32."""
    return float(np.float32(1) - np.float32(b))


def tf1_adam_updates(g1: torch.Tensor, g2: torch.Tensor, lr_t: tuple, b1: float, b2: float, eps: float):
    """TF1 Adam's two updates from zero slots, elementwise in float64: u1(g1) and u2(g1, g2)."""
    m1, v1 = one_minus(b1) * g1, one_minus(b2) * g1 ** 2
    m2, v2 = b1 * m1 + one_minus(b1) * g2, b2 * v1 + one_minus(b2) * g2 ** 2
    return -lr_t[0] * m1 / (v1.sqrt() + eps), -lr_t[1] * m2 / (v2.sqrt() + eps)


def summary(checks: dict[str, list[Check]]) -> list[tuple[str, str, str, str]]:
    """Rows (quantity, max abs error, rel. to max|ref|, note); per-variable checks "<what> / <variable>"
    are folded into one row with their worst."""
    num = lambda v: "" if np.isnan(v) else f"{v:.2g}"
    groups: dict[str, list[Check]] = {}
    for c in (c for cs in checks.values() for c in cs):
        groups.setdefault(c.quantity.split(" / ")[0], []).append(c)
    rows = []
    for what, cs in groups.items():
        fail = "" if all(c.ok for c in cs) else " FAIL"
        if np.isnan(cs[0].abs_err):                     # yes/no checks
            rows.append((what, "", "", f"{len(cs)} checks" + (fail or ", all pass")))
        elif len(cs) > 1:
            by_abs, by_rel = max(cs, key=lambda c: c.abs_err), max(cs, key=lambda c: c.rel_err)
            var = lambda c: c.quantity.split(" / ")[1]
            where = var(by_abs) if by_abs is by_rel else f"abs in {var(by_abs)}, rel in {var(by_rel)}"
            rows.append((what, num(by_abs.abs_err), num(by_rel.rel_err), f"worst of {len(cs)}: {where}" + fail))
        else:
            c = cs[0]
            note = "" if c.detail.startswith("allowed") else c.detail   # tolerances are in the source
            rows.append((what, num(c.abs_err), num(c.rel_err), note + fail))
    return rows

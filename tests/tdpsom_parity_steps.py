"""The four train ops of the reference, each run once with one TF1Adam as the golden file ran them, and the
weights and Adam slots after them compared entry by entry within bounds derived in tdpsom_golden.py."""
import math

import numpy as np
import torch

from decay_scheduler import decayed_lr, set_lr
from dpsom_model import from_tf_layout, to_tf_layout
from parity_common import Check, close, fact, one_minus, tf1_adam_updates, within
from tdpsom_golden import GRAD_RTOL, LOSS_RTOL, PHASES, U, fed_lr, max_abs, tf_entries, tf_grad
from tdpsom_model import TDPSOM
from tf1_adam import TF1Adam


def optimiser_for(phase: str, shared: TF1Adam | None, model: TDPSOM) -> TF1Adam:
    """The reference's one Adam: joint2 (train_step_prob) continues joint1's slots, beta powers and global step;
    ae and som ran in fresh sessions. (A wrong port replaces this function.)"""
    return shared if phase == "joint2" and shared is not None else TF1Adam(model.parameters())


def adam_steps(model: TDPSOM, variables: dict, grads: dict, allow: dict, data: dict, meta: dict,
               x: torch.Tensor, eps: torch.Tensor, phases: tuple) -> list[Check]:
    """Each train op once, as the file ran them: joint1 (the joint loss) from the file's global step, then joint2
    (the prediction loss) on the state after it; ae and som each from the initial weights with a fresh optimiser.

    joint1, ae and som apply the port's gradients at the initial weights (as the gradient checks saw them). joint2 starts from TF's
    prediction variables after joint1 (stored in full) with the slots TF's gradient gave them, so that it checks
    the second step, and from the port's own encoder after joint1 (TF stored its large kernels in part only); its
    spread is over the port's g2 +- GRAD_RTOL max|g2|, the update's turning point in g2 included.
    """
    b1, b2, eps_adam = (meta["adam"][k] for k in ("beta1", "beta2", "epsilon"))
    h = meta["hyper"]
    params = {n: t for n, t in variables.items() if isinstance(t, torch.nn.Parameter)}
    w0 = {n: t.detach().clone() for n, t in variables.items()}
    defaults = TF1Adam([torch.zeros(1)]).defaults
    checks = [close("Adam beta1, beta2, epsilon", [*defaults["betas"], defaults["eps"]], [b1, b2, eps_adam])]
    opt, g1_tf = None, {}
    for phase in phases:
        s, loss = f"step/{phase}/", PHASES[phase]
        if phase != "joint2":                                          # from the initial weights
            with torch.no_grad():
                for n, t in variables.items():
                    t.copy_(w0[n])
        opt = optimiser_for(phase, opt, model)
        if phase != "joint2":
            opt.global_step = int(data[s + "global_step_before"])
        lr = decayed_lr(fed_lr(meta, phase), opt.global_step, h["decay_factor"], h["decay_steps"])
        t = opt.global_step + 1
        checks += [close(f"{phase} learning rate", lr, data[s + "lr"], rtol=4 * U),   # float32 lr_val * 0.99^k
                   close(f"{phase} beta1 power", np.float32(b1 ** t), data[s + "beta1_power_before"], rtol=4 * U),
                   close(f"{phase} beta2 power", np.float32(b2 ** t), data[s + "beta2_power_before"], rtol=4 * U)]
        set_lr(opt, lr)
        if phase == "joint2":
            g1_tf = set_tf_state_after_joint1(opt, params, data, meta)
            model.zero_grad(set_to_none=True)
            out = model(x, eps=eps, decode=False)
            value = model.prediction_loss(out.z.view_as(out.pred_loc), out.pred_loc, out.pred_scale)
            checks.append(close("joint2 loss before", value.detach(), data[s + "loss_before"], rtol=LOSS_RTOL))
            value.backward()
            d = {n: GRAD_RTOL * max_abs(t.grad) for n, t in params.items() if t.grad is not None}
        else:
            for n, t in params.items():
                t.grad = grads[loss][n]
            d = allow[loss]
        before = {n: tf_entries(data, meta, n, tt).double() for n, tt in variables.items()}
        port_g = {n: tf_entries(data, meta, n, t.grad).double() for n, t in params.items() if t.grad is not None}
        opt.step()
        checks.append(close(f"{phase} global step after", opt.global_step, data[s + "global_step_after"]))
        correction = math.sqrt(1 - float(data[s + "beta2_power_before"])) / (1 - float(data[s + "beta1_power_before"]))
        lr_t = float(data[s + "lr"]) * correction                      # TF's step size, from float32 beta powers
        t_tf = int(data[s + "global_step_before"]) + 1                 # TF1Adam's at TF's step, from float64 ones:
        lr_t_gap = abs(math.sqrt(1 - b2 ** t_tf) / (1 - b1 ** t_tf) / correction - 1)   # their relative gap
        for name, tensor in variables.items():
            got = tf_entries(data, meta, name, tensor).double()
            if name in meta["steps"][phase]["unchanged"]:
                checks.append(fact(f"{phase} unchanged / {name}", torch.equal(got, before[name]),
                                   "TF left it bit-identical: so must the port"))
            elif name not in port_g:
                checks.append(fact(f"{phase} weights / {name}", False, "TF changed it; the port has no gradient"))
            else:
                ref = torch.from_numpy(data[s + ("wsub/" if name in meta["large"] else "w/") + name].ravel()).double()
                g = port_g[name] if phase == "joint2" else tf_grad(data, meta, loss, name)   # the spread's centre
                dg = d[name]
                g1 = g1_tf[name] if phase == "joint2" else None       # joint2: after joint1's step
                update, spread = update_spread(g, dg, g1, lr_t, b1, b2, eps_adam)
                ulp = torch.from_numpy(np.spacing(np.abs(ref.numpy()).astype(np.float32))).double()
                firm = spread <= ulp                                   # gradient far from zero: rounding only
                firm_err = (got - ref)[firm].abs().max().item() if firm.any() else 0.0
                checks.append(within(f"{phase} weights / {name}", got, ref,
                                     2 * ulp + (16 * U + lr_t_gap) * update.abs() + spread,
                                     f"; {int(firm.sum())} entries held to rounding, max error there {firm_err:.2g}"))
                zero = port_g[name] == 0                               # Adam leaves them exactly
                checks.append(fact(f"{phase} zero-gradient entries / {name}", torch.equal(
                    got[zero], before[name][zero]), f"{int(zero.sum())} entries with gradient exactly 0 must not move"))
        if phase == "joint2":
            checks += joint2_slots(opt, params, data, meta, grads, allow, g1_tf, d, b1)
    return checks


def update_spread(g: torch.Tensor, d, g1: torch.Tensor | None, lr_t: float, b1: float, b2: float, eps: float):
    """TF1 Adam's update for gradient g and its largest change over [g - d, g + d]: from zero slots (g1 None, the
    update monotone in g), or after a first step with gradient g1 (its turning point b2 g1 / b1 included)."""
    if g1 is None:
        u = lambda c: -lr_t * one_minus(b1) * c / ((one_minus(b2) * c * c).sqrt() + eps)
        points = (g - d, g + d)
    else:
        u = lambda c: tf1_adam_updates(g1, c, (lr_t, lr_t), b1, b2, eps)[1]
        points = (g - d, g + d, torch.maximum(torch.minimum(b2 * g1 / b1, g + d), g - d))
    update = u(g)
    return update, torch.stack([(u(c) - update).abs() for c in points]).amax(0)


def set_tf_state_after_joint1(opt: TF1Adam, params: dict, data: dict, meta: dict) -> dict:
    """The prediction variables as TF left them after joint1 and their slots from TF's joint1 gradient, in float32
    as TF forms them (m = (1 - b1) g, v = (1 - b2) g^2). Returns those gradients, flat in TF layout (float64)."""
    b1, b2 = opt.defaults["betas"]
    g1 = {}
    with torch.no_grad():
        for n in (n for n in meta["steps"]["joint2"]["changed"] if n in params):   # not global_step
            g = torch.from_numpy(data[f"grad/loss/{n}"])
            m, v = g * np.float32(one_minus(b1)), g * g * np.float32(one_minus(b2))
            params[n].copy_(from_tf_layout(torch.from_numpy(data[f"step/joint1/w/{n}"])))
            opt.state[params[n]] = {"m": from_tf_layout(m).contiguous(), "v": from_tf_layout(v).contiguous()}
            g1[n] = g.reshape(-1).double()
    return g1


def joint2_slots(opt: TF1Adam, params: dict, data: dict, meta: dict, grads: dict, allow: dict, g1_tf: dict,
                 d2: dict, b1: float) -> list[Check]:
    """The stored slots after joint2. Variables joint2 did not touch keep joint1's m = (1-b1) g1, v = (1-b2) g1^2
    (no decay); the others hold m = b1 m1 + (1-b1) g2. Allowed: the slot's change over the allowed gradients."""
    checks = []
    c1, c2 = 1 - b1, 1 - opt.defaults["betas"][1]
    ulp = lambda t: torch.from_numpy(np.spacing(np.abs(t.numpy()).astype(np.float32))).double()
    for name in meta["steps"]["slots_stored_after_joint2"]:
        state = opt.state[params[name]]
        if not state:
            checks.append(fact(f"joint2 slot m / {name}", False, "the optimiser of joint2 holds no slots for it"))
            continue
        m, v = (to_tf_layout(state[k]).reshape(-1).double() for k in ("m", "v"))
        g, d = ((params[name].grad, d2[name]) if name in g1_tf          # joint2 moved it: its g2 counts
                else (grads["loss"][name], allow["loss"][name]))        # joint1's slots, from the port's g1
        g = to_tf_layout(g).reshape(-1).double().abs()
        ref_m, ref_v = (torch.from_numpy(data[f"step/joint2/{k}/{name}"].ravel()).double() for k in ("m", "v"))
        checks += [within(f"joint2 slot m / {name}", m, ref_m, 2 * ulp(ref_m) + c1 * d),
                   within(f"joint2 slot v / {name}", v, ref_v, 2 * ulp(ref_v) + c2 * (2 * g * d + d * d))]
    return checks

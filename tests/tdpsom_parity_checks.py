"""Compare TDPSOM in the reference's numerics with one golden file of the TensorFlow original (T-DPSOM): the
checks that test_tdpsom_parity.py asserts and prints. Tolerances: tdpsom_golden.py; the train ops:
tdpsom_parity_steps.py."""
import copy
from pathlib import Path

import torch

from parity_common import Check, close, fact
from tdpsom_golden import (COMMIT_GRAD_RTOL, GRAD_RTOL, LOSS_RTOL, PHASES, TRAINED, golden, loaded_model, max_abs,
                           near, tf_entries, tf_grad)
from tdpsom_model import TDPSOM, TOutput, gaussian_nll, previous_bmu
from tdpsom_parity_steps import adam_steps

GROUPS = ("recipe", "names", "forward", "losses", "grads", "stop", "steps", "eval")
ENC, PRED, DEC = "z_e/encoder", "prediction/next_state", "reconstruction_e/decoder"


# ---- the comparison -----------------------------------------------------------------------------------
def compare(path: Path, groups: tuple = GROUPS, phases: tuple = tuple(PHASES)) -> dict[str, list[Check]]:
    """Run the port on one golden file: every check of the groups asked for, and the steps of the train ops in
    phases (joint2 needs joint1)."""
    data, meta, _, recipe_checks = golden(path)
    checks = {g: [] for g in groups}
    if "recipe" in groups:
        checks["recipe"] += recipe_checks
    model = copy.deepcopy(loaded_model(path))
    variables = model.tf_variables()
    params = {n: t for n, t in variables.items() if isinstance(t, torch.nn.Parameter)}
    if "names" in groups:
        buffers = {n for n, *_ in meta["non_trainable_model"]} - {"global_step/global_step:0"}
        checks["names"] += [
            fact("trainable variables", list(params) == [n for n, _ in meta["trainable"]] and
                 [id(t) for t in model.parameters()] == [id(t) for t in params.values()], "meta's, in its order"),
            fact("BN moving statistics", set(variables) - set(params) == buffers and all(
                t.eq(0 if "mean" in n else 1).all() for n, t in variables.items() if n in buffers), "meta's, 0 / 1"),
            fact("float32", all(p.dtype == torch.float32 for p in model.parameters()), "the port trains in float32")]

    # Forward, keeping every Dense layer's input and output and the LSTM's outputs.
    seen = {}
    kernel = {id(t): n for n, t in variables.items() if n.endswith("/kernel:0")}
    hooks = [m.register_forward_hook(lambda m, i, o: seen.__setitem__(kernel[id(m.weight)], (i[0], o)))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    hooks.append(model.lstm.register_forward_hook(lambda m, i, o: seen.__setitem__("lstm", o[0])))
    x, eps, p = (torch.from_numpy(data[k]) for k in ("x", "eps", "p"))
    out = model(x, eps=eps)
    for h in hooks:
        h.remove()
    if "forward" in groups:
        checks["forward"] += forward_checks(model, out, seen, data, meta)
    if "eval" in groups:
        checks["eval"] += eval_runs(path)
    if not {"losses", "grads", "steps"} & set(groups):
        return checks
    losses, parts = loss_values(model, x, out, p)
    if "losses" in groups:
        checks["losses"] += loss_checks(model, x, out, p, losses, parts, data)
    if {"grads", "steps"} & set(groups):
        needed = TRAINED if "grads" in groups else tuple(PHASES[ph] for ph in phases if ph != "joint2")
        grads = {loss: gradients(losses[loss], params) for loss in needed}
        kl_share = {}                                                  # KL(P||Q)'s part of the joint loss's allowance
        if "loss" in needed:
            kl_share = {n: model.gamma * COMMIT_GRAD_RTOL * max_abs(g)
                        for n, g in gradients(parts["cah"], params).items() if g is not None}
        allow = {loss: {n: GRAD_RTOL * tf_max_abs(data, meta, loss, n) + (kl_share.get(n, 0.0) if loss == "loss" else 0)
                        for n in params if n not in meta["grad_none"][loss]} for loss in needed}
        if "grads" in groups:
            checks["grads"] += gradient_checks(grads, allow, data, meta)
        if "stop" in groups:
            checks["stop"] += stop_gradients(grads, data, meta)
        del out, losses, parts
        if "steps" in groups:
            checks["steps"] += adam_steps(model, variables, grads, allow, data, meta, x, eps, phases)
    return checks


def forward_checks(model: TDPSOM, out: TOutput, seen: dict, data: dict, meta: dict) -> list[Check]:
    """The fwd/ tensors, each Dense layer's input (act/), the LSTM outputs, indices, and z from TF's own noise."""
    B, T = out.pred_loc.shape[:2]
    flat = lambda t: t.detach().reshape(-1, t.shape[-1])              # (B, T, F) -> (N, F)
    E = model.embeddings.detach().view(-1, model.latent_dim)           # (H*W, L)
    k = out.dist.argmin(1)                                             # (N,)
    nb, _ = model.bmu_neighbours(k)                                    # (N, 5): BMU, up, down, right, left
    dist_ng = model.distances(out.z.detach())
    fwd = {"enc_loc": out.loc, "enc_scale_raw": seen[f"{ENC}/dense_4/kernel:0"][1], "enc_scale": out.scale,
           "z_e_sample": out.z, "z_e_old": torch.cat([out.z[:1], out.z[:-1]]),   # unused by every loss
           "z_dist_flat": out.dist, "z_dist_flat_ng": dist_ng, "q": out.q, "q_ng": model.soft_assign(dist_ng),
           "dec_params": seen[f"{DEC}/dense_10/kernel:0"][1], "dec_loc": out.dec_loc, "dec_scale": out.dec_scale,
           "pred_params": flat(seen[f"{PRED}/dense_6/kernel:0"][1]), "pred_loc": flat(out.pred_loc),
           "pred_scale": flat(out.pred_scale), "next_state": torch.stack(out.state)}
    checks = [near(n, t, data[f"fwd/{n}"]) for n, t in fwd.items()]
    acts = {n: flat(seen[n][0]) for n in meta["dense_kernels"]} | {"lstm_output": flat(seen["lstm"])}
    checks += [near(f"act / {n}", t, data[f"act/{meta['act_same_as'].get(n, n)}"]) for n, t in acts.items()]
    W = model.som_dim[1]
    checks += [close("k", k, data["fwd/k"]), close("z_q", E[k], data["fwd/z_q"]),
               close("z_q_neighbors", E[nb], data["fwd/z_q_neighbors"]),
               close("idx/som_neighbors", model.neighbours, data["idx/som_neighbors"]),
               close("idx/bmu_neighbors_rc", torch.stack([nb // W, nb % W], -1), data["idx/bmu_neighbors_rc"]),
               close("idx/smooth_k_old", previous_bmu(k.view(B, T)).reshape(-1), data["idx/smooth_k_old"])]
    unfed = {"enc_loc": out.loc, "enc_scale": out.scale,
             "z_e_sample": out.loc + out.scale * torch.from_numpy(data["unfed/eps"])}   # TF's own noise
    return checks + [near(f"unfed {n}", t, data[f"unfed/{n}"]) for n, t in unfed.items()]


def loss_values(model: TDPSOM, x: torch.Tensor, out: TOutput, p: torch.Tensor) -> tuple[dict, dict]:
    """The reference's eleven losses, by its names, from the port's terms; and the joint loss's parts."""
    total, parts = model.joint_loss(x, out, p)
    E = model.embeddings.view(-1, model.latent_dim)                    # (H*W, L)
    k = out.dist.argmin(1)
    nb, _ = model.bmu_neighbours(k)
    z_ng = out.z.detach()                                              # the two parts of som_init_loss
    losses = {"log_lik_loss": parts["nll"], "kl_loss": parts["kl"], "loss_reconstruction_ze": parts["elbo"],
              "loss_commit": parts["cah"], "loss_som": parts["som"], "loss_prediction": parts["pred"],
              "loss_smoothness": parts["smooth"], "loss": total, "loss_commit_sd": ((z_ng - E[k]) ** 2).mean(),
              "loss_som_old": ((z_ng.unsqueeze(1) - E[nb]) ** 2).mean(), "loss_a": model.som_init_loss(out.z, out.dist)}
    return losses, parts


def loss_checks(model: TDPSOM, x: torch.Tensor, out: TOutput, p: torch.Tensor, losses: dict, parts: dict,
                data: dict) -> list[Check]:
    """Each loss within LOSS_RTOL times its condition C; C from the sizes of the terms of the losses whose terms
    have both signs (the log-likelihoods and KL(P||Q)), at each loss's scale."""
    B, T, D = x.shape
    per_entry = lambda v, loc, scale: gaussian_nll(v.unsqueeze(-1), loc.unsqueeze(-1), scale.unsqueeze(-1))
    with torch.no_grad():
        z = out.z.view(B, T, -1)
        z_next = torch.cat([z[:, 1:], z[:, -1:]], 1)                   # the forecast's targets
        sizes = {"log_lik_loss": per_entry(x.reshape(-1, D), out.dec_loc, out.dec_scale).abs().sum() / (B * T),
                 "loss_commit": (p * torch.log(p / out.q)).abs().sum() / (B * T),
                 "loss_prediction": per_entry(z_next, out.pred_loc, out.pred_scale).abs().sum() / (B * T)}
        sizes["loss_reconstruction_ze"] = sizes["log_lik_loss"] + model.prior * parts["kl"]
        sizes["loss"] = (model.theta * sizes["loss_reconstruction_ze"] + model.gamma * sizes["loss_commit"]
                         + model.beta * parts["som"] + model.kappa * parts["smooth"].abs()
                         + model.eta * sizes["loss_prediction"])
        C = {n: float(sizes[n] / v.abs()) if n in sizes else 1.0 for n, v in losses.items()}
    return [close(n, v.detach(), data[f"loss/{n}"], rtol=LOSS_RTOL * C[n]) for n, v in losses.items()]


def gradients(loss: torch.Tensor, params: dict) -> dict:
    """TF name -> the gradient of loss (None where it has none), the graph kept for the next loss."""
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()), retain_graph=True, allow_unused=True)))


def tf_max_abs(data: dict, meta: dict, loss: str, name: str) -> float:
    """max |TF's gradient|: stored for a large tensor, else from the full gradient."""
    return float(data[f"gradmaxabs/{loss}/{name}"]) if name in meta["large"] else max_abs(data[f"grad/{loss}/{name}"])


def gradient_checks(grads: dict, allow: dict, data: dict, meta: dict) -> list[Check]:
    """The port's gradients against TF's within each tensor's allowance (a large tensor at its stored indices, and
    its max |g|); where either has none is for stop_gradients."""
    checks = []
    for loss, by_name in grads.items():
        for name, g in by_name.items():
            if g is not None and name in allow[loss]:
                checks.append(close(f"grad {loss} / {name}", tf_entries(data, meta, name, g),
                                    tf_grad(data, meta, loss, name), atol=allow[loss][name]))
                if name in meta["large"]:
                    checks.append(close(f"grad {loss} max|g| / {name}", max_abs(g),
                                        data[f"gradmaxabs/{loss}/{name}"], atol=allow[loss][name]))
    return checks


def stop_gradients(grads: dict, data: dict, meta: dict) -> list[Check]:
    """Where TF's gradient is None the port's is None or 0; elsewhere it is not, and exact zeros coincide."""
    checks = []
    for loss, by_name in grads.items():
        for name, g in by_name.items():
            where, nonzero = f"{loss} / {name}", g is not None and bool(g.any())
            if name in meta["grad_none"][loss]:
                checks.append(fact(f"stop-gradient {where}", not nonzero, "TF has none: the port's must be None or 0"))
            elif not nonzero:
                checks.append(fact(f"stop-gradient {where}", False, "TF has a gradient, the port has none"))
            else:
                got, ref = tf_entries(data, meta, name, g) == 0, tf_grad(data, meta, loss, name) == 0
                checks.append(fact(f"exact zeros {where}", torch.equal(got, ref),
                                   f"{int(got.sum())} exact zeros in the port, {int(ref.sum())} in TF (must coincide)"))
    return checks


# ---- eval mode: a forecast from a given state, the decoder on given codes --------------------------------
def eval_runs(path: Path) -> list[Check]:
    """The forecast from eval/pred_init_state over eval/pred_z_e_p, and the decoder on eval/dec_z; TF's named
    outputs are samples, loc + scale * the fed noise."""
    data = golden(path)[0]
    model = loaded_model(path)
    B, T, _ = (int(v) for v in data["eval/pred_x_shape"])
    z = torch.from_numpy(data["eval/pred_z_e_p"]).view(B, T, -1)
    h0, c0 = torch.from_numpy(data["eval/pred_init_state"])
    seen = {}
    hook = model.lstm.register_forward_hook(lambda m, i, o: seen.__setitem__("lstm", o[0]))
    with torch.no_grad():
        loc, scale, state = model.predict(z, (h0, c0))
        dec_loc, dec_scale = model.decode(torch.from_numpy(data["eval/dec_z"]))
    hook.remove()
    got = {"pred_loc": loc.reshape(B * T, -1), "pred_scale": scale.reshape(B * T, -1),
           "pred_next_state": torch.stack(state), "pred_lstm_output": seen["lstm"].reshape(B * T, -1),
           "pred_next_z_e": loc + scale * torch.from_numpy(data["eval/pred_sample_noise"]).view(B, T, -1),
           "dec_loc": dec_loc, "dec_scale": dec_scale,
           "dec_x_hat": dec_loc + dec_scale * torch.from_numpy(data["eval/dec_sample_noise"])[0]}
    return [near(f"eval {n}", t, data[f"eval/{n}"]) for n, t in got.items()]

"""Adam with TensorFlow 1's update rule, for the tf_original parity mode.

tf.train.AdamOptimizer keeps one pair of beta powers for the whole optimiser, advanced on every step of
every train op sharing it, and folds the bias correction into the step size:
    lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t),   theta -= lr_t * m / (sqrt(v) + eps)
with t the optimiser's global step count. torch.optim.Adam instead counts steps per parameter and adds
eps after its own bias correction. Parameters whose gradient is None are skipped, as TF skips variables
without a gradient, but they still see the shared step count.
"""
import math

import torch

CHUNK = 65536   # elements per piece of a large parameter's CPU update: m, v, g, p and a buffer fit in a 2 MB L2


def _one_minus(b1: float, b2: float, dtype: torch.dtype) -> tuple[float, float]:
    """1 - beta1, 1 - beta2 as TF forms them, in the variable's dtype: in float32 0.100000024 and 0.0009999871."""
    return tuple(float(1 - torch.tensor(b, dtype=dtype)) for b in (b1, b2))


class TF1Adam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.global_step = 0   # steps taken by this optimiser, whatever loss they minimised
        self._scratch = {}     # (device, dtype) -> a CHUNK-long buffer for sqrt(v) + eps

    @torch.no_grad()
    def step(self, closure=None):
        self.global_step += 1
        for group in self.param_groups:
            b1, b2 = group["betas"]
            t = self.global_step
            lr_t = group["lr"] * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            # small parameters: one multi-tensor update per (device, dtype), a few kernels a step in all
            lists = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                if p.device.type == "cpu" and p.numel() > CHUNK and p.is_contiguous() and p.grad.is_contiguous():
                    self._update_in_chunks(p, state["m"], state["v"], p.grad, b1, b2, group["eps"], lr_t)
                    continue
                ps, gs, ms, vs = lists.setdefault((p.device, p.dtype), ([], [], [], []))
                ps.append(p), gs.append(p.grad), ms.append(state["m"]), vs.append(state["v"])
            for (_, dtype), (ps, gs, ms, vs) in lists.items():
                c1, c2 = _one_minus(b1, b2, dtype)
                torch._foreach_mul_(ms, b1)
                torch._foreach_add_(ms, gs, alpha=c1)
                torch._foreach_mul_(vs, b2)
                torch._foreach_addcmul_(vs, gs, gs, value=c2)
                denom = torch._foreach_sqrt(vs)
                torch._foreach_add_(denom, group["eps"])
                torch._foreach_addcdiv_(ps, ms, denom, value=-lr_t)

    def _update_in_chunks(self, p, m, v, g, b1, b2, eps, lr_t):
        """The update above, run piece by piece through a large parameter (the posterior head's 10 million).

        Each operation reads and writes a whole tensor, so over the whole parameter the seven of them stream
        m, v, g, p and sqrt(v) + eps through memory again and again; over a CHUNK they stay in the core's cache,
        and sqrt(v) + eps goes into one reused buffer instead of a fresh tensor of the parameter's size. Every
        element sees the same operations in the same order: the numbers are the loop's, bit for bit.
        """
        c1, c2 = _one_minus(b1, b2, p.dtype)
        key = (p.device, p.dtype)
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty(CHUNK, dtype=p.dtype, device=p.device)
        p, m, v, g = p.view(-1), m.view(-1), v.view(-1), g.view(-1)
        n = p.numel()
        for i in range(0, n, CHUNK):
            j = min(i + CHUNK, n)
            mi, vi, gi, d = m[i:j], v[i:j], g[i:j], buf[:j - i]
            mi.mul_(b1).add_(gi, alpha=c1)
            vi.mul_(b2).addcmul_(gi, gi, value=c2)
            torch.sqrt(vi, out=d).add_(eps)
            p[i:j].addcdiv_(mi, d, value=-lr_t)

    def state_dict(self):
        return {**super().state_dict(), "global_step": self.global_step}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.global_step = state_dict.pop("global_step")
        super().load_state_dict(state_dict)

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


class TF1Adam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.global_step = 0   # steps taken by this optimiser, whatever loss they minimised

    @torch.no_grad()
    def step(self, closure=None):
        self.global_step += 1
        for group in self.param_groups:
            b1, b2 = group["betas"]
            t = self.global_step
            lr_t = group["lr"] * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            # one multi-tensor update per (device, dtype): a few kernels a step instead of five per parameter
            lists = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                ps, gs, ms, vs = lists.setdefault((p.device, p.dtype), ([], [], [], []))
                ps.append(p), gs.append(p.grad), ms.append(state["m"]), vs.append(state["v"])
            for (_, dtype), (ps, gs, ms, vs) in lists.items():
                # TF forms 1 - beta in the variable's dtype: in float32 0.100000024 and 0.0009999871, not 0.1, 0.001
                c1, c2 = (float(1 - torch.tensor(b, dtype=dtype)) for b in (b1, b2))
                torch._foreach_mul_(ms, b1)
                torch._foreach_add_(ms, gs, alpha=c1)
                torch._foreach_mul_(vs, b2)
                torch._foreach_addcmul_(vs, gs, gs, value=c2)
                denom = torch._foreach_sqrt(vs)
                torch._foreach_add_(denom, group["eps"])
                torch._foreach_addcdiv_(ps, ms, denom, value=-lr_t)

    def state_dict(self):
        return {**super().state_dict(), "global_step": self.global_step}

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.global_step = state_dict.pop("global_step")
        super().load_state_dict(state_dict)

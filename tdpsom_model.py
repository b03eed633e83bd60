"""T-DPSOM: DPSOM's map over the latent codes of every time step, and an LSTM that forecasts the next code.

Manduchi et al., "T-DPSOM: An Interpretable Clustering Method for Unsupervised Learning of Patient Health
States" (ACM CHIL 2021). Reference: TempDPSOM_model.py (class TDPSOM) in ratschlab/dpsom, whose graph
docs/tdpsom-design.md §2 describes. A batch x is (B, T, D): B sequences of T steps of D features. Every step is
encoded on its own, as row n = b*T + t of an (N, D) matrix, N = B*T; the LSTM then reads each sequence's codes.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from dpsom_model import LEAKY_SLOPE, FrozenBatchNorm, _block
from som import SOMMixin, student_t

LSTM_GATES = ("hard_sigmoid", "sigmoid")
LAST_STEP_TARGETS = ("self", "drop")
HARD_SIGMOID = (0.2, 0.5)   # Keras' hard_sigmoid(a) = clip(0.2 a + 0.5, 0, 1): slope and shift
LOG_2PI = math.log(2 * math.pi)

State = tuple[torch.Tensor, torch.Tensor]   # the LSTM's (h, c), each (B, lstm_dim)


class TOutput(NamedTuple):
    loc: torch.Tensor                  # (N, L) posterior mean, N = B*T rows b*T + t
    scale: torch.Tensor                # (N, L) posterior standard deviation, softplus of its head
    z: torch.Tensor                    # (N, L) the one sample shared by decoder, SOM, LSTM and losses
    dec_loc: Optional[torch.Tensor]    # (N, D) decoder mean, None when decoding was skipped
    dec_scale: Optional[torch.Tensor]  # (N, D) decoder standard deviation
    dist: torch.Tensor                 # (N, H*W) squared distances ||z_n - E_j||^2
    q: torch.Tensor                    # (N, H*W) Student's t soft assignments
    pred_loc: Optional[torch.Tensor]   # (B, T, L) mean of the forecast of step t+1's code, None when skipped
    pred_scale: Optional[torch.Tensor]  # (B, T, L) its standard deviation
    state: Optional[State]             # the LSTM's (h_T, c_T) after the last step


def hard_sigmoid(a: torch.Tensor) -> torch.Tensor:
    slope, shift = HARD_SIGMOID
    return torch.clamp(a * slope + shift, 0.0, 1.0)


def previous_bmu(k: torch.Tensor) -> torch.Tensor:
    """(B, T) BMUs -> each step's previous BMU; step 0 keeps its own (the reference's loss_smoothness)."""
    return torch.cat([k[:, :1], k[:, :-1]], dim=1)


def gaussian_nll(x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """-log N(x; loc, diag scale^2), summed over the last axis: (..., F) -> (...)."""
    return (0.5 * ((x - loc) / scale) ** 2 + torch.log(scale)).sum(-1) + 0.5 * LOG_2PI * x.shape[-1]


class KerasLSTM(nn.Module):
    """One LSTM layer computed as Keras' LSTM computes it, so that the reference's three arrays load unchanged.

    Gates [i, f, c, o] in blocks of `hidden` columns, one input kernel, one recurrent kernel and one bias
    (nn.LSTM has two biases). `gates`: "hard_sigmoid", the default of the Keras v1 LSTM that the reference's
    tf.keras.layers.LSTM is under tf.compat.v1, or "sigmoid", as PyTorch and Keras 2+ compute them. Initialised
    as Keras: Glorot-uniform input kernel, orthogonal recurrent kernel, bias 0 except 1 in the forget block
    (unit_forget_bias: a value of the bias, not a constant the cell adds as TF's LSTMCell does).
    """

    def __init__(self, input_size: int, hidden: int, gates: str = "hard_sigmoid"):
        super().__init__()
        if gates not in LSTM_GATES:
            raise ValueError(f"lstm_gates must be one of {LSTM_GATES}, got {gates!r}")
        self.hidden, self.gates = hidden, gates
        self.weight_ih = nn.Parameter(nn.init.xavier_uniform_(torch.empty(4 * hidden, input_size)))
        self.weight_hh = nn.Parameter(nn.init.orthogonal_(torch.empty(4 * hidden, hidden)))
        bias = torch.zeros(4 * hidden)
        bias[hidden:2 * hidden] = 1.0                                  # the forget block
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor, state: Optional[State] = None) -> tuple[torch.Tensor, State]:
        """x (B, T, I) from state (h, c) (zeros when None) -> outputs h_1..h_T (B, T, H) and (h_T, c_T)."""
        B, T, _ = x.shape
        gate = hard_sigmoid if self.gates == "hard_sigmoid" else torch.sigmoid
        h, c = (x.new_zeros(B, self.hidden), x.new_zeros(B, self.hidden)) if state is None else state
        gx = F.linear(x, self.weight_ih, self.bias)                    # (B, T, 4H): the inputs' share, all steps
        outputs = []
        for t in range(T):
            i, f, g, o = (gx[:, t] + h @ self.weight_hh.T).chunk(4, dim=1)   # (B, H) each
            c = gate(f) * c + gate(i) * torch.tanh(g)
            h = gate(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h, c)                     # (B, T, H)


class TDPSOM(SOMMixin, nn.Module):
    """Dense VAE with a diagonal Gaussian posterior and a Gaussian decoder, an H x W SOM over the codes, and an
    LSTM with a dense head that gives a Gaussian forecast of each step's next code.

    The defaults are the reference's: the sizes and weights TempDPSOM.py's main() passes, and its numerics
    (BatchNorm frozen after the activation, no dropout, hard-sigmoid gates, the last step predicting itself).
    """

    def __init__(self, input_dim: int = 98, latent_dim: int = 50, som_dim: tuple[int, int] = (16, 16),
                 lstm_dim: int = 200, alpha: float = 10.0, beta: float = 10.0, gamma: float = 50.0,
                 kappa: float = 1.0, theta: float = 1.0, eta: float = 1.0, prior: float = 1e-5,
                 toroidal: bool = True, batchnorm: str = "frozen", dropout: float = 0.0,
                 lstm_gates: str = "hard_sigmoid", last_step_target: str = "self"):
        """alpha: Student's t degrees of freedom; theta, gamma, beta, kappa, eta: weights of the ELBO, KL(P||Q),
        SOM, smoothness and prediction terms; prior: weight of the KL inside the ELBO. last_step_target: "self"
        (the reference: the last step's forecast target is that step itself) or "drop" (only the T-1 real
        transitions of each sequence count)."""
        super().__init__()
        if batchnorm not in ("standard", "frozen"):
            raise ValueError(f"batchnorm must be 'standard' or 'frozen', got {batchnorm!r}")
        if last_step_target not in LAST_STEP_TARGETS:
            raise ValueError(f"last_step_target must be one of {LAST_STEP_TARGETS}, got {last_step_target!r}")
        self.input_dim, self.latent_dim, self.som_dim, self.lstm_dim = input_dim, latent_dim, tuple(som_dim), lstm_dim
        self.alpha, self.beta, self.gamma, self.kappa, self.theta, self.eta = alpha, beta, gamma, kappa, theta, eta
        self.prior, self.last_step_target = prior, last_step_target
        frozen, L = batchnorm == "frozen", latent_dim

        # Modules in the reference's variable order: embeddings, encoder, prediction, decoder.
        self.init_som(toroidal)                                        # embeddings (H, W, L) and neighbours
        # Deviation: dropout after each block. The reference's Dropout sat before its BN but was inactive.
        drop = (lambda: nn.Dropout(dropout)) if dropout > 0 else nn.Identity
        self.encoder = nn.Sequential(
            _block(nn.Linear(input_dim, 500), 500, frozen, False), drop(),
            _block(nn.Linear(500, 500), 500, frozen, False), drop(),
            _block(nn.Linear(500, 2000), 2000, frozen, False), drop())
        self.enc_loc = nn.Linear(2000, L)                              # two Dense heads on the same features
        self.enc_scale = nn.Linear(2000, L)                            # raw, before the softplus
        self.lstm = KerasLSTM(L, lstm_dim, lstm_gates)
        self.predictor = nn.Sequential(nn.Linear(lstm_dim, lstm_dim), nn.LeakyReLU(LEAKY_SLOPE),
                                       nn.Linear(lstm_dim, 2 * L))     # [loc | raw scale] of the next code
        self.decoder = nn.Sequential(
            _block(nn.Linear(L, 2000), 2000, frozen, False),
            _block(nn.Linear(2000, 500), 500, frozen, False),
            _block(nn.Linear(500, 500), 500, frozen, False),
            nn.Linear(500, 2 * input_dim))                             # [loc | raw scale] of x
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)   # Glorot-uniform kernels, zero biases, as Keras
                nn.init.zeros_(m.bias)

    # ---- networks -------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> posterior loc (N, L) and scale (N, L) = softplus(raw), no floor (tfp's Softplus bijector)."""
        h = self.encoder(x)                                            # (N, 2000)
        return self.enc_loc(h), F.softplus(self.enc_scale(h))

    @staticmethod
    def sample(loc: torch.Tensor, scale: torch.Tensor, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z = loc + scale * eps, eps ~ N(0, I) unless given (the reference's MultivariateNormalDiag.sample)."""
        return loc + scale * (torch.randn_like(loc) if eps is None else eps)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (N, L) -> the decoder's Normal per feature: loc (N, D), scale (N, D) = softplus, no epsilon
        (tfp's IndependentNormal)."""
        loc, raw = self.decoder(z).split(self.input_dim, dim=1)       # (N, D) each
        return loc, F.softplus(raw)

    def predict(self, z: torch.Tensor, state: Optional[State] = None
                ) -> tuple[torch.Tensor, torch.Tensor, State]:
        """Forecast from codes z (B, T, L), the LSTM starting at state (zeros when None, as in training):
        the Normal of each step's next code, loc and scale (B, T, L), and the state after the last step.

        Roll-outs feed back a sample or the loc as the next z, with the returned state.
        """
        out, state = self.lstm(z.detach(), state)                      # (B, T, H); reference: stop_gradient(rnn_input)
        loc, raw = self.predictor(out).split(self.latent_dim, dim=-1)  # (B, T, L) each
        return loc, F.softplus(raw), state

    def forward(self, x: torch.Tensor, eps: Optional[torch.Tensor] = None, sample: bool = True,
                decode: bool = True, predict: bool = True) -> TOutput:
        """One pass over x (B, T, D); z is drawn once (z = loc when sample=False; eps (N, L) when given) and
        shared by everything after. decode / predict False skip the decoder / the LSTM."""
        B, T, D = x.shape
        loc, scale = self.encode(x.reshape(B * T, D))                  # (N, L) each
        z = self.sample(loc, scale, eps) if sample else loc
        dist = self.distances(z)                                       # (N, H*W)
        dec_loc, dec_scale = self.decode(z) if decode else (None, None)
        pred_loc, pred_scale, state = self.predict(z.view(B, T, -1)) if predict else (None, None, None)
        return TOutput(loc, scale, z, dec_loc, dec_scale, dist, self.soft_assign(dist), pred_loc, pred_scale, state)

    # ---- loss terms -----------------------------------------------------------------------------
    def nll(self, x: torch.Tensor, dec_loc: torch.Tensor, dec_scale: torch.Tensor) -> torch.Tensor:
        """-log p(x | z) summed over features, mean over rows (the reference's log_lik_loss)."""
        return gaussian_nll(x, dec_loc, dec_scale).mean()

    def kl_prior(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Analytic KL(N(loc, diag scale^2) || N(0, I)) summed over L, mean over rows (the reference's kl_loss)."""
        return (0.5 * (scale ** 2 + loc ** 2 - 1.0) - torch.log(scale)).sum(1).mean()

    def elbo(self, x: torch.Tensor, out: TOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Negative ELBO = NLL + prior * KL (the reference's loss_reconstruction_ze); returns (elbo, nll, kl)."""
        nll = self.nll(x.reshape(out.dec_loc.shape), out.dec_loc, out.dec_scale)
        kl = self.kl_prior(out.loc, out.scale)
        return nll + self.prior * kl, nll, kl

    def smoothness_loss(self, z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """-mean over steps of the Student's t kernel between z_t and the prototype of the previous step's BMU.

        z (B, T, L), k (B, T) the BMUs; step 0 is compared with its own BMU (the reference's loss_smoothness). The
        prototypes receive no gradient from it.
        """
        E = self.embeddings.view(-1, self.latent_dim)                 # (H*W, L)
        e = E[previous_bmu(k)].detach()                                # (B, T, L); reference: stop_gradient(e)
        return -student_t(((z - e) ** 2).sum(-1), self.alpha).mean()

    def prediction_loss(self, z: torch.Tensor, pred_loc: torch.Tensor, pred_scale: torch.Tensor) -> torch.Tensor:
        """-log N(z_{t+1}; forecast of step t), summed over L, mean over the steps; z (B, T, L) a fixed target.

        last_step_target "self": every step counts and the last one's target is itself (the reference pads the
        shifted targets with the last step); "drop": only the T-1 real transitions of each sequence.
        """
        z = z.detach()                                                 # reference: stop_gradient(z_e_next)
        if self.last_step_target == "self":
            target = torch.cat([z[:, 1:], z[:, -1:]], dim=1)           # (B, T, L)
            return gaussian_nll(target, pred_loc, pred_scale).mean()
        if z.shape[1] < 2:
            raise ValueError("last_step_target='drop' needs sequences of at least 2 steps")
        return gaussian_nll(z[:, 1:], pred_loc[:, :-1], pred_scale[:, :-1]).mean()

    def joint_loss(self, x: torch.Tensor, out: TOutput, p: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """theta ELBO + gamma KL(P||Q) + beta SOM + kappa smoothness + eta prediction (the reference's loss);
        returns the total and its parts for logging. p (N, H*W) is the target distribution of the rows."""
        B, T = out.pred_loc.shape[:2]
        z = out.z.view(B, T, -1)                                       # (B, T, L)
        elbo, nll, kl = self.elbo(x, out)
        cah = self.clustering_kl(p, out.q)
        som = self.som_loss(out.z, out.q)
        smooth = self.smoothness_loss(z, out.dist.argmin(dim=1).view(B, T))
        pred = self.prediction_loss(z, out.pred_loc, out.pred_scale)
        total = self.theta * elbo + self.gamma * cah + self.beta * som + self.kappa * smooth + self.eta * pred
        return total, {"loss": total, "elbo": elbo, "nll": nll, "kl": kl, "cah": cah, "som": som,
                       "smooth": smooth, "pred": pred}

    # ---- the TensorFlow original's weights (dpsom_model.load_tf_arrays) --------------------------
    def tf_variables(self) -> dict[str, torch.Tensor]:
        """The reference's variable names -> this model's tensors (PyTorch layout), in the reference's order.

        Keras numbers Dense and BatchNormalization layers over the whole graph in the order they were built:
        encoder dense..dense_4, the prediction head dense_5 and dense_6, decoder dense_7..dense_10.
        """
        def dense(scope: str, layer: nn.Linear) -> dict:
            return {f"{scope}/kernel:0": layer.weight, f"{scope}/bias:0": layer.bias}

        def batchnorm(scope: str, bn: FrozenBatchNorm) -> dict:
            return {f"{scope}/gamma:0": bn.weight, f"{scope}/beta:0": bn.bias,
                    f"{scope}/moving_mean:0": bn.running_mean, f"{scope}/moving_variance:0": bn.running_var}

        enc, pred, dec = "z_e/encoder", "prediction/next_state", "reconstruction_e/decoder"
        bn_name = lambda i: "batch_normalization" + (f"_{i}" if i else "")
        dense_name = lambda i: "dense" + (f"_{i}" if i else "")
        v = {"embeddings/embeddings:0": self.embeddings}
        for i, block in enumerate(self.encoder[::2]):                  # (Linear, act, BN); dropouts between
            v |= dense(f"{enc}/{dense_name(i)}", block[0]) | batchnorm(f"{enc}/{bn_name(i)}", block[2])
        v |= dense(f"{enc}/dense_3", self.enc_loc) | dense(f"{enc}/dense_4", self.enc_scale)
        v |= {f"{pred}/lstm/lstm_cell/kernel:0": self.lstm.weight_ih,
              f"{pred}/lstm/lstm_cell/recurrent_kernel:0": self.lstm.weight_hh,
              f"{pred}/lstm/lstm_cell/bias:0": self.lstm.bias}
        v |= dense(f"{pred}/dense_5", self.predictor[0]) | dense(f"{pred}/dense_6", self.predictor[2])
        for i, block in enumerate(self.decoder[:3]):
            v |= dense(f"{dec}/dense_{7 + i}", block[0]) | batchnorm(f"{dec}/{bn_name(3 + i)}", block[2])
        return v | dense(f"{dec}/dense_10", self.decoder[3])

    def tf_mode_switches(self) -> list[str]:
        """The constructor settings that differ from the reference's numerics; empty in tf_original mode."""
        switches = []
        if any(isinstance(m, nn.BatchNorm1d) for m in self.modules()):
            switches.append("batchnorm='frozen'")
        if any(isinstance(m, nn.Dropout) for m in self.modules()):
            switches.append("dropout=0")
        if self.lstm.gates != "hard_sigmoid":
            switches.append("lstm_gates='hard_sigmoid'")
        if self.last_step_target != "self":
            switches.append("last_step_target='self'")
        return switches

"""DPSOM: a VAE whose latent space holds a grid of SOM prototypes, and the loss terms of the paper.

Manduchi et al., "DPSOM: Deep Probabilistic Clustering with Self-Organizing Maps" (arXiv 1910.01590)
and T-DPSOM (ACM CHIL 2021). Reference: TensorFlow code in ratschlab/dpsom, folder dpsom/.
"""
import math
from typing import Mapping, NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fast_ops import BF16Linear, FillScaleTriL, fill_scale_tril_indices
from som import SOMMixin

TF_BN_EPS = 1e-3         # Keras BatchNormalization's default epsilon
LEAKY_SLOPE = 0.2        # tf.nn.leaky_relu's default slope
MNIST_SHAPE = (1, 28, 28)  # (C, H, W) of the default data
LIKELIHOODS = ("bernoulli", "gaussian")


class Output(NamedTuple):
    loc: torch.Tensor        # (B, D) posterior mean
    scale: torch.Tensor      # (B, D) log-variance ("diag") or (B, D, D) lower-triangular scale ("tril")
    z: torch.Tensor          # (B, D) the one sample shared by decoder, distances, q and losses
    logits: Optional[torch.Tensor]  # (B, F) Bernoulli logits or Gaussian means, None when decoding was skipped
    dist: torch.Tensor       # (B, H*W) squared distances ||z_i - E_j||^2
    q: torch.Tensor          # (B, H*W) Student's t soft assignments


class FrozenBatchNorm(nn.Module):
    """Keras BatchNormalization in inference mode with moving stats that never move (the reference's case).

    TF never set the Keras learning phase, so every BN was y = gamma * (x - 0) / sqrt(1 + 1e-3) + beta.
    """

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("running_mean", torch.zeros(width))
        self.register_buffer("running_var", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)   # channel axis 1 for (B, C) and (B, C, H, W)
        scale = self.weight / torch.sqrt(self.running_var + TF_BN_EPS)
        return (x - self.running_mean.view(shape)) * scale.view(shape) + self.bias.view(shape)


def _block(layer: nn.Module, width: int, frozen_bn_after_act: bool, conv: bool) -> nn.Sequential:
    """Layer, BatchNorm and LeakyReLU in the port's order, or the reference's layer -> act -> frozen BN."""
    act = nn.LeakyReLU(LEAKY_SLOPE)
    if frozen_bn_after_act:
        return nn.Sequential(layer, act, FrozenBatchNorm(width))
    return nn.Sequential(layer, nn.BatchNorm2d(width) if conv else nn.BatchNorm1d(width), act)


def nll_per_sample(x: torch.Tensor, out: torch.Tensor, likelihood: str) -> torch.Tensor:
    """(B,) negative log-likelihood of each sample x (B, F), summed over features.

    bernoulli: out are logits, BCE with logits. gaussian: out are means, N(mean, 1) per feature:
    0.5 * (x - mean)^2 + 0.5 * log(2 pi).
    """
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(out, x, reduction="none").sum(1)
    return 0.5 * ((x - out) ** 2).sum(1) + 0.5 * x.shape[1] * math.log(2 * math.pi)


def check_conv_shape(shape: tuple) -> None:
    """The convolutional networks take images (C, H, W) whose sides two 2x poolings halve exactly."""
    if len(shape) != 3:
        raise ValueError(f"convolution=True needs images (C, H, W); these samples are vectors of {shape[0]} "
                         f"features: use the dense model (convolution=False)")
    _, H, W = shape
    if H % 4 or W % 4 or H < 4 or W < 4:
        fit = lambda n: (f"{n - n % 4} or {n + (-n) % 4}" if n > 4 else "4") if n % 4 else str(n)
        raise ValueError(f"convolution=True halves the image twice, so both sides must be multiples of 4; these "
                         f"images are {H}x{W}: crop or pad them to {fit(H)} by {fit(W)} pixels, or use the dense "
                         f"model (convolution=False)")


class DPSOM(SOMMixin, nn.Module):
    """VAE encoder/decoder (dense or convolutional) plus an H x W grid of SOM prototypes in latent space.

    The constructor's defaults build the standard layers (BatchNorm with batch statistics, dropout, plain
    logits); the experiment's config (dpsom.py) chooses the reference's frozen BatchNorm, no dropout and leaky
    logits, which reach the published purity.
    """

    def __init__(self, latent_dim: int = 100, som_dim: tuple[int, int] = (8, 8), alpha: float = 10.0,
                 beta: float = 0.25, gamma: float = 20.0, theta: float = 1.0, prior: float = 0.5,
                 prior_var: float = 1.0, dropout: float = 0.4, convolution: bool = False,
                 toroidal: bool = True, posterior: str = "diag", batchnorm: str = "standard",
                 leaky_logits: bool = False, amp: bool = False, input_shape: tuple = MNIST_SHAPE,
                 likelihood: str = "bernoulli"):
        """input_shape: one sample, (D,) for vectors or (C, H, W) for images (inputs come flattened, (B, C*H*W));
        likelihood: "bernoulli" (values in [0, 1], the decoder gives logits) or "gaussian" (unit variance per
        feature, the decoder gives means)."""
        super().__init__()
        if posterior not in ("diag", "tril"):
            raise ValueError(f"posterior must be 'diag' or 'tril', got {posterior!r}")
        if batchnorm not in ("standard", "frozen"):
            raise ValueError(f"batchnorm must be 'standard' or 'frozen', got {batchnorm!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        self.input_shape, self.likelihood = tuple(input_shape), likelihood
        if convolution:
            check_conv_shape(self.input_shape)
        self.latent_dim, self.som_dim = latent_dim, tuple(som_dim)
        self.alpha, self.beta, self.gamma, self.theta = alpha, beta, gamma, theta
        self.prior, self.prior_var = prior, prior_var
        self.convolution, self.posterior, self.leaky_logits = convolution, posterior, leaky_logits
        self.amp = amp   # bf16 products in the encoder, decoder and head; the head's output, SOM and losses float32
        frozen = batchnorm == "frozen"
        D = latent_dim

        width = math.prod(self.input_shape)                            # F, 784 for MNIST
        if convolution:
            C, Hi, Wi = self.input_shape
            self.feature_map = (Hi // 4, Wi // 4)                        # (7, 7) for MNIST: two 2x poolings
            conv = lambda i, o: nn.Conv2d(i, o, 3, padding=1)
            self.encoder = nn.Sequential(
                _block(conv(C, 32), 32, frozen, True), nn.MaxPool2d(2),
                _block(conv(32, 64), 64, frozen, True), nn.MaxPool2d(2),
                _block(conv(64, 128), 128, frozen, True),
                _block(conv(128, 256), 256, frozen, True))
            features = math.prod(self.feature_map) * 256
            self.decoder_in = nn.Sequential(nn.Linear(D, features), nn.LeakyReLU(LEAKY_SLOPE))  # no BN
            convt = lambda i, o: nn.ConvTranspose2d(i, o, 3, padding=1)
            self.decoder = nn.Sequential(
                _block(convt(256, 128), 128, frozen, True),
                _block(convt(128, 64), 64, frozen, True), nn.Upsample(scale_factor=2, mode="nearest"),
                _block(convt(64, 32), 32, frozen, True), nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(32, C, 3, padding=1))
        else:
            # Port: dropout after encoder layers 1 and 2. Deviation: the reference's Dropout was inactive.
            drop = (lambda: nn.Dropout(dropout)) if dropout > 0 else nn.Identity
            self.encoder = nn.Sequential(
                _block(nn.Linear(width, 500), 500, frozen, False), drop(),
                _block(nn.Linear(500, 500), 500, frozen, False), drop(),
                _block(nn.Linear(500, 2000), 2000, frozen, False))
            features = 2000
            self.decoder_in = nn.Identity()
            self.decoder = nn.Sequential(
                _block(nn.Linear(D, 2000), 2000, frozen, False),
                _block(nn.Linear(2000, 500), 500, frozen, False),
                _block(nn.Linear(500, 500), 500, frozen, False),
                nn.Linear(500, width))
        head_width = 2 * D if posterior == "diag" else D + D * (D + 1) // 2
        self.head = nn.Linear(features, head_width)
        self.init_som(toroidal)                                        # embeddings (H, W, D) and neighbours
        if posterior == "tril":
            gather, scatter, diag = fill_scale_tril_indices(D)
            self.register_buffer("tril_gather", gather, persistent=False)    # (D*D,)
            self.register_buffer("tril_scatter", scatter, persistent=False)  # (D(D+1)/2,)
            self.register_buffer("tril_diag", diag, persistent=False)        # (D,)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.xavier_uniform_(m.weight)   # Glorot-uniform kernels, zero biases, as Keras
                nn.init.zeros_(m.bias)
        if convolution:
            # NHWC kernels (channels_last): a CPU's oneDNN runs these layers' products, pooling and upsampling
            # faster in it (docs/speed.md), and the encoder's output and decoder's input are read in TF's
            # H, W, C order anyway. Each product sums in another order than NCHW's: same maths, other rounding.
            self.to(memory_format=torch.channels_last)

    # ---- networks -------------------------------------------------------------------------------
    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, F) -> posterior loc (B, D) and log-variance (B, D) or scale_tril (B, D, D)."""
        with self._autocast(x.device):
            if self.convolution:
                h = x.view(-1, *self.input_shape)                      # (B, C, H, W)
                h = self.encoder(h - 0.5 if self.likelihood == "bernoulli" else h)  # centre [0, 1] pixels
                h = h.permute(0, 2, 3, 1).flatten(1)                   # (B, 12544) for MNIST, TF's H,W,C order
            else:
                h = self.encoder(x)                                    # (B, 2000)
        # float32 out even under amp: z feeds the SOM's distances
        o = BF16Linear.apply(h, self.head.weight, self.head.bias) if self.amp else self.head(h)   # (B, head_width)
        D = self.latent_dim
        loc = o[:, :D]                                                 # (B, D)
        if self.posterior == "diag":
            return loc, o[:, D:]                                       # (B, D) logvar
        return loc, FillScaleTriL.apply(o[:, D:], self.tril_gather, self.tril_scatter, self.tril_diag)   # (B, D, D)

    def sample(self, loc: torch.Tensor, scale: torch.Tensor, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """z = loc + sigma * eps (diag) or loc + L eps (tril); eps ~ N(0, I) unless given."""
        eps = torch.randn_like(loc) if eps is None else eps
        if self.posterior == "diag":
            return loc + torch.exp(0.5 * scale) * eps
        return loc + (scale @ eps.unsqueeze(-1)).squeeze(-1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) -> Bernoulli logits or Gaussian means (B, F)."""
        with self._autocast(z.device):
            h = self.decoder_in(z)
            if self.convolution:
                h = h.view(-1, *self.feature_map, 256).permute(0, 3, 1, 2)   # TF's NHWC reshape, then NCHW
            logits = self.decoder(h).flatten(1).to(z.dtype)            # (B, F)
        # tf_original: the reference's last dense layer had activation=leaky_relu on its logits; its conv
        # decoder ends in a linear Conv2D, so the switch only concerns the dense decoder.
        return F.leaky_relu(logits, LEAKY_SLOPE) if self.leaky_logits and not self.convolution else logits

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        """The decoder's expected value of x: sigmoid of the logits (Bernoulli) or the means themselves."""
        return torch.sigmoid(logits) if self.likelihood == "bernoulli" else logits

    def forward(self, x: torch.Tensor, eps: Optional[torch.Tensor] = None, sample: bool = True,
                decode: bool = True) -> Output:
        """One pass; z is drawn once (or z = loc when sample=False) and shared by everything after."""
        loc, scale = self.encode(x)
        z = self.sample(loc, scale, eps) if sample else loc
        dist = self.distances(z)
        return Output(loc, scale, z, self.decode(z) if decode else None, dist, self.soft_assign(dist))

    # ---- loss terms -----------------------------------------------------------------------------
    def nll(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood summed over features, mean over the batch (see nll_per_sample)."""
        return nll_per_sample(x, logits, self.likelihood).mean()

    def kl_prior(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Analytic KL(q(z|x) || N(0, prior_var^2 I)), mean over the batch (prior_var is a std)."""
        s2 = float(self.prior_var) ** 2
        D = self.latent_dim
        if self.posterior == "diag":
            kl = 0.5 * (scale.exp() / s2 + loc ** 2 / s2 - 1.0 + math.log(s2) - scale).sum(1)
        else:
            log_det = 2.0 * torch.log(torch.diagonal(scale, dim1=1, dim2=2)).sum(1)    # log|L L^T|
            trace = (scale ** 2).sum((1, 2))                                           # tr(L L^T)
            kl = 0.5 * (trace / s2 + (loc ** 2).sum(1) / s2 - D + D * math.log(s2) - log_det)
        return kl.mean()

    def elbo(self, x: torch.Tensor, out: Output) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Negative ELBO = NLL + prior * KL; returns (elbo, nll, kl)."""
        nll, kl = self.nll(x, out.logits), self.kl_prior(out.loc, out.scale)
        return nll + self.prior * kl, nll, kl

    def joint_loss(self, x: torch.Tensor, out: Output, p: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """theta * ELBO + gamma * KL(P||Q) + beta * SOM; returns the total and its parts for logging."""
        elbo, nll, kl = self.elbo(x, out)
        cah = self.clustering_kl(p, out.q)
        som = self.som_loss(out.z, out.q)
        total = self.theta * elbo + self.gamma * cah + self.beta * som
        return total, {"loss": total, "elbo": elbo, "nll": nll, "kl": kl, "cah": cah, "som": som}

    # ---- the TensorFlow original's weights (load_tf_arrays) --------------------------------------
    def tf_variables(self) -> dict[str, torch.Tensor]:
        """The reference's variable names -> this model's tensors (see the function tf_variables)."""
        return tf_variables(self)

    def tf_mode_switches(self) -> list[str]:
        """The constructor settings that differ from the reference's numerics; empty in tf_original mode."""
        switches = []
        if self.posterior != "tril":
            switches.append("posterior='tril'")
        if any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in self.modules()):
            switches.append("batchnorm='frozen'")
        if any(isinstance(m, nn.Dropout) for m in self.modules()):
            switches.append("dropout=0")
        if not self.convolution and not self.leaky_logits:
            switches.append("leaky_logits=True")
        return switches


# ---- weights of the TensorFlow original -----------------------------------------------------------
# Keras names each layer after its class with a counter over the whole graph (dense, dense_1, ...).
KERAS_LAYER_NAMES = {nn.Linear: "dense", nn.Conv2d: "conv2d", nn.ConvTranspose2d: "conv2d_transpose",
                     FrozenBatchNorm: "batch_normalization"}


def tf_variables(model: DPSOM) -> dict[str, torch.Tensor]:
    """TF variable name of the reference (e.g. "z_e/encoder/dense_3/kernel:0") -> the model's tensor.

    Names follow the reference's layer creation order: encoder, posterior head, decoder. The tensors are
    the model's own parameters and buffers, in PyTorch layout (see to_tf_layout).
    """
    variables = {"embeddings/embeddings:0": model.embeddings}
    counts: dict[str, int] = {}
    for scope, parts in (("z_e/encoder", (model.encoder, model.head)),
                         ("reconstruction_e/decoder", (model.decoder_in, model.decoder))):
        for m in (m for part in parts for m in part.modules()):
            kind = KERAS_LAYER_NAMES.get(type(m))
            if kind is None:
                continue
            n = counts.get(kind, 0)
            counts[kind] = n + 1
            layer = f"{scope}/{kind}" + (f"_{n}" if n else "")
            if kind == "batch_normalization":
                fields = {"gamma": m.weight, "beta": m.bias, "moving_mean": m.running_mean,
                          "moving_variance": m.running_var}
            else:
                fields = {"kernel": m.weight, "bias": m.bias}
            variables.update({f"{layer}/{field}:0": t for field, t in fields.items()})
    return variables


def to_tf_layout(t: torch.Tensor) -> torch.Tensor:
    """PyTorch layout -> TF layout: Linear (out, in) -> Dense (in, out); Conv2d (out, in, kh, kw) ->
    Conv2D (kh, kw, in, out); ConvTranspose2d (in, out, kh, kw) -> Conv2DTranspose (kh, kw, out, in).

    Both conv kinds use the same permutation and no kernel flip. Other tensors are unchanged.
    """
    return t.T if t.dim() == 2 else t.permute(2, 3, 1, 0) if t.dim() == 4 else t


def from_tf_layout(t: torch.Tensor) -> torch.Tensor:
    """The inverse of to_tf_layout."""
    return t.T if t.dim() == 2 else t.permute(3, 2, 0, 1) if t.dim() == 4 else t


def load_tf_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy the reference's variables (TF name -> array in TF layout) into a model in tf_original mode.

    The model names its own TF variables (its tf_variables method: name -> parameter or buffer) and the settings
    it would need to compute what the reference computes (tf_mode_switches). Every variable must be given with
    its TF shape, and nothing else; the model is left untouched when anything is missing, unexpected or of the
    wrong shape.
    """
    switches = model.tf_mode_switches()
    if switches:
        raise ValueError(f"TF weights need a model in tf_original mode; build it with {', '.join(switches)}")
    targets = model.tf_variables()
    missing, unexpected = sorted(targets.keys() - arrays.keys()), sorted(arrays.keys() - targets.keys())
    if missing or unexpected:
        raise KeyError(f"TF variables missing: {missing or 'none'}; not in this model: {unexpected or 'none'}")
    for name, t in targets.items():
        want, got = tuple(to_tf_layout(t).shape), tuple(np.shape(arrays[name]))
        if got != want:
            raise ValueError(f"TF variable {name} has shape {got}, this model expects {want}")
    with torch.no_grad():
        for name, t in targets.items():
            t.copy_(from_tf_layout(torch.as_tensor(np.asarray(arrays[name]))))

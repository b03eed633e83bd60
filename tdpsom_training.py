"""T-DPSOM's recipe for the plan runner (plan_runner.py): the model of a config, the plan of its four phases and
their losses, the target distribution over every step of the training stays, the evaluation pass (map, labels,
forecast) and the pictures; `train` runs it.

The phases are TempDPSOM.py's train_model (docs/tdpsom-design.md §3): pretraining of the VAE, SOM initialisation
(only the prototypes learn), joint training (each batch one step of the joint loss, then one of the prediction
loss, P recomputed over the training stays every epoch) and the LSTM's fine-tuning on the prediction loss. Takes a
config dict and a device from the experiment (tdpsom.py) and never imports it.
"""
import numpy as np
import torch

from plan_runner import Epoch, run_plan
from tb_logging import PICTURE_EPOCHS, Logger, component_planes
from tdpsom_eval import hit_map_picture, label_mean_pictures, sequence_metrics, trajectory_picture
from tdpsom_model import TDPSOM
from utils import heatmap, u_matrix

EVAL_NOISE_SEED = 2020    # the evaluation's posterior samples (eval_sample) are seeded: `evaluate` repeats a run
TRAJECTORIES = 4          # stays drawn on the map, the evaluation set's first


# ---- the model, its plan and its losses ----------------------------------------------------------------
def build_model(c: dict) -> TDPSOM:
    """The model of a run's config; c["input_dim"] is set from the data."""
    return TDPSOM(input_dim=c["input_dim"], latent_dim=c["latent_dim"], som_dim=c["som_dim"], lstm_dim=c["lstm_dim"],
                  alpha=c["alpha"], beta=c["beta"], gamma=c["gamma"], kappa=c["kappa"], theta=c["theta"],
                  eta=c["eta"], prior=c["prior"], toroidal=c["toroidal"], batchnorm=c["batchnorm"],
                  dropout=c["dropout"], lstm_gates=c["lstm_gates"], last_step_target=c["last_step_target"])


def som_epochs(c: dict) -> int:
    """Epochs per SOM-initialisation block: som_epochs, or the reference's epochs_pretrain // 3 when None."""
    return c["epochs_pretrain"] // 3 if c["som_epochs"] is None else c["som_epochs"]


def epoch_plan(c: dict) -> list[Epoch]:
    """Every epoch of the run, in order: pretrain, som_init (a block of som_epochs per rate), joint (ops joint, then
    prediction; P at every epoch's start) and finetune (op prediction).

    Pictures at the end of every phase and every PICTURE_EPOCHS joint epochs; the evaluation at the run's end, and
    every 10 joint epochs with val_epochs."""
    som = [lr for lr in c["som_learning_rates"] for _ in range(som_epochs(c))]
    P, J, F, lr = c["epochs_pretrain"], c["num_epochs"], c["epochs_finetune"], c["learning_rate"]
    plan = ([Epoch("pretrain", lr, ("pretrain",), pictures=e == P - 1) for e in range(P)]
            + [Epoch("som_init", r, ("som_init",), pictures=e == len(som) - 1) for e, r in enumerate(som)]
            + [Epoch("joint", lr, ("joint", "prediction"), targets=True,
                     evaluate=c["val_epochs"] and (e + 1) % 10 == 0,
                     pictures=e == J - 1 or (e + 1) % PICTURE_EPOCHS == 0) for e in range(J)]
            + [Epoch("finetune", lr, ("prediction",), pictures=e == F - 1) for e in range(F)])
    if plan:
        plan[-1] = plan[-1]._replace(evaluate=True)
    return plan


def encode_sample(model: TDPSOM, x: torch.Tensor) -> torch.Tensor:
    """One posterior sample of every step's code, (B, T, L)."""
    B, T, D = x.shape
    return model.sample(*model.encode(x.reshape(B * T, D))).view(B, T, -1)


def phase_loss(model: TDPSOM, op: str, x: torch.Tensor, p: torch.Tensor | None) -> tuple[torch.Tensor, dict]:
    """The loss an op minimises and its parts; x (B, T, D), p (B*T, H*W) in the joint op.

    Ops are the reference's train ops: pretrain (train_step_ae: the ELBO), som_init (train_step_som: loss_a, only
    the prototypes), joint (train_step: the joint loss) and prediction (train_step_prob: only the LSTM and its head
    learn, so the encoder runs without a graph)."""
    if op == "pretrain":
        elbo, nll, kl = model.elbo(x, model(x, predict=False))
        return elbo, {"elbo": elbo, "nll": nll, "kl": kl}
    if op == "som_init":
        with torch.no_grad():
            z = encode_sample(model, x).flatten(0, 1)                  # (B*T, L)
            dist = model.distances(z)
        loss = model.som_init_loss(z, dist)
        return loss, {"loss": loss}
    if op == "joint":
        return model.joint_loss(x, model(x), p)
    if op == "prediction":
        with torch.no_grad():
            z = encode_sample(model, x)                                # (B, T, L)
        loc, scale, _ = model.predict(z)
        loss = model.prediction_loss(z, loc, scale)
        return loss, {"pred": loss}
    raise ValueError(f"unknown op {op!r}")


# ---- inference and evaluation -------------------------------------------------------------------------
@torch.no_grad()
def infer(model: TDPSOM, x: torch.Tensor, batch_size: int, sample: bool, forecast_steps: int = 0,
          decode: bool = True, noise_seed: int | None = EVAL_NOISE_SEED) -> dict:
    """Per stay of a set (N, T, D), batched, in eval mode: z (N, T, L), dist (N, T, H*W) and, with `decode`, x_rec
    (N, T, D); with forecast_steps S, the forecast of the last S steps from the LSTM run over the first T - S:
    z_pred (N, S, L) and its decoding x_pred (N, S, D).

    Means (posterior, decoder, forecast loc), or with `sample` one draw of each, noise from a CPU generator
    seeded with noise_seed (the device's global RNG if None). One encoding is shared by the map, the
    reconstruction and the forecast, and the roll-out feeds back its own forecasts (TempDPSOM.py's main())."""
    was_training = model.training
    model.eval()
    noise = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)

    def draw(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if not sample:
            return loc
        eps = (torch.randn(loc.shape, device=loc.device) if noise is None
               else torch.randn(loc.shape, generator=noise).to(loc.device))
        return loc + scale * eps

    N, T, D = x.shape
    S = forecast_steps
    results = {}
    for i in range(0, N, batch_size):
        xb = x[i:i + batch_size]
        b = len(xb)
        z = draw(*model.encode(xb.reshape(b * T, D)))                  # (b*T, L)
        parts = {"z": z.view(b, T, -1), "dist": model.distances(z).view(b, T, -1)}
        if decode:
            parts["x_rec"] = draw(*model.decode(z)).view(b, T, D)
        if S:
            loc, scale, state = model.predict(parts["z"][:, :T - S])  # the forecast of step T - S
            steps = [draw(loc[:, -1], scale[:, -1])]                  # (b, L)
            for _ in range(S - 1):
                loc, scale, state = model.predict(steps[-1][:, None], state)
                steps.append(draw(loc[:, -1], scale[:, -1]))
            parts["z_pred"] = torch.stack(steps, dim=1)                # (b, S, L)
            parts["x_pred"] = draw(*model.decode(parts["z_pred"].flatten(0, 1))).view(b, S, D)
        for k, v in parts.items():   # written into one tensor for the whole set
            if k not in results:
                results[k] = v.new_empty((N, *v.shape[1:]))
            results[k][i:i + b] = v
    model.train(was_training)
    return results


def target_distribution(model: TDPSOM, x: torch.Tensor, batch_size: int, sample: bool) -> torch.Tensor:
    """P (N*T, H*W) over every step of a set of stays, rows n*T + t; column sums over all of them, as the
    reference's target_distribution of the concatenated q. A sampled z draws on training's RNG stream."""
    dist = infer(model, x, batch_size, sample, decode=False, noise_seed=None)["dist"]
    return TDPSOM.target_distribution(model.soft_assign(dist.flatten(0, 1)))


def evaluate_model(model: TDPSOM, x: torch.Tensor, y: np.ndarray | None, label_names: list | None, c: dict
                   ) -> tuple[dict, dict]:
    """Every evaluation number over every stay of the set (tdpsom_eval.sequence_metrics) and the pass's arrays."""
    out = infer(model, x, c["batch_size"], c["eval_sample"], c["forecast_steps"])
    host = {k: v.cpu().numpy() for k, v in out.items()}
    forecast = {"x": x.cpu().numpy(), "x_rec": host["x_rec"], "z": host["z"]}
    if "z_pred" in host:
        forecast.update(z_pred=host["z_pred"], x_pred=host["x_pred"])
    metrics = sequence_metrics(out["dist"].cpu(), model.som_dim, y, label_names, c["toroidal"], forecast)
    return metrics, host


@torch.no_grad()
def place(model: TDPSOM, x: torch.Tensor, batch_size: int, sample: bool) -> dict:
    """Each step's place on the map, as NumPy arrays (N, T): bmu, row and column of the node, distance (Euclidean,
    to the BMU's prototype) and q_bmu; and q (N, T, H*W)."""
    dist = infer(model, x, batch_size, sample, decode=False)["dist"]          # (N, T, H*W)
    q = model.soft_assign(dist.flatten(0, 1)).view(dist.shape)
    bmu = dist.argmin(-1)                                                      # (N, T)
    W = model.som_dim[1]
    out = {"bmu": bmu, "row": bmu // W, "column": bmu % W,
           "distance": dist.gather(-1, bmu[..., None]).squeeze(-1).sqrt(),
           "q_bmu": q.gather(-1, bmu[..., None]).squeeze(-1), "q": q}
    return {k: v.cpu().numpy() for k, v in out.items()}


@torch.no_grad()
def log_pictures(log: Logger, model: TDPSOM, x: torch.Tensor, y: np.ndarray | None, label_names: list | None,
                 c: dict, phase: str, step: int) -> None:
    """The map under `<phase>/...`: hit_map, u_matrix, label_mean/<label> (with labels), trajectories of the
    evaluation set's first stays over the hit map, and component_planes/<feature>, each chosen feature's decoded
    value over the map (the prototypes decoded, decoder mean)."""
    H, W = model.som_dim
    bmu = infer(model, x, c["batch_size"], c["eval_sample"], decode=False)["dist"].argmin(-1).cpu().numpy()  # (N, T)
    log.image(f"{phase}/hit_map", hit_map_picture(bmu, model.som_dim), step)
    E = model.embeddings.view(H * W, -1)
    log.image(f"{phase}/u_matrix", heatmap(u_matrix(E, model.neighbours, model.neighbour_mask).view(H, W)
                                           .cpu().numpy()), step)
    if y is not None:
        for tag, picture in label_mean_pictures(bmu, y, model.som_dim, label_names).items():
            log.image(f"{phase}/{tag.replace(' ', '_')}", picture, step)
    hits = np.bincount(bmu.reshape(-1), minlength=H * W).reshape(H, W)
    log.image(f"{phase}/trajectories", trajectory_picture(bmu[:TRAJECTORIES], model.som_dim, c["toroidal"],
                                                          background=hits), step)
    was_training = model.training
    model.eval()
    decoded = model.decode(E)[0]                                              # (H*W, D)
    model.train(was_training)
    for name, j in component_planes(c, decoded.shape[1]):
        log.image(f"{phase}/component_planes/{name.replace('/', '_')}",
                  heatmap(decoded[:, j].view(H, W).cpu().numpy()), step)


# ---- the run ------------------------------------------------------------------------------------------
class TDPSOMRecipe:
    """T-DPSOM's part of plan_runner.run_plan. The save_pretrain file holds the weights after SOM initialisation;
    use_saved_pretrain starts at the first joint epoch."""
    save_pretrain_after, saved_pretrain_starts = "som_init", "joint"

    def __init__(self, c: dict, y_eval: np.ndarray | None, label_names: list | None, device: torch.device):
        self.c, self.y_eval, self.label_names, self.device = c, y_eval, label_names, device
        self.plan = epoch_plan(c)
        self.phase_loss = phase_loss

    def build_model(self) -> TDPSOM:
        return build_model(self.c).to(self.device)

    def targets(self, model: TDPSOM, x_train: torch.Tensor, x_eval: torch.Tensor) -> tuple:
        """P over every step of the training stays, and the monitoring batch's rows of P over the evaluation set."""
        B, sample = self.c["batch_size"], self.c["target_sample"]
        steps = x_eval.shape[1]
        return (target_distribution(model, x_train, B, sample),
                target_distribution(model, x_eval, B, sample)[:B * steps])

    def evaluate(self, model: TDPSOM, x_eval: torch.Tensor) -> dict:
        return evaluate_model(model, x_eval, self.y_eval, self.label_names, self.c)[0]

    def pictures(self, log: Logger, model: TDPSOM, x_eval: torch.Tensor, phase: str, step: int,
                 end_of_phase: bool) -> None:
        log_pictures(log, model, x_eval, self.y_eval, self.label_names, self.c, phase, step)


def train(c: dict, data: dict, device: torch.device, logdir: str, run, resume: dict | None = None) -> dict:
    """All four phases with one optimiser and one global step; returns the final evaluation's numbers."""
    recipe = TDPSOMRecipe(c, data["y_eval"], data["label_names"], device)
    return run_plan(recipe, c, data, device, logdir, run, resume,
                    f"continue with: python tdpsom.py with resume={logdir}")

"""The self-organising map in latent space that DPSOM and T-DPSOM share: the grid and its neighbours, the
Student's t kernel, the soft assignment q, the DEC target P and the SOM loss terms of the paper.

A model gets them by inheriting SOMMixin next to nn.Module and calling init_som where its prototypes should sit
among its parameters. Reference: DPSOM_model.py and TempDPSOM_model.py of ratschlab/dpsom, which compute these
terms the same way (q, target_distribution, loss_commit, loss_som, loss_commit_sd + loss_som_old).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

Q_EPS = 1e-7   # added to the Student's t kernel (Keras' epsilon() in the reference), before q's rows are normalised


def student_t(dist: torch.Tensor, alpha: float) -> torch.Tensor:
    """Q_EPS + (1 + d / alpha)^(-(alpha + 1) / 2) of squared distances d, elementwise and unnormalised.

    q normalises it over the nodes; T-DPSOM's smoothness loss uses it as it is, epsilon included.
    """
    return Q_EPS + (1.0 + dist / alpha) ** (-(alpha + 1.0) / 2.0)


def grid_neighbours(som_dim: tuple[int, int], toroidal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of [up (r+1), down (r-1), right (c+1), left (c-1)] of every node, and which exist.

    Node (r, c) has flat index r*W + c. On a planar grid the missing neighbours of edge nodes are masked
    (their index is the node itself, harmless under the mask).
    """
    H, W = som_dim
    r, c = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    r, c = r.reshape(-1), c.reshape(-1)                      # (H*W,)
    rows = torch.stack([r + 1, r - 1, r, r], dim=1)          # (H*W, 4)
    cols = torch.stack([c, c, c + 1, c - 1], dim=1)
    if toroidal:
        return (rows % H) * W + (cols % W), torch.ones(H * W, 4, dtype=torch.bool)
    exists = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)
    index = torch.where(exists, rows * W + cols, (r * W + c).unsqueeze(1))
    return index, exists


class SOMMixin:
    """An H x W grid of prototypes `embeddings` (H, W, D) in latent space and the terms computed from it.

    The host nn.Module sets `latent_dim`, `som_dim` (H, W) and `alpha` (the Student's t degrees of freedom)
    before it calls init_som.
    """
    latent_dim: int
    som_dim: tuple[int, int]
    alpha: float

    def init_som(self, toroidal: bool) -> None:
        """Register the prototypes (truncated normal, std 0.05 cut at 2 std, as TF's truncated_normal) and the
        neighbour tables; the parameter is named `embeddings`, as in the reference and in older checkpoints."""
        H, W = self.som_dim
        self.embeddings = nn.Parameter(nn.init.trunc_normal_(torch.empty(H, W, self.latent_dim), std=0.05,
                                                             a=-0.1, b=0.1))
        neighbours, exists = grid_neighbours(self.som_dim, toroidal)
        self.register_buffer("neighbours", neighbours, persistent=False)        # (H*W, 4)
        self.register_buffer("neighbour_mask", exists, persistent=False)        # (H*W, 4)

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """Squared Euclidean distance of each z to each prototype, (B, D) -> (B, H*W)."""
        E = self.embeddings.view(-1, self.latent_dim)                  # (H*W, D)
        # ||z||^2 - 2 z.E + ||E||^2: one (B, D) x (D, H*W) product instead of a (B, H*W, D) difference
        return ((z ** 2).sum(1, keepdim=True) - 2 * z @ E.T + (E ** 2).sum(1)).clamp_min(0)   # (B, H*W)

    def soft_assign(self, dist: torch.Tensor) -> torch.Tensor:
        """Student's t soft assignment q with `alpha` degrees of freedom, rows summing to 1."""
        q = student_t(dist, self.alpha)                                # (B, H*W)
        return q / q.sum(dim=1, keepdim=True)

    @staticmethod
    def target_distribution(q: torch.Tensor) -> torch.Tensor:
        """DEC target p_ij = q_ij^2 / f_j, f_j = sum_i q_ij over all rows given, then rows normalised."""
        p = q ** 2 / q.sum(dim=0)                                      # (N, H*W)
        return p / p.sum(dim=1, keepdim=True)

    def bmu_neighbours(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[BMU, up, down, right, left] flat indices (B, 5) and which exist (B, 5)."""
        index = torch.cat([k.unsqueeze(1), self.neighbours[k]], dim=1)
        exists = torch.cat([torch.ones_like(k, dtype=torch.bool).unsqueeze(1), self.neighbour_mask[k]], dim=1)
        return index, exists

    def clustering_kl(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """KL(P || Q) = mean_i sum_j p_ij log(p_ij / q_ij); p is a fixed target (no gradient)."""
        return (p * torch.log(p / q)).sum(1).mean()

    def som_loss(self, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """-mean_i sum_j sg(q_ij) sum_{n in N(j)} log q'_in, q' from sg(z): only prototypes learn."""
        q_ng = self.soft_assign(self.distances(z.detach()))          # reference: z_dist_flat_ng, stop_gradient(z)
        log_q_nb = torch.log(q_ng)[:, self.neighbours] * self.neighbour_mask   # (B, H*W, 4)
        return -(q.detach() * log_q_nb.sum(-1)).sum(1).mean()        # reference: stop_gradient(new_q)

    def som_init_loss(self, z: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """Standard-SOM loss of phase 2: commitment to the BMU plus pull of the BMU's neighbourhood."""
        z = z.detach()                                               # reference: stop_gradient(sample_z_e)
        E = self.embeddings.view(-1, self.latent_dim)                # (H*W, D)
        index, exists = self.bmu_neighbours(dist.argmin(dim=1))      # (B, 5): BMU k, then its neighbours
        # E[index] would do, but its backward scatter-adds into E in a thread-dependent order on the CPU (runs
        # would not repeat bit for bit); a product with one-hot rows selects exactly and sums in a fixed order.
        selected = F.one_hot(index, E.shape[0]).to(E.dtype) @ E      # (B, 5, D)
        sq = ((z.unsqueeze(1) - selected) ** 2).mean(-1)             # (B, 5)
        commit = sq[:, 0].mean()                                     # ||z - E_k||^2 / D, mean over the batch
        som = (sq * exists).sum() / exists.sum()                     # mean over existing neighbours
        return commit + som

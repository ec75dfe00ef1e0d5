"""The DDPM noise schedule (Ho et al. 2020), its respacing to fewer sampling steps, and one reverse step;
and DDIM's tables and update (Song et al. 2021), as the official DDIM script computes them.

StableSR samples with plain DDPM (ancestral) steps, but fewer than the 1000 it was trained with: the
official script keeps N evenly spaced training timesteps and recomputes the betas so that each kept step
jumps straight from one kept timestep to the next (improved DDPM's respacing, Nichol & Dhariwal 2021).

Two indices must not be confused:
  * `k`, the respaced step index (0 .. N-1): every schedule table below is indexed by it;
  * `timestep_map[k]`, the original timestep (0 .. 999): what the networks are told (their timestep
    embedding was trained on the 1000-step scale).

All tables are float64; the per-step math runs in the input's dtype. (The reference stores its tables as
float32 and respaces from those float32 values; float64 throughout lands within 5e-5 relative of its
respaced tables for every N, within 4e-6 for 3 <= N <= 200.)
"""

from __future__ import annotations

import math

import torch

from .config import DiffusionConfig
from .errors import OptionError

# The tables a schedule holds, named as the reference's buffers (golden sets store them by these names).
TABLES = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "timestep_map",
)


def linear_betas(cfg: DiffusionConfig) -> torch.Tensor:
    """SD's "linear" schedule: linear in sqrt(beta), from `linear_start` to `linear_end`, float64."""
    return torch.linspace(math.sqrt(cfg.linear_start), math.sqrt(cfg.linear_end), cfg.timesteps,
                          dtype=torch.float64) ** 2


def check_steps(num_timesteps: int, num_steps: int) -> None:
    """A sampler takes at most the schedule's `num_timesteps` steps (the option `steps`)."""
    if num_steps > num_timesteps:
        raise OptionError("steps", f"{num_steps}: the schedule has {num_timesteps} steps; use at most {num_timesteps}")


def spaced_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """`num_steps` timesteps out of `num_timesteps`, evenly spaced from 0 to the last one.

    c_0 = 0, c_{k+1} = c_k + (T - 1)/(N - 1), accumulated in float64 (as the reference does), and
    map[k] = round(c_k) with Python's round: halves go to the even neighbour (N = 7 gives 499.5 -> 500
    but 832.5 -> 832).
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"cannot take {num_steps} steps out of {num_timesteps}")
    stride = (num_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 0.0
    position, timesteps = 0.0, []
    for _ in range(num_steps):
        timesteps.append(round(position))
        position += stride
    return timesteps


class Schedule:
    """A DDPM schedule: betas, the tables derived from them, and the reverse-step equations.

    `Schedule.from_config(cfg)` is the 1000-step training schedule; `.respace(N)` the N-step one.
    """

    def __init__(self, betas: torch.Tensor, timestep_map: torch.Tensor | None = None,
                 parameterization: str = "eps"):
        if parameterization not in ("eps", "v"):
            raise ValueError(f"unknown parameterization {parameterization!r} (expected 'eps' or 'v')")
        self.parameterization = parameterization
        betas = betas.to(torch.float64)
        self.betas = betas
        self.timestep_map = (torch.arange(len(betas)) if timestep_map is None
                             else torch.as_tensor(timestep_map, dtype=torch.int64))

        # alpha_t = 1 - beta_t,  alpha-bar_t = prod_{s <= t} alpha_s
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev

        # Forward process, Ho et al. Eq. 4: q(x_t | x_0) = N(sqrt(ab_t) x_0, (1 - ab_t) I)
        self.sqrt_alphas_cumprod = ab.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - ab).sqrt()
        self.log_one_minus_alphas_cumprod = (1.0 - ab).log()
        # Its inverse for a known noise, Eq. 15: x_0 = sqrt(1/ab_t) x_t - sqrt(1/ab_t - 1) eps
        self.sqrt_recip_alphas_cumprod = (1.0 / ab).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / ab - 1.0).sqrt()

        # Posterior, Eqs. 6-7: q(x_{t-1} | x_t, x_0) = N(mu~_t, beta~_t I), with
        # beta~_t = (1 - ab_{t-1}) / (1 - ab_t) * beta_t
        self.posterior_variance = (1.0 - ab_prev) / (1.0 - ab) * betas
        # beta~_0 = 0: its log is clipped at log(1e-20) (the step at k = 0 adds no noise anyway).
        self.posterior_log_variance_clipped = self.posterior_variance.clamp(min=1e-20).log()
        # mu~_t = sqrt(ab_{t-1}) beta_t / (1 - ab_t) * x_0  +  sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) * x_t
        self.posterior_mean_coef1 = ab_prev.sqrt() * betas / (1.0 - ab)
        self.posterior_mean_coef2 = self.alphas.sqrt() * (1.0 - ab_prev) / (1.0 - ab)

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "Schedule":
        """The `cfg.timesteps`-step training schedule."""
        return cls(linear_betas(cfg), parameterization=cfg.parameterization)

    def __len__(self) -> int:
        return len(self.betas)

    def respace(self, num_steps: int) -> "Schedule":
        """Keep `num_steps` evenly spaced timesteps (`spaced_timesteps`) with the same alpha-bar there.

        Each kept step k jumps from kept timestep map[k-1] to map[k] in one go:
        beta_k = 1 - ab[map[k]] / ab[map[k-1]], with ab[map[-1]] = 1. Then the respaced alpha-bar at k
        equals the original one at map[k], so the forward process is unchanged at the kept timesteps.
        """
        keep = torch.tensor(spaced_timesteps(len(self), num_steps))
        ab = self.alphas_cumprod[keep]
        ab_before = torch.cat([ab.new_ones(1), ab[:-1]])
        return Schedule(1.0 - ab / ab_before, self.timestep_map[keep], self.parameterization)

    def network_timestep(self, k: int, batch: int) -> torch.Tensor:
        """The original timestep of step k, as the (batch,) LongTensor the networks take."""
        return self.timestep_map[k].repeat(batch)

    def q_sample(self, x0: torch.Tensor, k, noise: torch.Tensor) -> torch.Tensor:
        """Eq. 4, reparameterised: x_k = sqrt(ab_k) x_0 + sqrt(1 - ab_k) noise."""
        return (self._at(self.sqrt_alphas_cumprod, k, x0) * x0
                + self._at(self.sqrt_one_minus_alphas_cumprod, k, x0) * noise)

    def velocity(self, x0: torch.Tensor, k, noise: torch.Tensor) -> torch.Tensor:
        """The v-prediction target (Salimans & Ho 2022, Sec. 4): v = sqrt(ab_k) eps - sqrt(1 - ab_k) x_0."""
        return (self._at(self.sqrt_alphas_cumprod, k, x0) * noise
                - self._at(self.sqrt_one_minus_alphas_cumprod, k, x0) * x0)

    def predict_x0(self, x_t: torch.Tensor, k, model_output: torch.Tensor) -> torch.Tensor:
        """x_0 from the network's output at step k: a noise (eps) or a velocity (v) prediction."""
        if self.parameterization == "eps":
            # Eq. 15: x_0 = sqrt(1/ab) x_t - sqrt(1/ab - 1) eps
            return (self._at(self.sqrt_recip_alphas_cumprod, k, x_t) * x_t
                    - self._at(self.sqrt_recipm1_alphas_cumprod, k, x_t) * model_output)
        # v = sqrt(ab) eps - sqrt(1 - ab) x_0 (Salimans & Ho 2022, Sec. 4), so
        # x_0 = sqrt(ab) x_t - sqrt(1 - ab) v
        return (self._at(self.sqrt_alphas_cumprod, k, x_t) * x_t
                - self._at(self.sqrt_one_minus_alphas_cumprod, k, x_t) * model_output)

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, k) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 7: the mean mu~ and the (clipped) log-variance of q(x_{k-1} | x_k, x_0)."""
        mean = (self._at(self.posterior_mean_coef1, k, x_t) * x0
                + self._at(self.posterior_mean_coef2, k, x_t) * x_t)
        return mean, self._at(self.posterior_log_variance_clipped, k, x_t)

    def p_sample(self, x_t: torch.Tensor, k: int, model_output: torch.Tensor,
                 noise: torch.Tensor) -> torch.Tensor:
        """One ancestral step (Algorithm 2): x_{k-1} = mu~(x_k, x_0) + sigma_k z, with sigma_k^2 = beta~_k
        and x_0 read off the network's output. The last step (k = 0) returns the mean."""
        mean, log_variance = self.posterior(self.predict_x0(x_t, k, model_output), x_t, k)
        if k == 0:
            return mean
        return mean + torch.exp(0.5 * log_variance) * noise

    @staticmethod
    def _at(table: torch.Tensor, k, x: torch.Tensor) -> torch.Tensor:
        """table[k] in x's dtype and device, shaped to broadcast over x; k an int or a (B,) LongTensor."""
        index = torch.as_tensor(k, device=table.device)
        value = table[index].to(device=x.device, dtype=x.dtype)
        # () or (B,) -> (B or 1, 1, 1, 1)
        return value.reshape(-1, *[1] * (x.dim() - 1))


# ------------------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021), as the official `sr_val_ddim_text_T_negativeprompt_canvas.py` samples

# DDIM's tables, named as the reference's buffers (golden sets store them by these names).
DDIM_TABLES = ("ddim_timesteps", "ddim_alphas", "ddim_alphas_prev", "ddim_sigmas")


def ddim_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """DDIM's timesteps as the official sampler makes them ("uniform"): every num_timesteps // num_steps
    from 0. Where the stride does not divide evenly there are more of them than steps (7 steps: stride
    142, 8 timesteps 0 .. 994); the sampler takes `num_steps` steps and never uses the extra ones."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"cannot take {num_steps} steps out of {num_timesteps}")
    return list(range(0, num_timesteps, num_timesteps // num_steps))


class DDIMSchedule:
    """DDIM's sampling tables, built from the training schedule's alpha-bar as the official sampler builds
    them, and its update (Eq. 12). DDIM writes alpha for what DDPM calls alpha-bar; here a_t = ab[tau_i].

    Step `index` (num_steps - 1 down to 0) goes from a_t = ab[ddim_timesteps[index]] to a_prev, the
    alpha-bar of the timestep before. The official sampler departs from the DDIM paper twice:
      * for index 0, a_prev is ab[0] (about 0.9991), not 1: the last step ends at t = 0, not at x_0;
      * the networks are told `network_timesteps[index]`, the DDPM respacing's evenly spaced timesteps
        (0 .. 999), not ddim_timesteps[index]: the script passes those to its sampling loop while its
        alpha-bar tables come from ddim_timesteps (20 steps: the first step is told t = 999, at a_t =
        ab[950]). We follow both, to compute what the official DDIM script computes.
    """

    def __init__(self, schedule: Schedule, num_steps: int, eta: float):
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        ab = schedule.alphas_cumprod
        self.parameterization = schedule.parameterization
        self.ddim_timesteps = torch.tensor(ddim_timesteps(len(ab), num_steps))
        self.network_timesteps = torch.tensor(spaced_timesteps(len(ab), num_steps))
        a_t = self.ddim_alphas = ab[self.ddim_timesteps]
        a_prev = self.ddim_alphas_prev = torch.cat([ab[:1], a_t[:-1]])
        # Eq. 16: sigma_i = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev); eta = 1 is the
        # DDPM posterior's standard deviation, eta = 0 the deterministic DDIM. (0 at index 0: a_prev = a_t.)
        self.ddim_sigmas = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()

    def step(self, x_t: torch.Tensor, index: int, model_output: torch.Tensor,
             noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DDIM's Eq. 12, one step from a_t to a_prev; returns (x_prev, pred_x0):

            x_prev = sqrt(a_prev) * (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)      "predicted x_0"
                     + sqrt(1 - a_prev - sigma^2) * eps                        "direction pointing to x_t"
                     + sigma * noise                                           "random noise"
        """
        a_t, a_prev, sigma = (float(table[index]) for table in
                              (self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas))
        eps = model_output
        if self.parameterization == "v":
            # v = sqrt(a_t) eps - sqrt(1 - a_t) x_0 and x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps give
            # eps = sqrt(a_t) v + sqrt(1 - a_t) x_t
            eps = math.sqrt(a_t) * model_output + math.sqrt(1 - a_t) * x_t
        # (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
        pred_x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        # sqrt(1 - a_prev - sigma^2) eps
        direction = math.sqrt(1 - a_prev - sigma**2) * eps
        # sqrt(a_prev) pred_x0 + direction + sigma noise
        x_prev = math.sqrt(a_prev) * pred_x0 + direction + sigma * noise
        return x_prev, pred_x0

"""IB_MBM (information-bottleneck manifold-bridging module) and the synergy head.

IB_MBM fuses the teachers' features into one Gaussian latent, conditioned on the student
(spec section 2.2, with the fixes of decisions.md "ASIB method"):

    q~   = LN_q(W_q norm(q))                      student query, one token   [B, 1, d]
    k~_i = LN_kv(W_kv norm(t_i))                  one token per teacher      [B, K, d]
    a    = MHA(q~, k~, k~)                        n_head heads, batch first, no dropout
    u    = LN_out(a + q~)                         [B, d]
    mu   = W_mu u,   logvar = clamp(W_lv u, -c, c)           c = ib_mbm_logvar_clip
    std  = max(exp(logvar / 2), ib_mbm_min_std)
    z    = mu + std * eps,  eps ~ N(0, I)          when sampling (training mode by default)
    z    = mu                                     otherwise (eval mode)

``norm`` is ``ib_mbm_feature_norm``: ``l2`` divides each query / teacher vector by its L2
norm, ``layernorm`` applies a parameter-free layer norm, ``none`` leaves them unchanged.
The KL term is computed from ``mu`` and the *effective* variance ``std**2`` (the min-std
floor included), so the logged KL is exactly the one of the distribution sampled from.

The synergy head maps a latent to class logits: ``Linear(Dropout(GELU(LN(x))))``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from asib_core.config.errors import ConfigError

FEATURE_NORMS = ("l2", "layernorm", "none")
#: initial log-variance magnitude: logvar starts near -min(3, 0.75 * clip) (std ~ 0.22 for clip 4)
INIT_LOGVAR = 3.0


class IBOutput(NamedTuple):
    z: torch.Tensor        # the latent used downstream (sample or mu)   [B, d]
    mu: torch.Tensor       # [B, d]
    logvar: torch.Tensor   # clipped log-variance of the head            [B, d]
    std: torch.Tensor      # max(exp(logvar / 2), min_std)               [B, d]

    @property
    def effective_logvar(self) -> torch.Tensor:
        """``log(std**2)``: the log-variance of the distribution actually sampled."""
        return 2.0 * torch.log(self.std)


def normalise_features(x: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "l2":
        return F.normalize(x, p=2.0, dim=-1, eps=1e-12)
    if mode == "layernorm":
        return F.layer_norm(x, x.shape[-1:])
    if mode == "none":
        return x
    raise ConfigError(f"ib_mbm_feature_norm='{mode}' is not known; use one of {', '.join(FEATURE_NORMS)}.")


class IBMBM(nn.Module):
    """Cross-attention of the student query over the teacher tokens -> Gaussian latent.

    Args:
        q_dim: width of the student query (the feature named by ``feat_kd_key``).
        kv_dim: width of every teacher token (``distill_feat`` or ``feat_2d``).
        d: latent width (``ib_mbm_out_dim``); must be divisible by ``n_head``.
        n_head: attention heads (``ib_mbm_n_head``).
        logvar_clip: ``c`` of ``logvar = clamp(., -c, c)`` (``ib_mbm_logvar_clip``).
        min_std: floor of the standard deviation (``ib_mbm_min_std``).
        feature_norm: ``l2`` | ``layernorm`` | ``none`` (``ib_mbm_feature_norm``).
        stochastic: if False the module never samples (``use_ib: false``: a deterministic
            encoder, ``z = mu`` always).
    """

    def __init__(self, q_dim: int, kv_dim: int, d: int, n_head: int = 1, *, logvar_clip: float = 4.0,
                 min_std: float = 0.01, feature_norm: str = "l2", stochastic: bool = True):
        super().__init__()
        if d <= 0 or n_head <= 0 or d % n_head != 0:
            raise ConfigError(f"ib_mbm_out_dim={d} must be a positive multiple of ib_mbm_n_head={n_head}.")
        if not logvar_clip > 0:
            raise ConfigError(f"ib_mbm_logvar_clip must be > 0, got {logvar_clip}.")
        if not min_std >= 0:
            raise ConfigError(f"ib_mbm_min_std must be >= 0, got {min_std}.")
        normalise_features(torch.zeros(1, 2), feature_norm)  # validates the name
        self.q_dim, self.kv_dim, self.d, self.n_head = int(q_dim), int(kv_dim), int(d), int(n_head)
        self.logvar_clip = float(logvar_clip)
        self.min_std = float(min_std)
        self.feature_norm = feature_norm
        self.stochastic = bool(stochastic)
        self.q_proj = nn.Linear(self.q_dim, self.d)
        self.q_norm = nn.LayerNorm(self.d)
        self.kv_proj = nn.Linear(self.kv_dim, self.d)
        self.kv_norm = nn.LayerNorm(self.d)
        self.attn = nn.MultiheadAttention(self.d, self.n_head, dropout=0.0, batch_first=True)
        self.out_norm = nn.LayerNorm(self.d)
        self.mu_head = nn.Linear(self.d, self.d)
        self.logvar_head = nn.Linear(self.d, self.d)
        # start nearly deterministic (as VIB implementations do): a small, input-dependent
        # log-variance inside the clip range (so it still gets gradients); the KL term
        # then pulls the variance up
        with torch.no_grad():
            self.logvar_head.weight.mul_(0.1)
            self.logvar_head.bias.fill_(-min(INIT_LOGVAR, 0.75 * self.logvar_clip))

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, sample: bool | None = None) -> IBOutput:
        """``query`` ``[B, q_dim]``, ``tokens`` ``[B, K, kv_dim]`` (or a list of K ``[B, kv_dim]``).

        ``sample=None`` samples iff the module is in training mode (and ``stochastic``);
        ``True``/``False`` force it (still never when not ``stochastic``).
        """
        if isinstance(tokens, (list, tuple)):
            tokens = torch.stack(list(tokens), dim=1)
        if query.dim() != 2 or query.shape[1] != self.q_dim:
            raise ValueError(f"IB_MBM query must be [B, {self.q_dim}], got {tuple(query.shape)}")
        if tokens.dim() != 3 or tokens.shape[2] != self.kv_dim:
            raise ValueError(f"IB_MBM teacher tokens must be [B, K, {self.kv_dim}], got {tuple(tokens.shape)}")
        q = self.q_norm(self.q_proj(normalise_features(query, self.feature_norm))).unsqueeze(1)
        kv = self.kv_norm(self.kv_proj(normalise_features(tokens, self.feature_norm)))
        attended, _ = self.attn(q, kv, kv, need_weights=False)
        u = self.out_norm(attended + q).squeeze(1)
        mu = self.mu_head(u)
        logvar = self.logvar_head(u).clamp(-self.logvar_clip, self.logvar_clip)
        std = torch.exp(0.5 * logvar)
        if self.min_std > 0:
            std = std.clamp_min(self.min_std)
        do_sample = self.training if sample is None else bool(sample)
        if do_sample and self.stochastic:
            z = mu + std * torch.randn_like(std)
        else:
            z = mu
        return IBOutput(z=z, mu=mu, logvar=logvar, std=std)


class SynergyHead(nn.Module):
    """``logits = Linear(d -> num_classes)(Dropout_p(GELU(LayerNorm(x))))``."""

    def __init__(self, d: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"synergy_head_dropout must be in [0, 1), got {dropout}.")
        self.norm = nn.LayerNorm(d)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.act(self.norm(x))))

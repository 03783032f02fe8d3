"""Multi-task loss balancing over groups of rows (capabilities or tasks): ``loss_balancing`` in
the train config.

* ``static`` (default): the plain answer-token mean over the batch (each row weighted by its
  tokens and its task weight); nothing here runs.
* ``equal``: the mean of the groups' mean losses, fixed weights (the control for the two below,
  which also weigh each group's mean loss rather than its tokens).
* ``uncertainty`` (Kendall, Gal & Cipolla, 2018): ``mean_g(exp(-s_g) * L_g + s_g)`` with a learned
  log-variance ``s_g`` per group, trained with the adapter (same optimizer and schedule, no
  weight decay, its own learning rate ``balance_lr``: at a LoRA learning rate Adam moves ``s``
  by ~lr per step, too little to leave 0 in a few hundred steps, while its optimum
  ``s_g = log L_g`` lies around -1..1); a group's weight is ``exp(-s_g)``.
* ``upgrad`` (Jacobian descent, Quinton & Rey 2024, from the maintained ``torchjd`` library):
  the Jacobian of the group losses with respect to the trainable parameters is computed
  (``torchjd.autojac.backward``) and aggregated by UPGrad, which projects each group's gradient
  onto the dual cone of all of them, so the step conflicts with no group
  (``torchjd.autojac.jac_to_grad``). Its weights are returned by torchjd; the groups' gradient
  norms come from the same Jacobian, at no extra cost. Chosen over GradNorm
  (``gradnorm-pytorch``) because it needs no extra hyperparameter (GradNorm's ``alpha``) and no
  second optimizer, and torchjd is actively released (0.18.0, 2026-10).

Every logging step records each group's weight (``balance/weight/<group>``) and, for
``uncertainty``/``upgrad``, its gradient norm (``balance/grad_norm/<group>``: free for upgrad;
for uncertainty one extra backward per group at logging steps, timed apart as ``balance/probe_s``).
"""
from __future__ import annotations

import time

import torch

METHODS = ("static", "equal", "uncertainty", "upgrad")


def group_means(row_sum: torch.Tensor, row_n: torch.Tensor, group_ids: torch.Tensor,
                n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's mean answer-token loss in the batch, and which groups are present."""
    s = torch.zeros(n_groups, dtype=row_sum.dtype, device=row_sum.device).index_add(0, group_ids, row_sum)
    n = torch.zeros(n_groups, dtype=row_n.dtype, device=row_n.device).index_add(0, group_ids, row_n)
    present = n > 0
    return s / n.clamp(min=1), present


class Balancer(torch.nn.Module):
    """Turns per-group mean losses into the loss to minimise (``equal``, ``uncertainty``), or
    into gradients (``upgrad``: :meth:`backward`). Holds the learned log-variances."""

    def __init__(self, method: str, groups: list[str], lr: float | None = None):
        super().__init__()
        self.lr = lr  # the log-variances' learning rate (None: the adapter's)
        if method not in METHODS or method == "static":
            raise ValueError(f"loss_balancing {method!r}: one of {', '.join(m for m in METHODS if m != 'static')}")
        self.method, self.groups = method, list(groups)
        self.log_vars = torch.nn.Parameter(torch.zeros(len(groups)), requires_grad=method == "uncertainty")
        self.last_weights: dict[str, float] = {}
        self.last_grad_norms: dict[str, float] = {}
        self.probe_seconds = 0.0
        self._aggregator = None

    @property
    def jacobian(self) -> bool:
        return self.method == "upgrad"

    def weights(self) -> torch.Tensor:
        return torch.exp(-self.log_vars.detach()) if self.method == "uncertainty" else torch.ones(len(self.groups))

    def combine(self, means: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """``equal``/``uncertainty``: the scalar loss over the groups present in the batch."""
        if self.method == "uncertainty":
            s = self.log_vars.to(means.dtype)
            terms = torch.exp(-s) * means + s
        else:
            terms = means
        return terms[present].mean()

    def backward(self, means: torch.Tensor, present: torch.Tensor, params: list[torch.Tensor],
                 scale: float) -> None:
        """``upgrad``: accumulate the UPGrad-aggregated gradient of the present groups' losses
        (each times ``scale``, e.g. 1 / gradient-accumulation steps) into ``params[i].grad``."""
        from torchjd.aggregation import UPGrad
        from torchjd.autojac import backward, jac_to_grad
        if self._aggregator is None:
            self._aggregator = UPGrad()
        idx = present.nonzero()[:, 0].tolist()
        losses = [means[i] * scale for i in idx]
        backward(losses, inputs=params)
        sq = torch.zeros(len(idx), dtype=torch.float64)
        for p in params:
            if getattr(p, "jac", None) is not None:
                sq += p.jac.detach().flatten(1).double().pow(2).sum(1).cpu()
        w = jac_to_grad(params, self._aggregator)
        self.last_grad_norms = {self.groups[i]: round(float(v.sqrt()) / scale, 4) for i, v in zip(idx, sq)}
        self.last_weights = {self.groups[i]: round(float(x), 4) for i, x in zip(idx, w.detach().cpu())}

    def probe_grad_norms(self, means: torch.Tensor, present: torch.Tensor, params: list[torch.Tensor]) -> None:
        """``uncertainty``: each group's gradient norm (unweighted loss), one backward per group,
        graph kept for the training step's own backward; timed in ``probe_seconds``."""
        t = time.perf_counter()
        norms = {}
        for i in present.nonzero()[:, 0].tolist():
            grads = torch.autograd.grad(means[i], params, retain_graph=True, allow_unused=True)
            norms[self.groups[i]] = round(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads
                                                               if g is not None))), 4)
        self.last_grad_norms = norms
        self.probe_seconds += time.perf_counter() - t

    def log_items(self) -> dict[str, float]:
        out = {}
        if self.method != "upgrad":
            self.last_weights = {g: round(float(w), 4) for g, w in zip(self.groups, self.weights())}
        out.update({f"balance/weight/{g}": w for g, w in self.last_weights.items()})
        out.update({f"balance/grad_norm/{g}": v for g, v in self.last_grad_norms.items()})
        if self.probe_seconds:
            out["balance/probe_s"] = round(self.probe_seconds, 3)
        return out

    # the learned state travels with each checkpoint (the optimizer's state for it is Trainer's)
    def state(self) -> dict:
        return {"method": self.method, "groups": self.groups, "log_vars": self.log_vars.detach().tolist()}

    def restore(self, saved: dict) -> None:
        if saved.get("groups") != self.groups or saved.get("method") != self.method:
            raise ValueError(f"checkpoint balances {saved.get('method')} over {saved.get('groups')}, "
                             f"this run {self.method} over {self.groups}")
        with torch.no_grad():
            self.log_vars.copy_(torch.tensor(saved["log_vars"]))

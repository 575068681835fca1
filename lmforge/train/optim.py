"""Optimizers written from their update rules: AdamW and Muon, plus the parameter grouping.

- `AdamW`: Adam with bias correction and decoupled weight decay (Loshchilov & Hutter). The per-tensor
  loop (`foreach=False`) is the readable spec; the default multi-tensor path (`torch._foreach_*`, one
  kernel launch per op for all tensors of a group) computes the same numbers and is tested equal to
  it and to `torch.optim.AdamW`; on GPU the same update runs through torch's fused AdamW kernel
  (tested equal to the spec).
- `Muon`: SGD-momentum (Nesterov) whose update for each 2-D hidden weight matrix is replaced by its
  nearest semi-orthogonal matrix, computed with the quintic Newton–Schulz iteration of Keller Jordan
  et al. (github.com/KellerJordan/Muon). Groups marked `use_muon=False` (embeddings, output head,
  norms, biases) are updated with AdamW inside the same optimizer, so a run has one optimizer object.
- `param_groups(model, ...)`: splits parameters into decayed matrices and non-decayed
  norms/biases/embeddings (and, for Muon, hidden matrices vs the rest).

Learning rates live in each group's "lr"; a schedule sets group["lr"] = group["initial_lr"] * factor.
This module does not schedule, clip or accumulate (see schedule.py and trainer.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.errors import ConfigError

# Coefficients of the quintic Newton–Schulz iteration from the Muon reference implementation: chosen
# to push singular values into ~[0.7, 1.2] as fast as possible rather than to converge exactly to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _check_hparams(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    if lr < 0:
        raise ConfigError(f"optimizer lr must be >= 0, got {lr}")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"optimizer betas must be in [0, 1), got {betas}")
    if eps <= 0:
        raise ConfigError(f"optimizer eps must be > 0, got {eps}")
    if weight_decay < 0:
        raise ConfigError(f"optimizer weight_decay must be >= 0, got {weight_decay}")


def adamw_reference_step(p: torch.Tensor, grad: torch.Tensor, state: dict, lr: float, beta1: float,
                         beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step for one tensor: the spec the multi-tensor path must match."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    t = state["step"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    p.mul_(1 - lr * weight_decay)                       # decoupled weight decay
    m.lerp_(grad, 1 - beta1)                            # m = b1 m + (1 - b1) g
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v = b2 v + (1 - b2) g^2
    bias1 = 1 - beta1 ** t
    bias2 = 1 - beta2 ** t
    denom = (v.sqrt() / math.sqrt(bias2)).add_(eps)     # sqrt(v_hat) + eps
    p.addcdiv_(m, denom, value=-lr / bias1)             # p -= lr * m_hat / (sqrt(v_hat) + eps)


def _adamw_group(group: dict, states: dict, foreach: bool, fused: bool | None = None) -> None:
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if fused is None:  # auto: on GPU when the group is one device and dtype
        fused = (foreach and params[0].is_cuda and len({(p.device, p.dtype) for p in params}) == 1
                 and hasattr(torch, "_fused_adamw_"))
    if not foreach:
        for p in params:
            adamw_reference_step(p, p.grad, states[p], lr, beta1, beta2, eps, wd)
        return
    # Multi-tensor path: the same arithmetic as adamw_reference_step, batched over the group. Params
    # of a group share their step count (they are all stepped together), so bias terms are scalars.
    grads, ms, vs = [], [], []
    for p in params:
        st = states[p]
        if not st:
            st["step"] = 0
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        st["step"] += 1
        grads.append(p.grad)
        ms.append(st["exp_avg"])
        vs.append(st["exp_avg_sq"])
    by_step: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        by_step.setdefault(states[p]["step"], []).append(i)
    for t, idx in by_step.items():
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        m_ = [ms[i] for i in idx]
        v_ = [vs[i] for i in idx]
        if fused:
            # torch's fused kernel: the same update in one pass over p, g, m, v (instead of ~8
            # multi-tensor passes); it reads the step count from a tensor, made by a fill on the
            # device (torch.tensor(t, device=...) would copy from the host and wait for the GPU).
            step = torch.full((), float(t), device=ps[0].device)
            torch._fused_adamw_(ps, gs, m_, v_, [], [step] * len(ps), lr=lr, beta1=beta1, beta2=beta2,
                                weight_decay=wd, eps=eps, amsgrad=False, maximize=False)
            continue
        if wd != 0:
            torch._foreach_mul_(ps, 1 - lr * wd)
        torch._foreach_lerp_(m_, gs, 1 - beta1)
        torch._foreach_mul_(v_, beta2)
        torch._foreach_addcmul_(v_, gs, gs, value=1 - beta2)
        bias1 = 1 - beta1 ** t
        bias2 = 1 - beta2 ** t
        denom = torch._foreach_sqrt(v_)
        torch._foreach_div_(denom, math.sqrt(bias2))
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, m_, denom, value=-lr / bias1)


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction); matches torch.optim.AdamW(foreach/fused).

    `fused`: None (default) runs torch's fused AdamW kernel for groups on one CUDA device and dtype
    (when `foreach`), True forces it (CPU too: tests), False keeps the multi-tensor path."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, foreach: bool = True,
                 fused: bool | None = None):
        _check_hparams(lr, betas, eps, weight_decay)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.foreach, self.fused = foreach, fused

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _adamw_group(group, self.state, self.foreach, self.fused)
        return loss


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of g = U S V^T (last two dims; batched).

    Quintic iteration X <- a X + (b A + c A^2) X with A = X X^T, after scaling X to spectral norm
    <= 1 (Frobenius norm bounds it). Runs in bfloat16 on GPU (the iteration is robust to it and it
    is matmul-bound), float32 on CPU. Works on the wide orientation so A is the smaller Gram matrix.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for hidden matrices (groups with use_muon=True), AdamW for every other group.

    Muon group keys: lr, momentum, nesterov, ns_steps, weight_decay. The orthogonalised update is
    scaled by sqrt(max(1, rows / cols)) (as in the reference implementation) so tall matrices get a
    per-element update of the same RMS as square ones. AdamW group keys: lr, betas, eps, weight_decay.
    """

    def __init__(self, param_groups: list[dict], lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, weight_decay: float = 0.0,
                 adam_betas: tuple[float, float] = (0.9, 0.95), adam_eps: float = 1e-8,
                 foreach: bool = True):
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"muon momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ConfigError(f"muon ns_steps must be >= 1, got {ns_steps}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, betas=tuple(adam_betas), eps=adam_eps, use_muon=False)
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            _check_hparams(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            if group["use_muon"]:
                bad = [tuple(p.shape) for p in group["params"] if p.ndim < 2]
                if bad:
                    raise ConfigError(f"Muon groups take matrices only; got parameters of shape {bad[0]} "
                                      "(put norms/biases in a use_muon=False group)")
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["use_muon"]:
                _adamw_group(group, self.state, self.foreach)
                continue
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["momentum_buffer"] = torch.zeros_like(p)
                st["step"] += 1
                buf = st["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                g = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
                update = newton_schulz(g, steps=group["ns_steps"])
                scale = max(1.0, p.size(-2) / p.size(-1)) ** 0.5
                if wd != 0:
                    p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * scale)
        return loss


def _is_embedding_or_head(module_name: str, module: nn.Module, vocab_size: int | None) -> bool:
    # by type (torch's or any module class named Embedding), by output width, then by name
    if isinstance(module, nn.Embedding) or type(module).__name__ == "Embedding":
        return True
    if vocab_size is not None and getattr(module, "out_features", None) == vocab_size:
        return True
    last = module_name.rsplit(".", 1)[-1]
    return last in ("lm_head", "head", "wte", "wpe", "tok_emb", "pos_emb", "tok_embeddings", "embed", "embedding")


def classify_parameters(model: nn.Module, vocab_size: int | None = None) -> dict[str, list[nn.Parameter]]:
    """Split trainable parameters into 'matrix' (hidden weights, >=2-D), 'embedding' (token/position
    embeddings and the output head) and 'vector' (norm gains, biases, other 0/1-D tensors).

    Tied parameters appear once (in 'embedding' when any owner is an embedding or head).
    """
    kinds: dict[int, str] = {}
    params: dict[int, nn.Parameter] = {}
    for mname, module in model.named_modules():
        embed_like = _is_embedding_or_head(mname, module, vocab_size)
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                continue
            key = id(p)
            params[key] = p
            kind = "embedding" if embed_like else ("matrix" if p.ndim >= 2 else "vector")
            if kinds.get(key) != "embedding":
                kinds[key] = kind
    out: dict[str, list[nn.Parameter]] = {"matrix": [], "embedding": [], "vector": []}
    for key, p in params.items():
        out[kinds[key]].append(p)
    return out


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    muon_lr: float = 0.02, muon_momentum: float = 0.95, muon_ns_steps: int = 5,
                    decay_embeddings: bool = False, vocab_size: int | None = None,
                    foreach: bool = True) -> torch.optim.Optimizer:
    """The optimizer for a model: AdamW for everything, or Muon for hidden matrices + AdamW for the rest.

    Weight decay applies to hidden matrices (and to embeddings/head if `decay_embeddings`), never to
    norms and biases. Each group records `initial_lr` for the schedule.
    """
    kinds = classify_parameters(model, vocab_size)
    emb_wd = weight_decay if decay_embeddings else 0.0
    if name == "adamw":
        groups = [dict(params=kinds["matrix"], weight_decay=weight_decay, name="matrix"),
                  dict(params=kinds["embedding"], weight_decay=emb_wd, name="embedding"),
                  dict(params=kinds["vector"], weight_decay=0.0, name="vector")]
        groups = [g for g in groups if g["params"]]
        opt: torch.optim.Optimizer = AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=foreach)
    elif name == "muon":
        groups = [dict(params=kinds["matrix"], use_muon=True, lr=muon_lr, weight_decay=0.0, name="matrix"),
                  dict(params=kinds["embedding"], use_muon=False, lr=lr, weight_decay=emb_wd,
                       name="embedding"),
                  dict(params=kinds["vector"], use_muon=False, lr=lr, weight_decay=0.0, name="vector")]
        groups = [g for g in groups if g["params"]]
        opt = Muon(groups, lr=muon_lr, momentum=muon_momentum, ns_steps=muon_ns_steps,
                   adam_betas=betas, adam_eps=eps, foreach=foreach)
    else:
        raise ConfigError(f"train.optimizer = {name!r} must be one of ['adamw', 'muon']")
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    return opt


def optimizer_from_config(model: nn.Module, t, vocab_size: int | None) -> torch.optim.Optimizer:
    """`build_optimizer` with every setting read from a TrainConfig `t` (the one place that maps
    the config's optimizer fields onto it: pretraining, distributed launch and scaling probes)."""
    return build_optimizer(model, t.optimizer, lr=t.lr, weight_decay=t.weight_decay, betas=(t.beta1, t.beta2),
                           eps=t.eps, muon_lr=t.muon_lr, muon_momentum=t.muon_momentum,
                           muon_ns_steps=t.muon_ns_steps, decay_embeddings=t.decay_embeddings,
                           vocab_size=vocab_size)

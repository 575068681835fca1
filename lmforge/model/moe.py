"""Mixture of Experts feed-forward layer (token-choice top-k routing, DeepSeek-MoE style).

What it does:
- Routing: a linear router scores every expert per token. `routing` picks how gates are formed:
  "softmax_topk" (softmax over all experts, then keep the top k: Switch, DeepSeek-V2, Qwen-MoE),
  "topk_softmax" (top k logits, then softmax over those k: Mixtral, DBRX) or "sigmoid_topk"
  (independent sigmoid scores, then top k: DeepSeek-V3). `normalize_topk` rescales the kept gates
  to sum to 1; `route_scale` multiplies them (DeepSeek-V3 uses 2.5).
- Fine-grained experts (`granularity` splits the dense width into narrower experts) and always-on
  shared experts (`n_shared_experts`, each as wide as a routed expert).
- Balancing: the switch-style aux loss, the DeepSeek-V3 sequence-level aux loss, the router z-loss,
  and DeepSeek-V3 aux-loss-free balancing (a per-expert bias added to the scores for *selection
  only*, moved by `bias_update_rate` against the sign of each expert's load error each time the
  trainer calls `update_routing_bias()` after an optimizer step).
- Capacity: with `capacity_factor` set, each expert takes at most ceil(cf * N * k / E) of the
  N*k assignments of a batch; the rest are dropped (by position or by lowest gate) and contribute
  nothing, so that token's output from that expert is zero and only the residual carries it.
- Dispatch is vectorised: assignments are sorted by expert, and experts run as grouped matmuls
  (`torch._grouped_mm` when this torch has it and the widths are 16-byte aligned), or as a loop
  over experts on contiguous slices. Never a loop over tokens. `moe_reference` is the readable spec
  (every expert on every token, masked), used by the tests.
- `upcycle_from_dense` turns a dense MLP checkpoint into this layer (see its docstring for what
  is exact at init).

What it does not do: expert parallelism across devices (that belongs to `distributed/`), and
summing aux losses over layers (the Transformer does that). Under data parallelism the per-rank
load counts in `load_counts` must be all-reduced before `update_routing_bias()` to stay in sync.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.model.layers import get_activation, trunc_normal_

log = logging.getLogger(__name__)

Routing = Literal["softmax_topk", "topk_softmax", "sigmoid_topk"]


@dataclass
class MoEConfig:
    n_experts: int = 8  # routed experts
    top_k: int = 2
    d_expert: int | None = None  # None -> dense d_ff rule (8/3·d_model to 64, or 4·d_model) / granularity
    granularity: int = 1  # fine-grained segmentation factor m (DeepSeek-MoE), used only to derive d_expert
    n_shared_experts: int = 0  # always-on experts, each d_expert wide
    routing: Routing = "softmax_topk"
    normalize_topk: bool = False  # rescale the k kept gates to sum to 1
    route_scale: float = 1.0  # multiply the gates (DeepSeek-V3: 2.5)
    balance_loss_coef: float = 0.01  # switch-style aux loss over the whole batch
    seq_balance_loss_coef: float = 0.0  # DeepSeek-V3 per-sequence aux loss
    router_z_loss_coef: float = 0.0  # ST-MoE: mean logsumexp(logits)² (1e-3 in the paper)
    aux_free_bias: bool = False  # DeepSeek-V3 loss-free balancing via a selection-only bias
    bias_update_rate: float = 1e-3  # gamma of the bias update
    capacity_factor: float | None = None  # None: no dropping
    drop_policy: Literal["position", "score"] = "position"  # which assignments an expert keeps
    dispatch: Literal["auto", "grouped_mm", "loop"] = "auto"  # auto: grouped_mm where it can run

    def __post_init__(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"MoEConfig: {msg}")

        if self.n_experts < 1:
            raise bad(f"n_experts = {self.n_experts} must be >= 1")
        if not 1 <= self.top_k <= self.n_experts:
            raise bad(f"top_k = {self.top_k} must be in [1, n_experts = {self.n_experts}]")
        if self.granularity < 1:
            raise bad(f"granularity = {self.granularity} must be >= 1")
        if self.d_expert is not None and self.d_expert < 1:
            raise bad(f"d_expert = {self.d_expert} must be >= 1")
        if self.n_shared_experts < 0:
            raise bad(f"n_shared_experts = {self.n_shared_experts} must be >= 0")
        if self.route_scale <= 0:
            raise bad(f"route_scale = {self.route_scale} must be > 0")
        for name in ("balance_loss_coef", "seq_balance_loss_coef", "router_z_loss_coef", "bias_update_rate"):
            if getattr(self, name) < 0:
                raise bad(f"{name} = {getattr(self, name)} must be >= 0")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise bad(f"capacity_factor = {self.capacity_factor} must be > 0 (or unset for no dropping)")

    def expert_width(self, d_model: int, glu: bool) -> int:
        """Hidden width of one expert: `d_expert`, or the dense d_ff rule divided by `granularity`."""
        if self.d_expert is not None:
            return self.d_expert
        dense = int(-(-(8 * d_model / 3) // 64) * 64) if glu else 4 * d_model
        return -(-dense // self.granularity)

    def param_counts(self, d_model: int, glu: bool) -> dict[str, int]:
        """Parameters of one MoE layer: total, and active per token (router + shared + top_k experts)."""
        per_expert = (3 if glu else 2) * d_model * self.expert_width(d_model, glu)
        router = self.n_experts * d_model
        shared = self.n_shared_experts * per_expert
        return {"total": router + shared + self.n_experts * per_expert,
                "active": router + shared + self.top_k * per_expert}


# ----------------------------------------------------------------------------------------------
# routing


@dataclass
class RouterOutput:
    expert_idx: torch.Tensor  # [N, k] long: chosen experts per token
    gates: torch.Tensor  # [N, k] fp32: weights of the chosen experts' outputs
    probs: torch.Tensor  # [N, E] fp32: normalised scores used by the balance losses
    logits: torch.Tensor  # [N, E] fp32: raw router logits (z-loss)


def route(logits: torch.Tensor, cfg: MoEConfig, bias: torch.Tensor | None = None) -> RouterOutput:
    """Token-choice top-k routing from router logits [N, E] (fp32). `bias` [E] only changes which
    experts are selected, never the gate values (DeepSeek-V3 aux-loss-free balancing)."""
    k = cfg.top_k
    if cfg.routing == "sigmoid_topk":
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True)
    else:
        scores = probs = torch.softmax(logits, dim=-1)
    base = logits if cfg.routing == "topk_softmax" else scores
    select = base if bias is None else base + bias
    expert_idx = select.topk(k, dim=-1, sorted=False).indices
    if cfg.routing == "topk_softmax":
        gates = torch.softmax(logits.gather(-1, expert_idx), dim=-1)
    else:
        gates = scores.gather(-1, expert_idx)
        if cfg.normalize_topk:
            gates = gates / gates.sum(-1, keepdim=True)
    if cfg.route_scale != 1.0:
        gates = gates * cfg.route_scale
    return RouterOutput(expert_idx, gates, probs, logits)


@dataclass
class DispatchPlan:
    """Where each (token, slot) assignment goes: the routing, the expert-sorted order of kept
    assignments, per-expert counts before and after capacity, and the row maps for gather/scatter.
    `source[slot]` is the sorted row of that assignment, or M (a zero row) if it was dropped, so a
    dropped token gets nothing from that expert and only the residual carries it."""

    route: RouterOutput
    order: torch.Tensor         # [M] assignment indices (token * k + slot), grouped by expert
    counts: torch.Tensor        # [E] assignments per expert before capacity
    kept_counts: torch.Tensor   # [E] after capacity
    source: torch.Tensor        # [N * k] sorted row of each assignment, M if dropped
    token: torch.Tensor         # [M] token of each sorted row
    gates_sorted: torch.Tensor  # [M] gate of each sorted row


def balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch-style loss E · Σ_i f_i · P_i, with f_i the fraction of the N·k assignments that chose
    expert i and P_i the mean normalised score of expert i. Equals 1 under perfect balance."""
    n, k = expert_idx.shape
    f = expert_counts(expert_idx, n_experts).to(probs.dtype) / (n * k)
    return n_experts * (f * probs.mean(0)).sum()


def seq_balance_loss(probs: torch.Tensor, expert_idx: torch.Tensor, n_experts: int, batch: int) -> torch.Tensor:
    """The same per sequence (DeepSeek-V3 eq. 17-20), averaged over the `batch` sequences."""
    n, k = expert_idx.shape
    t = n // batch
    counts = torch.zeros(batch, n_experts, dtype=probs.dtype, device=probs.device)
    counts.scatter_add_(1, expert_idx.reshape(batch, t * k), torch.ones_like(counts[:, :1]).expand(batch, t * k))
    f = counts / (t * k)
    p = probs.reshape(batch, t, n_experts).mean(1)
    return n_experts * (f * p).sum(-1).mean()


def expert_counts(expert_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments per expert [E] (long). A scatter-add, unlike torch.bincount, needs no host sync."""
    flat = expert_idx.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)²."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def capacity(cfg: MoEConfig, n_tokens: int) -> int | None:
    """Max assignments one expert keeps in a batch of `n_tokens` tokens, or None (no dropping)."""
    if cfg.capacity_factor is None:
        return None
    return math.ceil(cfg.capacity_factor * n_tokens * cfg.top_k / cfg.n_experts)


def keep_mask(expert_idx: torch.Tensor, gates: torch.Tensor, cfg: MoEConfig) -> torch.Tensor | None:
    """[N, k] bool: which assignments survive the capacity limit (None when nothing can drop).
    Policy "position" keeps an expert's earliest tokens (Switch/GShard), "score" its highest gates."""
    cap = capacity(cfg, expert_idx.shape[0])
    if cap is None:
        return None
    flat_e = expert_idx.reshape(-1)
    order = _sort_assignments(flat_e, gates.reshape(-1), cfg)
    keep = torch.zeros_like(flat_e, dtype=torch.bool)
    keep[_within_capacity(order, flat_e, expert_counts(flat_e, cfg.n_experts), cap)] = True
    return keep.view_as(expert_idx)


def _within_capacity(order: torch.Tensor, flat_e: torch.Tensor, counts: torch.Tensor, cap: int) -> torch.Tensor:
    """The entries of `order` (assignments grouped by expert) that are among their expert's first `cap`."""
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - starts[flat_e[order]]
    return order[rank < cap]


def _sort_assignments(flat_e: torch.Tensor, flat_g: torch.Tensor, cfg: MoEConfig) -> torch.Tensor:
    """Permutation grouping assignments by expert; inside a group by position or by falling gate."""
    if cfg.drop_policy == "score" and cfg.capacity_factor is not None:
        by_gate = torch.argsort(flat_g.detach(), descending=True, stable=True)
        return by_gate[torch.argsort(flat_e[by_gate], stable=True)]
    return torch.argsort(flat_e, stable=True)


# ----------------------------------------------------------------------------------------------
# moving rows between token order and expert order


class _Dispatch(torch.autograd.Function):
    """x [N, D] -> x[token] [M, D]: each kept assignment's token row, in expert order.

    Backward is the adjoint written as a gather (no atomics, deterministic): token n's gradient
    is the sum over its k slots of the sorted row each slot went to (`source`, M = a zero row for
    dropped slots). A plain index_select would backpropagate through an atomic index_add."""

    @staticmethod
    def forward(ctx, x, token, source, k):
        ctx.save_for_backward(token, source)
        ctx.k = k
        return x.index_select(0, token)

    @staticmethod
    def backward(ctx, grad):
        token, source = ctx.saved_tensors
        return _gather_slots(grad, source, ctx.k), None, None, None


class _Combine(torch.autograd.Function):
    """y_sorted [M, D] -> y [N, D]: sum of each token's k expert outputs (the adjoint of _Dispatch)."""

    @staticmethod
    def forward(ctx, y_sorted, token, source, k):
        ctx.save_for_backward(token, source)
        return _gather_slots(y_sorted, source, k)

    @staticmethod
    def backward(ctx, grad):
        token, source = ctx.saved_tensors
        return grad.index_select(0, token), None, None, None


def _gather_slots(rows: torch.Tensor, source: torch.Tensor, k: int) -> torch.Tensor:
    """[M, D] sorted rows -> [N, D]: for each token, the sum of the rows its k slots point at."""
    if source.numel() > rows.shape[0]:  # some slots were dropped: they point at an appended zero row
        rows = torch.cat((rows, rows.new_zeros(1, rows.shape[1])))
    return rows.index_select(0, source).view(-1, k, rows.shape[1]).sum(1)


# ----------------------------------------------------------------------------------------------
# the layer


class _RouterMatmul(torch.autograd.Function):
    """x [N, D] @ w[E, D]ᵀ -> fp32 [N, E] from bf16/fp16 operands (CUDA); gradients in the operand dtype."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.mm(x, w.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        g = grad.to(x.dtype)
        return torch.mm(g, w), torch.mm(g.t(), x)


_FUSED_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu,
                      "gelu_tanh": lambda h: F.gelu(h, approximate="tanh")}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on x run in: the autocast dtype when autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_available(*widths: int, dtype: torch.dtype) -> bool:
    """torch._grouped_mm needs 16-byte aligned rows of every operand."""
    size = torch.empty((), dtype=dtype).element_size()
    return hasattr(torch, "_grouped_mm") and all((w * size) % 16 == 0 for w in widths)


class MoE(nn.Module):
    """Routed experts (+ optional shared experts) replacing a dense MLP: [B, T, D] -> [B, T, D]."""

    def __init__(self, d_model: int, cfg: MoEConfig, activation: str = "silu", glu: bool = True,
                 init_std: float = 0.02):
        """Parameters are initialised here with a truncated normal of `init_std` (call
        `reset_parameters(std)` to redo it); the routing bias starts at zero."""
        super().__init__()
        get_activation(activation)  # validates the name
        # torch's fused kernels for the same functions as layers.ACTIVATIONS (the dense-equality
        # test checks they agree); relu2 has no fused kernel
        self.act = _FUSED_ACTIVATIONS.get(activation) or get_activation(activation)
        self.d_model, self.cfg, self.activation, self.glu = d_model, cfg, activation, glu
        e, f = cfg.n_experts, cfg.expert_width(d_model, glu)
        self.d_expert = f
        self.router = nn.Parameter(torch.empty(e, d_model))
        # Expert weights are stacked [E, in, out] so that grouped matmuls take them as they are.
        # With GLU, w_in holds [gate | up] side by side: one matmul of width 2f instead of two of f,
        # and in backward one input-gradient matmul instead of two plus a sum of [M, D] tensors.
        n_in = 2 * f if glu else f
        self.w_in = nn.Parameter(torch.empty(e, d_model, n_in))
        self.w_out = nn.Parameter(torch.empty(e, f, d_model))
        fs = cfg.n_shared_experts * f  # n shared experts of width f == one dense MLP of width n·f
        self.shared_in = nn.Parameter(torch.empty(d_model, 2 * fs if glu else fs)) if fs else None
        self.shared_out = nn.Parameter(torch.empty(fs, d_model)) if fs else None
        self.register_buffer("routing_bias", torch.zeros(e), persistent=True)
        # assignments per expert since the last bias update (training forwards only)
        self.register_buffer("load_counts", torch.zeros(e), persistent=False)
        self.reset_parameters(init_std)

    def reset_parameters(self, std: float = 0.02) -> None:
        for p in self.parameters():
            trunc_normal_(p, std)
        self.routing_bias.zero_()
        self.load_counts.zero_()

    # -- the pieces ----------------------------------------------------------------------------
    def _ffn(self, x: torch.Tensor, w_in, w_out, mm, scale: torch.Tensor | None = None) -> torch.Tensor:
        h = mm(x, w_in)
        if self.glu:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        if scale is not None:  # the gates, applied on the hidden width (usually < d_model: cheaper)
            h = h * scale.unsqueeze(-1).to(h.dtype)
        return mm(h, w_out)

    def dispatch_mode(self, x: torch.Tensor) -> str:
        mode = self.cfg.dispatch
        if mode == "auto":
            # CUDA's grouped GEMM is a bf16 kernel; the CPU one takes fp32/bf16/fp16
            dt = _compute_dtype(x)
            cpu_ok = x.device.type == "cpu" and dt in (torch.float32, torch.bfloat16, torch.float16)
            ok = grouped_mm_available(self.d_model, self.d_expert, dtype=dt) and (cpu_ok or dt == torch.bfloat16)
            mode = "grouped_mm" if ok else "loop"
        return mode

    def experts(self, x_sorted: torch.Tensor, counts: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        """Run expert e on its contiguous rows of `x_sorted` ([M, D], grouped by expert, counts [E]),
        each row's output scaled by its gate [M] if given."""
        if self.dispatch_mode(x_sorted) == "grouped_mm":
            offs = torch.cumsum(counts, 0).to(torch.int32)
            dt = _compute_dtype(x_sorted)  # under autocast: cast operands as autocast does for matmuls

            def mm(a, w):
                return torch._grouped_mm(a.to(dt), w.to(dt), offs=offs)

            return self._ffn(x_sorted, self.w_in, self.w_out, mm, gates)
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):  # one host sync; then a loop over experts, not tokens
            if n:
                rows = slice(start, start + n)
                outs.append(self._ffn(x_sorted[rows], self.w_in[e], self.w_out[e], torch.matmul,
                                      None if gates is None else gates[rows]))
            start += n
        return torch.cat(outs) if outs else x_sorted.new_zeros(0, self.d_model)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        return self._ffn(x, self.shared_in, self.shared_out, torch.matmul)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 logits [N, E]: bf16 logits (3 significant digits) flip near-tied top-k choices and
        make the z-loss noisy. bf16/fp16 operands on CUDA go through a tensor-core matmul with fp32
        output (the same exact products and fp32 sums as upcasting first, without the fp32 copy
        of x and the slow fp32 matmul); otherwise both operands are upcast."""
        with torch.autocast(x.device.type, enabled=False):  # autocast would make the logits bf16
            if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.dtype == self.router.dtype:
                try:
                    return _RouterMatmul.apply(x, self.router)
                except (RuntimeError, TypeError) as err:  # a torch without mm(..., out_dtype=): same result
                    log.debug("MoE router: mm(out_dtype=float32) failed (%s); upcasting instead", err)
            return F.linear(x.float(), self.router.float())

    # -- forward -------------------------------------------------------------------------------
    def plan(self, flat: torch.Tensor) -> DispatchPlan:
        """Route tokens [N, D] and plan the expert-sorted dispatch (capacity applied)."""
        cfg, k = self.cfg, self.cfg.top_k
        r = route(self.router_logits(flat), cfg, self.routing_bias if cfg.aux_free_bias else None)
        flat_e, flat_g = r.expert_idx.reshape(-1), r.gates.reshape(-1)
        order = _sort_assignments(flat_e, flat_g, cfg)
        counts = expert_counts(flat_e, cfg.n_experts)
        kept_counts = counts
        cap = capacity(cfg, flat.shape[0])
        if cap is not None:
            order = _within_capacity(order, flat_e, counts, cap)
            kept_counts = counts.clamp(max=cap)
        m = order.numel()
        source = torch.full((flat_e.numel(),), m, dtype=torch.long, device=flat.device)
        source[order] = torch.arange(m, device=flat.device)
        return DispatchPlan(r, order, counts, kept_counts, source, order // k, flat_g.index_select(0, order))

    def losses_and_metrics(self, plan: DispatchPlan, batch: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Weighted aux losses and detached load metrics of one forward; counts load for the bias."""
        cfg, r = self.cfg, plan.route
        n_assign = plan.source.numel()
        aux: dict[str, torch.Tensor] = {}
        if cfg.balance_loss_coef > 0:
            aux["moe_balance"] = cfg.balance_loss_coef * balance_loss(r.probs, r.expert_idx, cfg.n_experts)
        if cfg.seq_balance_loss_coef > 0:
            aux["moe_seq_balance"] = cfg.seq_balance_loss_coef * seq_balance_loss(
                r.probs, r.expert_idx, cfg.n_experts, batch)
        if cfg.router_z_loss_coef > 0:
            aux["router_z"] = cfg.router_z_loss_coef * router_z_loss(r.logits)
        if self.training and cfg.aux_free_bias:
            self.load_counts += plan.counts.to(self.load_counts.dtype)
        metrics = {
            "expert_load": (plan.counts.float() / n_assign).detach(),
            "dropped_fraction": (1.0 - plan.kept_counts.sum().float() / n_assign).detach(),
        }
        return aux, metrics

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """x [B, T, D] -> (y [B, T, D], aux losses (weighted), metrics (detached))."""
        (b, t, d), k = x.shape, self.cfg.top_k
        flat = x.reshape(-1, d)
        p = self.plan(flat)
        x_sorted = _Dispatch.apply(flat, p.token, p.source, k)
        y_sorted = self.experts(x_sorted, p.kept_counts, p.gates_sorted)
        y = _Combine.apply(y_sorted, p.token, p.source, k)
        if self.shared_in is not None:
            y = y + self.shared(flat)
        aux, metrics = self.losses_and_metrics(p, b)
        return y.view(b, t, d), aux, metrics

    @torch.no_grad()
    def update_routing_bias(self) -> None:
        """DeepSeek-V3: b_i += γ·sign(mean load − load_i) from the loads seen since the last call."""
        if not self.cfg.aux_free_bias or self.load_counts.sum() == 0:
            return
        err = self.load_counts.mean() - self.load_counts
        self.routing_bias += self.cfg.bias_update_rate * torch.sign(err)
        self.load_counts.zero_()


def moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The spec, slow on purpose: every expert runs on every token; outputs are summed with the gate
    of each kept (token, expert) assignment and zero elsewhere. Returns y [B, T, D]."""
    cfg, (b, t, d) = moe.cfg, x.shape
    flat = x.reshape(-1, d)
    r = route(moe.router_logits(flat), cfg, moe.routing_bias if cfg.aux_free_bias else None)
    keep = keep_mask(r.expert_idx, r.gates, cfg)
    weights = torch.zeros(flat.shape[0], cfg.n_experts, dtype=torch.float32, device=x.device)
    weights.scatter_add_(1, r.expert_idx, r.gates if keep is None else r.gates * keep)
    y = torch.zeros_like(flat)
    for e in range(cfg.n_experts):
        y = y + weights[:, e:e + 1].to(x.dtype) * moe._ffn(flat, moe.w_in[e], moe.w_out[e], torch.matmul)
    if moe.shared_in is not None:
        y = y + moe.shared(flat)
    return y.view(b, t, d)


@torch.no_grad()
def upcycle_from_dense(moe: MoE, dense: dict[str, torch.Tensor], noise: float = 0.0,
                       generator: torch.Generator | None = None) -> MoE:
    """Sparse upcycling (Komatsuzaki et al. 2022): every routed expert becomes a copy of the dense
    MLP whose state dict (keys `gate.weight`, `up.weight`, `down.weight`, as in layers.MLP) is
    `dense`. The router keeps its random init and the routing bias is reset.

    What holds at init: every expert computes the dense MLP, so the layer's output equals the dense
    output exactly when the gates of each token sum to 1 — routing "topk_softmax", or
    `normalize_topk` with `route_scale` 1 — and no assignment is dropped (no `capacity_factor`, or
    one high enough). With "softmax_topk" un-normalised the output is the dense output times the
    sum of the kept probabilities, which is < 1 unless top_k == n_experts. `noise` > 0 multiplies
    each expert copy by (1 + noise·N(0,1)) to break the symmetry between experts; then equality is
    only approximate. Shared experts cannot hold a copy as well (the output would double), so
    upcycling a layer with shared experts is refused, as is a dense width unequal to `d_expert`.
    """
    if any(key.endswith("bias") for key in dense):
        raise ConfigError(f"upcycle_from_dense: dense MLP has biases ({sorted(dense)}); MoE experts have none")
    need = ["up.weight", "down.weight"] + (["gate.weight"] if moe.glu else [])
    missing = [k for k in need if k not in dense]
    if missing:
        raise ConfigError(f"upcycle_from_dense: dense state dict lacks {missing} (has {sorted(dense)}); "
                          f"glu = {moe.glu} needs {need}")
    if "gate.weight" in dense and not moe.glu:
        raise ConfigError("upcycle_from_dense: dense MLP is gated (has 'gate.weight') but the MoE has glu = False")
    d_ff, d_model = dense["up.weight"].shape
    if d_model != moe.d_model or d_ff != moe.d_expert:
        raise ConfigError(f"upcycle_from_dense: dense MLP is {d_model} -> {d_ff}, but the MoE has d_model = "
                          f"{moe.d_model}, d_expert = {moe.d_expert}; set moe.d_expert = {d_ff}")
    if moe.cfg.n_shared_experts:
        raise ConfigError(f"upcycle_from_dense: n_shared_experts = {moe.cfg.n_shared_experts} must be 0 "
                          "(a shared copy plus routed copies would double the dense output)")

    def copy(param: torch.Tensor, weight: torch.Tensor) -> None:
        src = weight.t().to(param.dtype).unsqueeze(0).expand_as(param)
        if noise > 0:
            eps = torch.randn(param.shape, generator=generator, dtype=torch.float32).to(param.device)
            src = src * (1 + noise * eps).to(param.dtype)
        param.copy_(src)

    w_in = torch.cat((dense["gate.weight"], dense["up.weight"])) if moe.glu else dense["up.weight"]
    copy(moe.w_in, w_in)
    copy(moe.w_out, dense["down.weight"])
    moe.routing_bias.zero_()
    moe.load_counts.zero_()
    return moe

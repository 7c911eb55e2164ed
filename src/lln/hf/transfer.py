"""Attention transfer: teach a converted model's attention to reproduce the softmax it replaced.

In the spirit of LoLCATs / Hedgehog, adapted to LLN. The pretrained weights stay frozen;
each layer learns, on its own, to make its linear attention output match the softmax
attention output of the original model, with the original model's activations as inputs:

1. :func:`capture` runs the model once with exact softmax attention and records, for every
   attention layer, what reached the attention function (``q (B, H, L, D)``, ``k, v
   (B, H_kv, S, D)``, the 2-D padding mask, ``scaling``) and the softmax output
   ``(B, L, H, D)``. Every layer therefore sees the teacher's hidden states.
2. :func:`transfer` then trains, layer by layer, a few parameters to minimise the mean squared
   error between the layer's converted attention (the registered ``attn_implementation``,
   e.g. ``"lln_diag"``) on those inputs and the recorded softmax output (real query
   positions only):

   * the layer's :class:`lln.hf.LLNAttentionParams` (per-head ``log_alpha``, ``log_beta``,
     ``log_temperature``, and the LLN/Diag mixing weights) — a few dozen numbers per layer;
   * optionally q/k adapters (:class:`QKAdapter`): a per-head linear map on q and on k,
     initialised to the identity, that reshapes the exponent of the LLN features (what the
     feature maps of Hedgehog learn). They are folded into the q/k projection weights
     afterwards (:func:`fold_adapters`), so the converted model stays an ordinary
     transformers model with modified weights. On rotary models (Llama family) the map is
     restricted to a scaled rotation per frequency pair, the maps that commute with the
     rotary embedding, so folding it before the rotation is exact.

Layers are independent given the recorded inputs, so the cost is ``steps`` forward/backward
passes of one attention layer per layer; no full-model backward is needed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .params import attach, attention_modules
from .stats import _as_kwargs

#: attn_implementation name used while recording the softmax teacher.
CAPTURE_IMPLEMENTATION = "lln_transfer_capture"
#: Parameter names of :class:`lln.hf.LLNAttentionParams` trained by default, per method.
DEFAULT_TRAIN = {
    "lln": ("log_alpha", "log_beta"),
    "lln_diag": ("log_alpha", "log_beta", "lln_weight", "diag_weight"),
}
#: Names of the q/k projection submodules, by model family (first match wins).
PROJECTION_NAMES = (("q_proj", "k_proj"), ("query", "key"))


@dataclass
class LayerRecord:
    """What one attention layer saw and produced on one batch (detached, on the CPU).

    ``q (B, H, L, D)``, ``k``/``v`` ``(B, H_kv, S, D)``, ``mask (B, S)`` bool (True = real
    token) or None, ``teacher (B, L, H, Dv)`` the softmax output, ``scaling`` the softmax
    score scale.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Tensor | None
    teacher: Tensor
    scaling: float


@dataclass
class Capture:
    """Per-layer records of :func:`capture`: ``records[layer_idx]`` is a list over batches."""

    records: dict[int, list[LayerRecord]] = field(default_factory=dict)

    def tokens(self) -> int:
        """Real query tokens recorded per layer."""
        first = next(iter(self.records.values()), [])
        return sum(
            r.q.shape[0] * r.q.shape[2] if r.mask is None else int(r.mask.sum()) for r in first
        )


def softmax_attention_hf(
    module: nn.Module, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float
) -> Tensor:
    """Exact softmax attention on attention-interface inputs; returns ``(B, L, H, Dv)``.

    ``q (B, H, L, D)``, ``k``/``v`` ``(B, H_kv, S, D)`` (expanded for grouped-query
    attention), ``mask (B, S)`` True = real key, causal when ``module.is_causal`` (queries
    aligned to the last keys). Queries that see no key output 0.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    b, _, n, _ = q.shape
    s = k.shape[2]
    visible = torch.ones(b, 1, n, s, dtype=torch.bool, device=q.device)
    if mask is not None:
        visible = visible & mask[:, None, None, :]
    if bool(getattr(module, "is_causal", False)):
        visible = visible & torch.ones(n, s, dtype=torch.bool, device=q.device).tril(s - n)
    empty = ~visible.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | empty, scale=scaling)
    return out.masked_fill(empty, 0.0).transpose(1, 2)


def _capture_fn(store: dict[int, list[LayerRecord]]):
    from .masks import key_padding_mask_from_hf

    def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        mask = key_padding_mask_from_hf(attention_mask, query.shape[0], key.shape[2])
        out = softmax_attention_hf(module, query, key, value, mask, scale)
        store.setdefault(module.layer_idx, []).append(LayerRecord(
            q=query.detach().cpu(), k=key.detach().cpu(), v=value.detach().cpu(),
            mask=None if mask is None else mask.cpu(), teacher=out.detach().cpu(),
            scaling=scale,
        ))
        return out.to(query.dtype), None

    return fn


@contextlib.contextmanager
def attn_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Temporarily run ``model`` with another registered ``attn_implementation``."""
    config = model.config
    old = config._attn_implementation
    configs = {id(m.config): m.config for _, m in attention_modules(model)}
    configs[id(config)] = config
    try:
        for c in configs.values():
            c._attn_implementation = name
        yield
    finally:
        for c in configs.values():
            c._attn_implementation = old


@torch.no_grad()
def capture(model: nn.Module, batches: Iterable, *, progress: bool = True) -> Capture:
    """Run ``model`` with exact softmax attention and record every layer's attention I/O.

    Args:
        model: a transformers model (any ``attn_implementation``; it is switched to a private
            softmax recorder for the call).
        batches: model inputs (dicts, ``input_ids`` tensors or ``(input_ids,
            attention_mask)`` pairs).
        progress: show a tqdm bar.

    Returns:
        A :class:`Capture` (records on the CPU; memory ~ tokens x layers x 4 (q, k, v,
        output) x hidden size x 4 bytes).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from .masks import padding_mask

    result = Capture()
    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_fn(result.records))
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, padding_mask)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with attn_implementation(model, CAPTURE_IMPLEMENTATION):
            for batch in tqdm(batches, desc="recording softmax", disable=not progress):
                model(**_as_kwargs(batch))
                seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("capture() got no batches")
    if not result.records:
        raise ValueError(
            "capture() recorded no attention call: the model has no attention layers, or does "
            "not call its attention through transformers' AttentionInterface (BERT-family "
            "encoders do so from transformers 5 on)"
        )
    return result


# --------------------------------------------------------------------------- adapters
def _projections(module: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    for q_name, k_name in PROJECTION_NAMES:
        q_proj, k_proj = getattr(module, q_name, None), getattr(module, k_name, None)
        if isinstance(q_proj, nn.Linear) and isinstance(k_proj, nn.Linear):
            return q_proj, k_proj
    raise ValueError(
        f"{type(module).__name__} has no q/k projections named {PROJECTION_NAMES}; q/k "
        "adapters cannot be folded into this model"
    )


def uses_rotary(model: nn.Module) -> bool:
    """Whether ``model``'s attention applies a rotary position embedding to q and k."""
    config = model.config
    if getattr(config, "position_embedding_type", None) == "rotary":
        return True
    return any(
        getattr(config, name, None) is not None for name in ("rope_parameters", "rope_theta")
    ) or any("rotary" in name for name, _ in model.named_modules())


class QKAdapter(nn.Module):
    """Per-head linear maps ``M`` on q and k of one layer: ``q -> q @ M_qᵀ`` (likewise k).

    ``kind="full"``: ``M = I + A``, ``A`` a free ``D x D`` matrix per head.
    ``kind="rotary"``: ``M`` rotates and scales each rotary pair ``(i, i + D/2)`` (the
    pairing of transformers' ``rotate_half``): ``2 x D/2`` numbers per head, the maps that
    commute with the rotary embedding. Both start at the identity.
    """

    def __init__(self, heads: int, kv_heads: int, dim: int, kind: str = "full") -> None:
        super().__init__()
        if kind not in ("full", "rotary"):
            raise ValueError(f"kind must be 'full' or 'rotary', got {kind!r}")
        if kind == "rotary" and dim % 2:
            raise ValueError(f"rotary adapters need an even head dim, got {dim}")
        self.kind, self.dim = kind, dim
        if kind == "full":
            self.q = nn.Parameter(torch.zeros(heads, dim, dim))
            self.k = nn.Parameter(torch.zeros(kv_heads, dim, dim))
        else:  # (log scale, angle) per head and frequency pair
            self.q = nn.Parameter(torch.zeros(heads, 2, dim // 2))
            self.k = nn.Parameter(torch.zeros(kv_heads, 2, dim // 2))

    def matrix(self, which: str) -> Tensor:
        """``M`` of shape ``(heads, D, D)`` for ``which`` in ("q", "k")."""
        p = self.q if which == "q" else self.k
        eye = torch.eye(self.dim, dtype=p.dtype, device=p.device)
        if self.kind == "full":
            return eye + p
        half = self.dim // 2
        scale, angle = p[:, 0].exp(), p[:, 1]
        cos, sin = scale * angle.cos(), scale * angle.sin()
        m = torch.zeros(p.shape[0], self.dim, self.dim, dtype=p.dtype, device=p.device)
        idx = torch.arange(half, device=p.device)
        m[:, idx, idx] = cos
        m[:, idx + half, idx + half] = cos
        m[:, idx, idx + half] = -sin
        m[:, idx + half, idx] = sin
        return m

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """Apply the maps to ``q (B, H, L, D)`` and ``k (B, H_kv, S, D)``."""
        mq, mk = self.matrix("q"), self.matrix("k")
        return (torch.einsum("bhld,hed->bhle", q, mq.to(q.dtype)),
                torch.einsum("bhld,hed->bhle", k, mk.to(k.dtype)))


@torch.no_grad()
def fold_adapters(model: nn.Module, adapters: dict[int, QKAdapter]) -> None:
    """Fold trained :class:`QKAdapter` s into the q/k projection weights (and biases).

    ``adapters`` maps ``layer_idx`` to its adapter. The projection of head ``h`` is rows
    ``h*D:(h+1)*D`` of the weight; it becomes ``M_h @ W_h`` (bias ``M_h @ b_h``).
    """
    for _, module in attention_modules(model):
        adapter = adapters.get(module.layer_idx)
        if adapter is None:
            continue
        for proj, which in zip(_projections(module), ("q", "k"), strict=True):
            m = adapter.matrix(which).to(torch.float64)
            heads, d = m.shape[0], m.shape[1]
            w = proj.weight.data.to(torch.float64).view(heads, d, -1)
            proj.weight.data.copy_((m @ w).reshape(proj.weight.shape))
            if proj.bias is not None:
                b = proj.bias.data.to(torch.float64).view(heads, d, 1)
                proj.bias.data.copy_((m @ b).reshape(proj.bias.shape))


# --------------------------------------------------------------------------- training
def _masked_mse(out: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
    """Mean squared error over real query positions of ``(B, L, H, D)`` tensors."""
    err = (out.float() - target.float()).square()
    if mask is None:
        return err.mean()
    w = mask[:, -out.shape[1]:, None, None].to(err.dtype)
    return (err * w).sum() / (w.sum() * out.shape[2] * out.shape[3]).clamp_min(1.0)


def layer_loss(
    fn, module: nn.Module, record: LayerRecord, adapter: QKAdapter | None = None
) -> Tensor:
    """MSE of the attention function ``fn`` (attention-interface signature) against the
    recorded softmax output of ``record``, applying ``adapter`` to q and k first."""
    device = next(module.parameters()).device
    q, k, v = record.q.to(device), record.k.to(device), record.v.to(device)
    mask = None if record.mask is None else record.mask.to(device)
    if adapter is not None:
        q, k = adapter(q, k)
    out, _ = fn(module, q, k, v, mask, scaling=record.scaling)
    return _masked_mse(out, record.teacher.to(device), mask)


def transfer(
    model: nn.Module,
    data: Capture,
    *,
    train: Sequence[str] | None = None,
    adapters: bool = False,
    steps: int = 100,
    lr: float = 0.05,
    adapter_lr: float = 0.01,
    progress: bool = True,
) -> dict[int, dict[str, float]]:
    """Train each layer's converted attention to match its recorded softmax output.

    Args:
        model: a model using ``attn_implementation`` "lln", "lln_diag" or a registered
            baseline ("lln_elu", ...), calibrated for the LLN family (:func:`lln.hf.calibrate`).
        data: the :func:`capture` of the original model on training text.
        train: names of :class:`lln.hf.LLNAttentionParams` parameters to train (default:
            :data:`DEFAULT_TRAIN` of the method; ``()`` for none, e.g. with baselines).
        adapters: also train per-head q/k adapters (:class:`QKAdapter`), folded into the
            q/k projections at the end.
        steps: optimizer steps per layer (cycling through the recorded batches).
        lr, adapter_lr: Adam learning rates of the LLN parameters and of the adapters.
        progress: show a tqdm bar over layers.

    Returns:
        ``{layer_idx: {"loss_before", "loss_after"}}``, the mean MSE over all recorded
        batches before and after training.
    """
    from transformers import AttentionInterface

    method = model.config._attn_implementation
    fn = AttentionInterface().get(method)
    if fn is None:
        raise ValueError(
            f"attn_implementation {method!r} is not registered; call lln.hf.register()"
        )
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    lln_family = method in DEFAULT_TRAIN
    names = tuple(DEFAULT_TRAIN.get(method, ())) if train is None else tuple(train)
    if names and not lln_family:
        raise ValueError(f"{method!r} has no LLN parameters; pass train=() (adapters only)")
    attached = attach(model) if lln_family else {}
    kind = "rotary" if uses_rotary(model) else "full"
    modules = [m for _, m in attention_modules(model) if m.layer_idx in data.records]
    report: dict[int, dict[str, float]] = {}
    trained: dict[int, QKAdapter] = {}
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    try:
        for module in tqdm(modules, desc="attention transfer", disable=not progress):
            records = data.records[module.layer_idx]
            groups = []
            if names:
                params = attached[next(n for n, m in attention_modules(model) if m is module)]
                chosen = [getattr(params, n) for n in names]
                for p in chosen:
                    p.requires_grad_(True)
                groups.append({"params": chosen, "lr": lr})
            adapter = None
            if adapters:
                first = records[0]
                adapter = QKAdapter(first.q.shape[1], first.k.shape[1], first.q.shape[3], kind)
                adapter = adapter.to(next(module.parameters()).device)
                groups.append({"params": list(adapter.parameters()), "lr": adapter_lr})
            before = _mean_loss(fn, module, records, adapter)
            if groups and steps:
                opt = torch.optim.Adam(groups)
                for step in range(steps):
                    loss = layer_loss(fn, module, records[step % len(records)], adapter)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"layer {module.layer_idx}: non-finite transfer loss at step {step}"
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            for group in groups:
                for p in group["params"]:
                    p.requires_grad_(False)
            after = _mean_loss(fn, module, records, adapter)
            report[module.layer_idx] = {"loss_before": before, "loss_after": after}
            if adapter is not None:
                trained[module.layer_idx] = adapter
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
    if trained:
        fold_adapters(model, trained)
    return report


@torch.no_grad()
def _mean_loss(fn, module: nn.Module, records: list[LayerRecord], adapter) -> float:
    losses = [float(layer_loss(fn, module, r, adapter)) for r in records]
    value = sum(losses) / len(losses)
    return value if math.isfinite(value) else float("nan")

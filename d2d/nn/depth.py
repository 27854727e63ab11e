"""Mixture-of-Depths (Raposo et al., 2024) retrofitted onto a dense decoder: the structure.

A routed block gets a scalar router r = w . x / rms(x) + b per token. The tokens it processes get
x + g(r) * (block(x) - x), with g(r) = 2 * sigmoid(r): only the block's update is scaled (the
block's own residual is not), and a router initialised to zero gives g = 1, so that inserting
routers changes nothing until they are trained. The other tokens pass the block unchanged.

Which tokens a routed block processes:
- "topk" (training, evaluation): per sequence, the k = ceil(capacity x real length) real tokens
  with the largest r (non-causal: it looks at the whole sequence). Padding is never chosen.
- "causal" (generation): a token is processed iff sigmoid(r) > 0.5, a decision that needs no
  later token, trained to agree with top-k membership (an auxiliary BCE loss); for a block
  trained with threshold routing, iff r exceeds the block's calibrated threshold.
- "threshold" (training with threshold routing): the tokens whose r reaches the batch's
  (1 - capacity) quantile over its real tokens; a running average of that quantile becomes the
  block's threshold, which the causal decision then uses, so training and generation route
  alike (MoDification's remedy for retrofits).
- "dense": every real token (the reference: top-k at capacity 1.0).
The first `sink` positions of a sequence are always processed and count towards k: a pretrained
decoder parks attention on its first token, and a block that loses it loses its footing.

What a routed block skips (`skip`):
- "block": the whole block (attention and MLP) for the tokens it does not take.
- "attention": only the attention sub-layer; every token still runs the MLP on the stream after
  it. A skipped token writes no KV entry in that block. Reported to keep quality where skipping
  whole blocks does not (attention in the upper half of a pretrained LLM is largely redundant).
- "mlp": only the MLP sub-layer; every token runs attention (and writes its KV entry) as usual.
The update of the part that is routed is scaled by g(r). "attention" and "mlp" need blocks of
the LLaMA layout (input_layernorm, self_attn, post_attention_layernorm, mlp).

`keep_kv` ("block" and "attention"): a skipped token still writes its key and value in the
block (the cheap k and v projections run for every token), so later tokens keep the whole
context there; it skips its query, its attention scores, the output projection (and, for
"block", the MLP). FlexiDepth (2503.23798) preserves the KV cache this way. The KV cache then
holds every token in every block: no placeholders, and batch decoding stays uniform.

Chosen tokens keep their original positions (their rotary embeddings are gathered, not
recomputed) and attend causally to the chosen tokens of the same block only. With a KV cache a
skipped token writes no entry in that block; where the rows of a batch decide differently, the
rows that skip write a placeholder entry that no query can see (a per-block validity mask kept
with the cache).

Supported: decoders whose blocks take (hidden_states, attention_mask, position_ids, cache,
position_embeddings) and whose attention reads `cache` by `layer_idx` (LLaMA, Mistral, Qwen2/3,
Gemma, OLMo, Granite: d2d's "gated" family).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from d2d import arch
from d2d.errors import D2DError
from d2d.nn.moe import RoutingContext
from d2d.nn.policy import DEPTH_MODES
from d2d.nn.structure import cache_name, install_context
from d2d.options import parse_layers

SKIPS = ("block", "attention", "mlp")
# the policy's modes, and the training mode of threshold routing
MODES = (*DEPTH_MODES, "threshold")
_LLAMA_LAYOUT = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


# what the share of (token, routed block) pairs processed counts, for each skip kind
RUN_LABEL = {"block": "blocks run", "attention": "attention run", "mlp": "MLPs run"}


def skip_text(skip: str, keep_kv: bool = False) -> str:
    """What a skipped token skips, in words: "the block", "attention (keys and values kept)"."""
    what = {"block": "the block", "attention": "attention", "mlp": "the MLP"}[skip]
    return what + (" (keys and values kept)" if keep_kv else "")


def skip_kind(model: nn.Module) -> tuple[str, bool] | None:
    """(skip, keep_kv) of the model's routed blocks, None without any."""
    blocks = mod_blocks(model)
    if not blocks:
        return None
    b = next(iter(blocks.values()))
    return b.skip, b.keep_kv


def _check_keep_kv(block: nn.Module, skip: str) -> None:
    """keep_kv computes the attention itself: LLaMA-style attention only (separate q, k, v, o
    projections, rotary embeddings of the rotate-half form, no sliding window or soft-capping)."""
    attn = getattr(block, "self_attn", None)
    ok = (
        skip in ("block", "attention")
        and attn is not None
        and all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))
        and all(hasattr(block, n) for n in _LLAMA_LAYOUT)
        and getattr(attn, "sliding_window", None) is None
        and getattr(getattr(attn, "config", None), "attn_logit_softcapping", None) is None
        and not hasattr(block, "pre_feedforward_layernorm")
    )
    if not ok:
        raise D2DError(
            f"--keep-kv needs --skip block or attention on LLaMA-style attention (q_proj, "
            f"k_proj, v_proj, o_proj, no sliding window), not --skip {skip} on "
            f"{type(block).__name__}: leave --keep-kv out"
        )


def _heads(attn: nn.Module, which: str, y: torch.Tensor, hd: int) -> torch.Tensor:
    """[B, T, H*hd] projections -> [B, H, T, hd], through the attention's per-head norm where
    it has one (q_norm / k_norm: Qwen3, OLMo2-style)."""
    b, t = y.shape[:2]
    y = y.view(b, t, -1, hd)
    norm = getattr(attn, f"{which}_norm", None)
    if norm is not None:
        y = norm(y)
    return y.transpose(1, 2)


def _rotate(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of [B, H, T, hd] with [B, T, hd] cos / sin."""
    cos, sin = cos[:, None].to(y.dtype), sin[:, None].to(y.dtype)
    h = y.shape[-1] // 2
    rot = torch.cat((-y[..., h:], y[..., :h]), dim=-1)
    return y * cos + rot * sin


def _bool_mask(mask, b: int) -> torch.Tensor | None:
    """The model's own 4-D attention mask as booleans (True: may attend), batch expanded to b;
    None where the model passed none (plain causal attention)."""
    if not (torch.is_tensor(mask) and mask.dim() == 4):
        return None
    m = mask.expand(b, -1, -1, -1)
    return m if m.dtype == torch.bool else m == 0


def _slots(choice: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, k] positions of each row's chosen tokens in their original order, and which slots
    are real: a row with fewer than k pads with placeholders (position 0, valid False)."""
    t = choice.shape[-1]
    ar = torch.arange(t, device=choice.device)
    idx = torch.sort(torch.where(choice, ar, t + ar), dim=-1).values[:, :k]
    valid = torch.arange(k, device=choice.device)[None, :] < choice.sum(-1)[:, None]
    return torch.where(valid, idx, torch.zeros_like(idx)), valid


def _taken(choice: torch.Tensor, forced: torch.Tensor | None, real: torch.Tensor) -> torch.Tensor:
    """The tokens a block processes: its choice plus the forced (sink) positions, real only."""
    return (choice if forced is None else choice | forced) & real


class MoDBlock(nn.Module):
    """A decoder block behind a Mixture-of-Depths router."""

    def __init__(
        self,
        block: nn.Module,
        d_model: int,
        capacity: float,
        context: RoutingContext,
        sink: int = 0,
        skip: str = "block",
        keep_kv: bool = False,
    ):
        super().__init__()
        if skip not in SKIPS:
            raise D2DError(f"skip must be one of {', '.join(SKIPS)}, got {skip!r}")
        if skip != "block" and (
            not all(hasattr(block, n) for n in _LLAMA_LAYOUT)
            or hasattr(block, "pre_feedforward_layernorm")
        ):
            raise D2DError(
                f"--skip {skip} needs decoder blocks of the LLaMA layout (input_layernorm, "
                f"self_attn, post_attention_layernorm, mlp), not {type(block).__name__}: "
                "use --skip block"
            )
        if keep_kv:
            _check_keep_kv(block, skip)
        self.sink, self.skip, self.keep_kv = sink, skip, keep_kv
        # compute only for the rows that take a token: skip "mlp", the chosen (row, token)
        # pairs; "block" and "attention" at a decoding step, the rows that take it, on their
        # rows of the KV cache (False: pad rows with placeholders; kept for the equivalence test)
        self.compact = True
        self.block = block
        # the keyword under which the block and its attention take the KV cache (read once:
        # inspecting a signature on every decoding step would cost more than the step's routing)
        self._cache_kw = cache_name(block)
        self._attn_cache_kw = cache_name(block.self_attn) if hasattr(block, "self_attn") else None
        self.router = nn.Linear(d_model, 1)
        nn.init.zeros_(self.router.weight)
        nn.init.zeros_(self.router.bias)
        self.capacity = capacity
        self.mode = "topk"
        self.context = context
        # the causal decision's own model ("mlp" predictor), else the router's sign decides
        self.predictor: nn.Module | None = None
        self.last_choice: torch.Tensor | None = None  # [B, T] bool, for statistics and losses
        self.last_logits: torch.Tensor | None = None  # [B, T] router logits
        self.last_causal: torch.Tensor | None = None  # [B, T] logits of the causal decision
        self.last_real: torch.Tensor | None = None  # [B, T] real (non-padding) tokens
        self.last_forced: torch.Tensor | None = None  # [B, T] sink positions, always taken

    @property
    def wrapped_block(self) -> nn.Module:  # what d2d.arch.blocks sees
        return self.block

    @property
    def layer_idx(self) -> int:
        return self.block.self_attn.layer_idx

    def add_predictor(self, hidden: int) -> None:
        """A small MLP that predicts top-k membership from the block's input (trained on
        stop-gradient inputs, so it does not change the model)."""
        d = self.router.in_features
        w = self.router.weight
        self.predictor = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 1)).to(
            device=w.device, dtype=w.dtype
        )

    def add_threshold(self) -> None:
        """Threshold routing: a running threshold on the router logit decides causally."""
        w = self.router.weight
        self.register_buffer("threshold", torch.zeros((), device=w.device, dtype=w.dtype))

    @property
    def thresholded(self) -> bool:
        return hasattr(self, "threshold")

    def router_macs(self) -> int:
        """Multiply-accumulates per token of the decision in the current mode (the router, and
        the MLP predictor where it decides)."""
        macs = self.router.in_features
        if self.mode == "causal" and self.predictor is not None:
            macs += sum(m.weight.numel() for m in self.predictor if isinstance(m, nn.Linear))
        return macs

    def choose(
        self,
        r: torch.Tensor,
        causal: torch.Tensor,
        real: torch.Tensor,
        forced: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Boolean [B, T]: the tokens this block processes (`forced`: the sink positions)."""
        if self.mode == "causal":
            choice = causal > 0  # sigmoid(logit) > 0.5
            return _taken(choice, forced, real)
        if self.mode == "dense":
            return real
        if self.mode == "threshold":
            if not self.thresholded:
                raise D2DError("threshold mode needs a block trained with threshold routing")
            return self._batch_threshold(r, real, forced)
        if forced is not None:
            r = r.masked_fill(forced, float("inf"))
        n_real = real.sum(-1)
        k = torch.minimum(torch.ceil(self.capacity * n_real.float()).long(), n_real)
        masked = r.masked_fill(~real, float("-inf"))
        order = masked.argsort(dim=-1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(r.shape[-1], device=r.device).expand_as(order))
        return (ranks < k[:, None]) & real

    THRESHOLD_MOMENTUM = 0.1  # weight of each training batch's quantile in the running one

    def _batch_quantile(self, r, real, forced) -> torch.Tensor | None:
        """The batch's (1 - capacity) quantile of r over its real, unforced tokens (None when
        there are none): what threshold routing trains with."""
        free = real if forced is None else real & ~forced
        if not bool(free.any()):
            return None
        return torch.quantile(r.detach()[free].float(), 1.0 - self.capacity).to(r.dtype)

    def _batch_threshold(self, r, real, forced) -> torch.Tensor:
        """Training with threshold routing: the tokens at or above the batch's (1 - capacity)
        quantile of r over its real, unforced tokens; the quantile updates the running
        threshold. Outside training the running threshold decides (as in causal mode)."""
        t = self._batch_quantile(r, real, forced) if self.training else None
        if t is not None:
            with torch.no_grad():  # (under autocast r is bf16, the running threshold is not)
                self.threshold.lerp_(t.to(self.threshold.dtype), self.THRESHOLD_MOMENTUM)
        else:
            t = self.threshold
        choice = r >= t
        return _taken(choice, forced, real)

    @torch.no_grad()
    def training_choice(self) -> torch.Tensor:
        """[B, T] what threshold routing in training would choose in the last forward (the
        batch quantile, without updating the running threshold)."""
        r, real, forced = self.last_logits, self.last_real, self.last_forced
        t = self._batch_quantile(r, real, forced)
        choice = torch.zeros_like(real) if t is None else r >= t
        return _taken(choice, forced, real)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        x = hidden_states
        b, t, _ = x.shape
        if cache is None:  # transformers before the KV cache's rename passes `past_key_values`
            cache = kwargs.pop("past_key_values", None)
        kw = {**kwargs, "use_cache": use_cache}
        if self.skip == "mlp":  # attention runs for every token, with the model's mask and cache
            x = x + self._attn(x, attention_mask, position_ids, position_embeddings, cache, kw)
        # the router reads the RMS-normalised stream: its logits do not grow with the stream's
        # scale (in SmolLM2-135M the RMS grows about 15-fold from block 1 to block 29)
        xn = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)
        r = self.router(xn).squeeze(-1)  # [B, T]
        tm = self.context.token_mask  # this forward's real tokens (set by a model pre-hook)
        real = (
            tm.bool()
            if tm is not None and tm.shape == (b, t)
            else torch.ones(b, t, dtype=torch.bool, device=x.device)
        )
        if self.thresholded:  # causal by construction: the logit against the threshold
            causal = r - self.threshold
        else:
            causal = r if self.predictor is None else self.predictor(xn.detach()).squeeze(-1)
        forced = None
        if self.sink and position_ids is not None:
            forced = position_ids.expand(b, -1) < self.sink
        choice = self.choose(r, causal, real, forced)
        self.last_choice, self.last_logits, self.last_forced = choice, r, forced
        self.last_causal, self.last_real = causal, real
        per_row = choice.sum(-1)
        k = int(per_row.max()) if b else 0
        every = k == t and bool(choice.all())
        if self.keep_kv and not every:
            return self._keep_kv(x, choice, r, k, attention_mask, position_embeddings, cache, kw)
        if k == 0:  # nothing to process: no work and no cache entry in this block
            return self._after(x)
        kv = self.skip != "mlp"  # whether the routed part writes this block's KV entries
        if every and (not kv or self.keep_kv or self._cache_whole(cache, t)):
            # every token (dense mode, capacity 1.0, or a decode step the block takes): the
            # routed part as it is, with the model's own mask; only its update is scaled (with
            # keep_kv every earlier token has its entry: the cache is always whole)
            if kv and not self.keep_kv:
                self._mask(cache, choice, x.dtype, build=False)
            upd = self._update(x, attention_mask, position_ids, position_embeddings, cache, kw)
            return self._after(x + 2.0 * torch.sigmoid(r)[:, :, None].to(x.dtype) * upd)
        if not kv and self.compact:
            # the MLP alone attends to nothing: run exactly the chosen (row, token) pairs, with
            # no placeholders for the rows of a batch that take fewer tokens
            rows, cols = choice.nonzero(as_tuple=True)
            hs = x[rows, cols]
            g = 2.0 * torch.sigmoid(r[rows, cols])[:, None].to(x.dtype)
            upd = g * self._update(hs, None, None, None, None, kw)
            return x.index_put((rows, cols), upd, accumulate=True)
        layer = self._rows_cache(cache) if kv and self.compact and t == 1 else None
        if layer is not None:
            return self._decode_rows(
                x, choice, r, position_ids, position_embeddings, cache, layer, kw
            )
        idx, valid = _slots(choice, k)
        gather = idx[:, :, None]
        xs = x.gather(1, gather.expand(-1, -1, x.shape[-1]))
        pe = pos = mask = None
        if kv:  # positions and a mask matter where the routed part attends
            cos, sin = position_embeddings
            cos = cos.expand(b, -1, -1).gather(1, gather.expand(-1, -1, cos.shape[-1]))
            sin = sin.expand(b, -1, -1).gather(1, gather.expand(-1, -1, sin.shape[-1]))
            pe = (cos, sin)
            pos = None if position_ids is None else position_ids.expand(b, -1).gather(1, idx)
            mask = self._mask(cache, valid, x.dtype)
        ups = self._update(xs, mask, pos, pe, cache, kw)
        g = 2.0 * torch.sigmoid(r.gather(1, idx))[:, :, None]
        upd = (g * ups) * valid[:, :, None].to(x.dtype)
        return self._after(x.scatter_add(1, gather.expand(-1, -1, x.shape[-1]), upd))

    def _keep_kv(self, x, choice, r, k, mask, pe, cache, kw) -> torch.Tensor:
        """Every token writes its key and value; the k chosen tokens of each row (placeholders
        where a row has fewer) compute their query, attend to every earlier key, and take the
        output projection (and, skipping whole blocks, the MLP)."""
        attn = self.block.self_attn
        b, t, d = x.shape
        hd = attn.head_dim
        cos, sin = pe
        hn = self.block.input_layernorm(x)
        keys = _heads(attn, "k", attn.k_proj(hn), hd)
        vals = attn.v_proj(hn).view(b, t, -1, hd).transpose(1, 2)
        keys = _rotate(keys, cos, sin)
        if cache is not None:
            keys, vals = cache.update(keys, vals, self.layer_idx)
        if k == 0:  # no query in this block: the keys and values are all it adds
            return self._after(x)
        if t == 1 and self.compact and b > 1:  # a decoding step: only the rows that take it
            rows = choice[:, 0].nonzero(as_tuple=True)[0]
            q = _rotate(
                _heads(attn, "q", attn.q_proj(hn[rows]), hd),
                *(c.expand(b, -1, -1)[rows] for c in (cos, sin)),
            )
            m = _bool_mask(mask, b)
            kr, vr = keys.index_select(0, rows), vals.index_select(0, rows)
            upd = self._attend(q, kr, vr, None if m is None else m[rows], x[rows])
            g = 2.0 * torch.sigmoid(r[rows])[:, :, None].to(x.dtype)
            return self._after(x.index_add(0, rows, g * upd))
        idx, valid = _slots(choice, k)
        gather = idx[:, :, None]
        q = attn.q_proj(hn.gather(1, gather.expand(-1, -1, d)))
        q = _heads(attn, "q", q, hd)
        cg = cos.expand(b, -1, -1).gather(1, gather.expand(-1, -1, cos.shape[-1]))
        sg = sin.expand(b, -1, -1).gather(1, gather.expand(-1, -1, sin.shape[-1]))
        q = _rotate(q, cg, sg)
        past = keys.shape[-2] - t  # cached entries before this forward's tokens
        m = _bool_mask(mask, b)
        if m is not None:  # the model's own (padding) mask, the chosen queries' rows
            allowed = m.gather(2, gather[:, None].expand(-1, m.shape[1], -1, m.shape[-1]))
        else:  # causal over positions: every key is a real token
            kpos = torch.arange(keys.shape[-2], device=x.device)
            allowed = (kpos[None, None, :] <= (past + idx)[:, :, None])[:, None]
        allowed = allowed | ~valid[:, None, :, None]  # placeholder queries: output dropped
        upd = self._attend(q, keys, vals, allowed, x.gather(1, gather.expand(-1, -1, d)))
        g = 2.0 * torch.sigmoid(r.gather(1, idx))[:, :, None].to(x.dtype)
        upd = (g * upd) * valid[:, :, None].to(x.dtype)
        return self._after(x.scatter_add(1, gather.expand(-1, -1, d), upd))

    def _attend(self, q, keys, vals, allowed, xs) -> torch.Tensor:
        """keep_kv's routed update of the chosen tokens `xs` [n, k, d] from their rotated
        queries: attention over `keys` / `vals` where `allowed`, the output projection, and for
        skip "block" the MLP on the stream after it."""
        attn = self.block.self_attn
        out = F.scaled_dot_product_attention(
            q, keys.to(q.dtype), vals.to(q.dtype), attn_mask=allowed, scale=attn.scaling,
            enable_gqa=q.shape[1] != keys.shape[1],
        )  # fmt: skip
        upd = attn.o_proj(out.transpose(1, 2).reshape(*xs.shape[:2], -1))
        if self.skip == "block":
            upd = upd + self.block.mlp(self.block.post_attention_layernorm(xs + upd))
        return upd

    def _rows_cache(self, cache):
        """This block's layer of a cache whose rows can be selected (a DynamicCache layer that
        holds entries), else None."""
        layers = getattr(cache, "layers", None)
        if layers is None or self.layer_idx >= len(layers):
            return None
        layer = layers[self.layer_idx]
        if not getattr(layer, "is_initialized", False) or not torch.is_tensor(layer.keys):
            return None
        return layer

    def _decode_rows(self, x, choice, r, position_ids, position_embeddings, cache, layer, kw):
        """A decoding step (one token per row) that some rows of the batch take: the routed
        part runs for those rows only, on their rows of this block's cache; the other rows get
        a zero placeholder entry, recorded invalid so that no query sees it."""
        b = x.shape[0]
        rows = choice[:, 0].nonzero(as_tuple=True)[0]
        mask = self._mask(cache, choice, x.dtype)  # records every row's validity
        full_k, full_v = layer.keys, layer.values
        layer.keys, layer.values = full_k.index_select(0, rows), full_v.index_select(0, rows)
        try:
            cos, sin = position_embeddings
            pe = tuple(t.index_select(0, rows) if t.shape[0] == b else t for t in (cos, sin))
            pos = None if position_ids is None else position_ids.expand(b, -1)[rows]
            upd = self._update(x[rows], None if mask is None else mask[rows], pos, pe, cache, kw)
            new_k, new_v = layer.keys[:, :, -1:], layer.values[:, :, -1:]
        finally:
            layer.keys, layer.values = full_k, full_v
        k_tok = full_k.new_zeros(b, *new_k.shape[1:]).index_copy_(0, rows, new_k)
        v_tok = full_v.new_zeros(b, *new_v.shape[1:]).index_copy_(0, rows, new_v)
        layer.keys = torch.cat([full_k, k_tok], dim=-2)
        layer.values = torch.cat([full_v, v_tok], dim=-2)
        g = 2.0 * torch.sigmoid(r[rows])[:, :, None].to(x.dtype)
        return self._after(x.index_add(0, rows, g * upd))

    def _update(self, h, mask, pos, pe, cache, kwargs: dict) -> torch.Tensor:
        """What the routed part adds to hidden states h: the whole block's update, the
        attention sub-layer's output, or the MLP sub-layer's."""
        if self.skip == "attention":
            return self._attn(h, mask, pos, pe, cache, kwargs)
        if self.skip == "mlp":
            return self.block.mlp(self.block.post_attention_layernorm(h))
        ys = self.block(
            h,
            attention_mask=mask,
            position_ids=pos,
            position_embeddings=pe,
            **{self._cache_kw: cache},
            **kwargs,
        )
        return (ys[0] if isinstance(ys, tuple) else ys) - h

    def _attn(self, h, mask, pos, pe, cache, kwargs: dict) -> torch.Tensor:
        """The block's attention sub-layer on h (pre-norm, no residual)."""
        out = self.block.self_attn(
            hidden_states=self.block.input_layernorm(h),
            attention_mask=mask,
            position_ids=pos,
            position_embeddings=pe,
            **{self._attn_cache_kw: cache},
            **kwargs,
        )
        return out[0] if isinstance(out, tuple) else out

    def _after(self, h) -> torch.Tensor:
        """What follows the routed part for every token: the MLP sub-layer when only attention
        is routed, else nothing."""
        if self.skip == "attention":
            return h + self.block.mlp(self.block.post_attention_layernorm(h))
        return h

    @property
    def _sdpa(self) -> bool:
        """The block's attention is PyTorch SDPA, which is causal by itself without a mask."""
        cfg = getattr(self.block.self_attn, "config", None)
        return getattr(cfg, "_attn_implementation", None) == "sdpa"

    def _cache_whole(self, cache, t: int) -> bool:
        """True when this block's cached keys are all real entries (no placeholder) and every
        earlier token wrote one, so the model's own causal mask is right for it."""
        if cache is None:
            return True
        past = cache.__dict__.get("_d2d_mod_valid", {}).get(self.layer_idx)
        seen = cache.get_seq_length(self.layer_idx)
        # block 0 is never routed and has cached this forward's tokens already
        if seen + t != cache.get_seq_length(0):
            return False
        return (past is None and seen == 0) or (
            past is not None and past.shape[1] == seen and bool(past.all())
        )

    def _mask(
        self, cache, valid: torch.Tensor, dtype: torch.dtype, build: bool = True
    ) -> torch.Tensor | None:
        """Additive [B, 1, k, past + k] mask: causal among this block's chosen tokens, blind to
        placeholders (and to this block's earlier placeholders in the cache). Records the
        entries' validity with the cache (build=False: only that)."""
        b, k = valid.shape
        past_valid = None
        if cache is not None:
            store = cache.__dict__.setdefault("_d2d_mod_valid", {})
            past_valid = store.get(self.layer_idx)
            store[self.layer_idx] = (
                valid if past_valid is None else torch.cat([past_valid, valid], 1)
            )
        if not build:
            return None
        keys_valid = valid if past_valid is None else torch.cat([past_valid, valid], 1)
        p = keys_valid.shape[1] - k
        if (p == 0 or k == 1) and self._sdpa and bool(keys_valid.all()):
            # plain causal attention over every key: no mask lets SDPA take its causal kernels
            return None
        causal = torch.ones(k, k, dtype=torch.bool, device=valid.device).tril()
        allowed = (
            torch.cat([torch.ones(k, p, dtype=torch.bool, device=valid.device), causal], dim=1)[
                None
            ]
            & keys_valid[:, None, :]
        )
        allowed = allowed | ~valid[:, :, None]  # placeholder queries: any row, output dropped
        neg = torch.finfo(dtype).min
        return torch.zeros(b, 1, k, p + k, dtype=dtype, device=valid.device).masked_fill(
            ~allowed[:, None], neg
        )


@torch.no_grad()
def fit_thresholds(
    model: nn.Module, batches: list[dict], capacity: float | None = None, passes: int = 2
) -> dict:
    """Set each threshold-routed block's threshold to the (1 - capacity) quantile of its router
    logits over the real, unforced tokens of `batches` (the causal decision then takes the
    capacity's share of such tokens there). A block's inputs depend on the blocks before it,
    so the fit is repeated `passes` times with the thresholds of the pass before.
    Returns {layer: threshold}."""
    out = {}
    for _ in range(passes):
        out = _fit_once(model, batches, capacity)
    return out


def _fit_once(model: nn.Module, batches: list[dict], capacity: float | None) -> dict:
    blocks = {i: b for i, b in mod_blocks(model).items() if b.thresholded}
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in blocks}
    handles = []
    for i, b in blocks.items():

        def hook(block, args, out, i=i):
            free = block.last_real
            if block.last_forced is not None:
                free = free & ~block.last_forced
            seen[i].append(block.last_logits[free].float().cpu())

        handles.append(b.register_forward_hook(hook))
    try:
        with depth_mode(model, "causal"):
            for batch in batches:
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for i, b in blocks.items():
        r = torch.cat(seen[i]) if seen[i] else torch.zeros(0)
        if r.numel():
            c = b.capacity if capacity is None else capacity
            t = float(torch.quantile(r[: 2**20], 1.0 - c))
            b.threshold.fill_(t)
            out[i] = t
    return out


def routed_layers(n_layers: int, every: int, layers: str | None) -> list[int]:
    """Default: every other block, starting with the second (the first block stays dense)."""
    if layers:
        return parse_layers(layers, n_layers)
    if every < 1:
        raise D2DError(f"every must be >= 1, got {every}")
    return [i for i in range(n_layers) if i % every == every - 1]


def insert_mod(
    model: nn.Module,
    layers: list[int],
    capacity: float,
    sink: int = 0,
    skip: str = "block",
    keep_kv: bool = False,
) -> dict[int, MoDBlock]:
    """Put a router in front of the given decoder blocks (structure only; routers start at 0)."""
    if not 0.0 < capacity <= 1.0:
        raise D2DError(f"capacity must be in (0, 1], got {capacity}")
    if 0 in layers:  # the model-level causal mask follows block 0's cache: keep it dense
        raise D2DError("block 0 cannot be routed: route later blocks (the default: every other)")
    fam = arch.detect(model)
    if fam.name != "gated":
        raise D2DError(
            f"Mixture-of-Depths supports LLaMA-like decoders (the gated family), not {fam.name}"
        )
    parent = arch.block_list(model, fam)
    d = model.config.hidden_size
    ctx = install_context(model)
    out = {}
    for i in layers:
        if isinstance(parent[i], MoDBlock):
            raise D2DError(f"block {i} already has a Mixture-of-Depths router")
        w = next(parent[i].parameters())
        block = MoDBlock(parent[i], d, capacity, ctx, sink, skip, keep_kv)
        parent[i] = block.to(device=w.device, dtype=w.dtype)
        out[i] = parent[i]
    return out


def mod_blocks(model: nn.Module) -> dict[int, MoDBlock]:
    parent = arch.block_list(model, arch.detect(model))
    return {i: m for i, m in enumerate(parent) if isinstance(m, MoDBlock)}


def set_mode(model: nn.Module, mode: str, capacity: float | None = None) -> None:
    if mode not in MODES:
        raise D2DError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    for m in mod_blocks(model).values():
        m.mode = mode
        if capacity is not None:
            m.capacity = capacity


@contextmanager
def depth_mode(model: nn.Module, mode: str | None, capacity: float | None = None):
    """Route the blocks with `mode` (and `capacity`) during the block, then restore."""
    blocks = mod_blocks(model)
    saved = {i: (b.mode, b.capacity) for i, b in blocks.items()}
    try:
        if mode is not None:
            set_mode(model, mode, capacity)
        yield
    finally:
        for i, b in blocks.items():
            b.mode, b.capacity = saved[i]


@contextmanager
def mod_stats(model: nn.Module):
    """Per routed block during the block: real tokens, processed tokens, and how often the
    causal decision agrees with top-k membership at the block's capacity ("agree", measured
    under top-k) and, for blocks trained with threshold routing, with the routing they trained
    with: the batch's (1 - capacity) quantile of the router logit ("agree_train", measured under
    the causal decision). Yields {layer: counts}."""
    blocks = mod_blocks(model)
    stats = {i: {"real": 0, "chosen": 0, "agree": 0, "agree_train": 0} for i in blocks}
    handles = []
    for i, b in blocks.items():

        def hook(block: MoDBlock, args, out, i=i):
            real, s = block.last_real, stats[i]
            s["real"] += int(real.sum())
            s["chosen"] += int(block.last_choice.sum())
            if block.mode == "topk":  # the causal decision against the choice it imitates
                s["agree"] += int((((block.last_causal > 0) == block.last_choice) & real).sum())
            else:
                s["agree"] = None
            # (a batch quantile needs whole sequences: decoding steps leave it unmeasured)
            whole = block.last_real.shape[-1] > 1
            if (
                block.mode == "causal"
                and block.thresholded
                and whole
                and s["agree_train"] is not None
            ):
                trained = block.training_choice()
                s["agree_train"] += int(((trained == block.last_choice) & real).sum())
            else:
                s["agree_train"] = None

        handles.append(b.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def processed(stats: dict) -> dict[int, float]:
    """Per routed block: the share of real tokens it processed (from mod_stats counts)."""
    return {i: s["chosen"] / max(s["real"], 1) for i, s in stats.items()}


def summarise(stats: dict, n_layers: int) -> dict:
    """Processed fractions (per routed block, of the routed blocks, of all blocks), the causal
    decision's agreement with top-k (None unless measured under top-k) and, for blocks trained
    with threshold routing, with that routing (None unless measured under the causal
    decision)."""
    real = sum(s["real"] for s in stats.values())
    chosen = sum(s["chosen"] for s in stats.values())
    routed = chosen / real if real else float("nan")
    k = len(stats)
    agree = [s["agree"] for s in stats.values()]
    train = [s.get("agree_train") for s in stats.values()]
    return {
        "processed": {str(i): f for i, f in processed(stats).items()},
        "routed_block_fraction": routed,
        "block_fraction": (n_layers - k + k * routed) / n_layers,
        "predictor_accuracy": sum(agree) / real if real and None not in agree else None,
        # the causal decision of threshold-trained blocks against their training routing
        "training_agreement": sum(train) / real if real and None not in train else None,
    }

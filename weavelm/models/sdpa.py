"""Attention over a step's own and cached keys with torch's fused kernels (SDPA, flash, cuDNN):
the prefill pieces of `models/attention.py`.

T = tokens, H / Hkv = query / KV heads, Dh = head dim. Grouped-query heads are read in place
where the kernel allows it; a piece that continues its sequence attends its earlier keys and its
own in two fast calls merged by log-sum-exp (`_continuation_attention`); on GPUs all the
pieces of a step longer than a token, fresh or continuing, go to one varlen flash call a layer
(`varlen_layout`, `varlen_flash`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from weavelm.models.host_inputs import host_to_device


def _sdpa(q, k, v, **kwargs):
    """SDPA with grouped-query heads. On CUDA the flash kernel reads grouped KV heads in place
    where it applies (half precision, no mask); otherwise the KV heads are expanded so the
    flash or cuDNN kernel always applies (GQA support varies by backend and torch version); the
    CPU kernels take enable_gqa directly."""
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        if _plan_free(q, k) and "attn_mask" not in kwargs and _flash_gqa(q, k):
            try:
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
            except RuntimeError:         # no flash kernel on this GPU: not tried again
                _FLASH_GQA[0] = False
        if k.shape[-3] != q.shape[-3]:
            k, v = _expand_kv(q, k, v)
        if _plan_free(q, k):
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                              SDPBackend.MATH]):
                return F.scaled_dot_product_attention(q, k, v, **kwargs)
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)


_FLASH_GQA = [True]


def _flash_gqa(q, k) -> bool:
    """The flash kernel reads a group of query heads' shared KV head in place (no copy of the
    keys and values expanded to every query head; copies were 8.5 of 206 ms of a mixed serving
    step's GPU time on an H200, benchmarks/HISTORY.md): half precision, head dim up to 256."""
    return _FLASH_GQA[0] and q.dtype in (torch.float16, torch.bfloat16) \
        and q.shape[-1] <= 256 and q.shape[-3] % k.shape[-3] == 0


def _plan_free(q, k) -> bool:
    """Shapes that should not go to cuDNN: it builds an execution plan for every new shape
    (tens of ms of host time, then cached), so the arbitrary prompt and chunk lengths of a
    serving engine would each pay one. Lengths that are multiples of PLAN_ROWS recur (fixed
    prefill sizes, full chunks) and keep cuDNN, the fastest kernel on Hopper."""
    return q.shape[-2] % PLAN_ROWS != 0 or k.shape[-2] % PLAN_ROWS != 0


PLAN_ROWS = 128


def _expand_kv(q, k, v):
    reps = q.shape[-3] // k.shape[-3]
    if reps == 1:
        return k, v
    return k.repeat_interleave(reps, dim=-3), v.repeat_interleave(reps, dim=-3)


# Private SDPA ops that also return the log-sum-exp of each query's scores, fastest first. A
# backend that raises once (unsupported GPU, dtype or shape) is not tried again.
_LSE_BACKENDS = ["cudnn", "flash"]


def _sdpa_lse(q, k, v, causal: bool, scale: float):
    """(out [1, H, n, Dh], lse [1, H, n, 1] fp32) on CUDA, or None if no backend applies.
    Half precision only: both kernels are fp16/bf16 kernels. An fp32 call is not refused by
    every torch version: a GPU fp32 engine test sampled token 0 (NaN logits) after every
    continuing chunk until fp32 was kept off them."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        return None
    order = sorted(_LSE_BACKENDS, key=lambda n: n != "flash") if _plan_free(q, k) \
        else list(_LSE_BACKENDS)
    expanded = None
    for name in order:
        try:
            if name == "flash" and _flash_gqa(q, k):      # grouped heads read in place
                kk, vv = k, v
            else:
                expanded = expanded or _expand_kv(q, k, v)
                kk, vv = expanded
            if name == "cudnn":
                r = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    q, kk, vv, None, True, 0.0, causal, False, scale=scale)
            else:
                r = torch.ops.aten._scaled_dot_product_flash_attention(
                    q, kk, vv, 0.0, causal, False, scale=scale)
        except (RuntimeError, AttributeError, NotImplementedError):
            _LSE_BACKENDS.remove(name)
            continue
        n = q.shape[-2]
        lse = r[1].reshape(q.shape[0], q.shape[1], -1)[..., :n].unsqueeze(-1).float()
        return r[0], lse
    return None


def causal_lower_right(num_queries: int, num_keys: int):
    """torch's lower-right causal mask, imported on first use: `torch.nn.attention.bias` pulls
    in torch._dynamo (~1 s), which `from weavelm import LLM` must not pay."""
    from torch.nn.attention.bias import causal_lower_right as mask
    return mask(num_queries, num_keys)


def _continuation_attention(qs, keys, values, start: int, scale: float):
    """Exact causal attention of a piece that continues its sequence: queries are positions
    [start, end) and see keys [0, end) up to their own position. Computed as two calls of the
    fast attention kernels - all earlier keys (no mask) and the piece's own keys (square causal)
    - merged by their log-sum-exps: softmax over the union = sigmoid(lse1 - lse2) blend. A single
    call with a lower-right causal mask falls to a slower kernel on H100 (FA2 instead of cuDNN;
    benchmarks/HISTORY.md, round 3)."""
    if not qs.is_cuda or qs.shape[-2] == 1:
        if qs.shape[-2] == 1:                 # one query sees every key: no mask at all
            return _sdpa(qs, keys, values, scale=scale)
        return _sdpa(qs, keys, values, scale=scale,
                     attn_mask=causal_lower_right(qs.shape[-2], keys.shape[-2]))
    earlier = _sdpa_lse(qs, keys[..., :start, :], values[..., :start, :], False, scale)
    own = _sdpa_lse(qs, keys[..., start:, :], values[..., start:, :], True, scale) \
        if earlier is not None else None
    if own is None:
        return _sdpa(qs, keys, values, scale=scale,
                     attn_mask=causal_lower_right(qs.shape[-2], keys.shape[-2]))
    return merge_by_lse(*earlier, *own)


def merge_by_lse(o1, lse1, o2, lse2):
    """Attention over the union of two disjoint key sets, from each set's output and per-query
    log-sum-exp of scaled scores ([..., n, Dh] and [..., n, 1]): the weights are e^lse1 and
    e^lse2, so o = o2 + (o1 - o2) * sigmoid(lse1 - lse2). One lerp in the outputs' dtype (it
    computes in fp32 inside; fp32 copies of the outputs cost more than the attention saved)."""
    w = torch.sigmoid(lse1.float() - lse2.float())
    return torch.lerp(o2, o1, w.to(o2.dtype))


# Keys one varlen call gathers at most (its pieces' whole histories, K and V, every layer
# again): a step's pieces are cut into calls of at most this many keys (one piece with more
# goes alone), so long contexts do not gather gigabytes at once (Llama-3-8B, 8 KV heads a
# rank: 512 MiB).
VARLEN_MAX_KEYS = 1 << 17


def varlen_layout(pieces, table: np.ndarray, block_size: int, device,
                  max_keys: int = VARLEN_MAX_KEYS) -> list:
    """For the pieces of a step longer than one token (fresh prompts, later chunks, prompts
    after a cached prefix): a list of calls, each (its tokens' indices in the step [Tq], the
    cache rows of each piece's keys 0 .. end - 1 [Tk] -- None where every piece of the call is
    fresh: its keys are then the step's own at the tokens' indices --, cu_q, cu_k (int32
    [n + 1]: piece i's queries and keys in the packed runs), the longest piece, the most keys,
    the pieces' offsets), at most `max_keys` keys a call; [] where there are none. `table`:
    the step's block tables on the host (row p.row: piece p's sequence)."""
    conts = [p for p in pieces if p.length > 1]
    calls, batch, keys = [], [], 0
    for p in conts:
        end = p.start_pos + p.length
        if batch and keys + end > max_keys:
            calls.append(_layout(batch, table, block_size, device))
            batch, keys = [], 0
        batch.append(p)
        keys += end
    if batch:
        calls.append(_layout(batch, table, block_size, device))
    return calls


def _layout(conts, table: np.ndarray, block_size: int, device) -> tuple:
    n = np.array([p.length for p in conts], dtype=np.int64)
    ends = np.array([p.start_pos + p.length for p in conts], dtype=np.int64)
    offsets = np.array([p.offset for p in conts], dtype=np.int64)
    rows = np.array([p.row for p in conts], dtype=np.int64)
    tokens = np.arange(n.sum()) + np.repeat(offsets - (np.cumsum(n) - n), n)
    slots = None
    if (ends > n).any():                   # some keys are in the cache only: gather them all
        pos = np.arange(ends.sum()) - np.repeat(np.cumsum(ends) - ends, ends)
        slots = host_to_device(table[np.repeat(rows, ends), pos // block_size]
                               .astype(np.int64) * block_size + pos % block_size, device)
    cu_q = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(ends)]).astype(np.int32)
    return (host_to_device(tokens, device), slots,
            host_to_device(cu_q, device), host_to_device(cu_k, device), int(n.max()),
            int(ends.max()), tuple(offsets.tolist()))


_VARLEN = [True]


def varlen_flash(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float):
    """Causal attention of packed pieces (q [Tq, H, Dh], k / v [Tk, Hkv, Dh]; piece i's queries
    are the last of its keys: query j of a piece of n queries and m keys sees keys up to
    m - n + j) in one flash call; None where it does not apply (CPU, fp32, a GPU or torch
    without the kernel: not tried again)."""
    if not (_VARLEN[0] and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256 and q.shape[1] % k.shape[1] == 0):
        return None
    try:
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0,
                                                       True, False, scale=scale)[0]
    except (RuntimeError, AttributeError, NotImplementedError):
        _VARLEN[0] = False
        return None


def varlen_reference(q, k, v, cu_q, cu_k, scale: float):
    """varlen_flash's contract in plain SDPA, one piece at a time (tests)."""
    out = torch.empty_like(q)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        qs = q[cq[i]:cq[i + 1]].transpose(0, 1).unsqueeze(0)
        ks = k[ck[i]:ck[i + 1]].transpose(0, 1).unsqueeze(0)
        vs = v[ck[i]:ck[i + 1]].transpose(0, 1).unsqueeze(0)
        ks, vs = _expand_kv(qs, ks, vs)
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale,
                                           attn_mask=causal_lower_right(qs.shape[-2],
                                                                        ks.shape[-2]))
        out[cq[i]:cq[i + 1]] = o[0].transpose(0, 1)
    return out

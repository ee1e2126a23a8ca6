"""A step's draws from its sequences' hidden states: the LM head and the draw, a chunk of rows at a time.

At paper scale a decode step has tens of thousands of live branches. Their logits over a real
vocabulary would not fit even a large GPU at once (32,768 x 151,936 fp32 logits are 20 GB, the
draw's fp64 CDF twice that), so the head and the draw run on chunks of rows sized to a memory
budget. Every chunk's results stay on the device and come back in one copy: the step's only
host-device synchronisation.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch

from treerpo.engine.sampling import SamplingParams, draw, draw_bytes_per_logit, raise_nonfinite

DEFAULT_DRAW_MEMORY_BYTES = 1 << 30


def use_fused_draw(device: torch.device, params: SamplingParams, width: int) -> bool:
    """The fused Triton draw (``kernels/draw.py``) on CUDA, for untruncated and greedy sampling of at most
    ``MAX_DRAWS`` draws a row; PyTorch's elsewhere."""
    if device.type != "cuda" or truncated(params) or not fused_draw_works(device):
        return False  # (triton, which the kernel needs, is imported only on CUDA: an environment may lack it)
    from treerpo.kernels.draw import MAX_DRAWS

    return width <= MAX_DRAWS


@functools.cache
def fused_draw_works(device: torch.device) -> bool:
    """The fused draw's first-use check on ``device``: it compiles and draws PyTorch's tokens and log-probs on a small
    case (three blocks of a vocabulary, sampled and greedy); else PyTorch's draw from now on, with one warning."""
    try:
        from treerpo.kernels.draw import BLOCK, fused_draw, result_columns
    except ImportError as error:
        warnings.warn(f"the fused draw is not used on {device}: {error}")
        return False
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 3 * BLOCK - 5, generator=gen) * 3).to(device)
    u = torch.rand(4, 3, generator=gen, dtype=torch.float64).to(device)
    try:
        for temperature in (0.7, 0.0):
            out = torch.empty(4, result_columns(3), dtype=torch.float64, device=device)
            fused_draw(logits, u, temperature, True, out)
            tokens, logprobs, _, entropies = draw(logits, SamplingParams(temperature=temperature), u, True)
            agree = torch.equal(out[:, :3].long(), tokens) and torch.allclose(out[:, 3:6].float(), logprobs, atol=1e-4)
            if not (agree and torch.allclose(out[:, 7].float(), entropies, atol=1e-4)):
                raise ValueError(f"its draws at temperature {temperature} differ from PyTorch's")
    except Exception as error:  # a GPU or Triton build that cannot compile it
        warnings.warn(f"the fused draw is not used on {device}: {type(error).__name__}: {error}")
        return False
    return True


def truncated(params: SamplingParams) -> bool:
    return params.temperature != 0 and bool(params.top_k or params.top_p < 1.0)


def rows_per_chunk(vocab: int, memory_bytes: int, bytes_per_logit: int) -> int:
    """Rows whose logits and draw buffers fit ``memory_bytes`` (at least one)."""
    return max(1, int(memory_bytes) // (vocab * bytes_per_logit))


@torch.no_grad()
def draw_step(
    head,
    hidden: torch.Tensor,
    rows: np.ndarray | None,
    u: np.ndarray | None,
    width: int,
    params: SamplingParams,
    entropy: bool,
    memory_bytes: int = DEFAULT_DRAW_MEMORY_BYTES,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Tokens and log-probs [R, width] on the host (and each row's next-token entropy with ``entropy``): draw r
    reads the logits ``head.logits(hidden[rows[r]])`` (``rows`` None: every row of ``hidden`` in order, a decode
    step's, with no index) and the uniforms ``u[r]`` (torch's global RNG when ``u`` is None). Raises
    ``NonFiniteError`` when some logit is NaN or +inf."""
    device = hidden.device
    count = len(hidden) if rows is None else len(rows)
    index = None if rows is None else _to_device(rows, device)
    if u is None:
        u_dev = torch.rand((count, width), dtype=torch.float64, device=device)
    else:
        u_dev = _to_device(u, device)
    if use_fused_draw(device, params, width):
        return _fused_draw_step(head, hidden, index, u_dev, width, params, entropy, memory_bytes)
    step = rows_per_chunk(head.weight.shape[0], memory_bytes, draw_bytes_per_logit(params, entropy))
    parts = []
    for start in range(0, count, step):
        chunk = hidden[start : start + step] if index is None else hidden.index_select(0, index[start : start + step])
        parts.append(draw(head.logits(chunk), params, u_dev[start : start + step], entropy))
    if not parts:
        empty = np.zeros((0, width))
        return empty.astype(np.int64), empty, np.zeros(0) if entropy else None
    tokens = torch.cat([p[0] for p in parts])
    logprobs = torch.cat([p[1] for p in parts])
    bad = torch.stack([p[2] for p in parts]).any()
    columns = [tokens.double().reshape(-1), logprobs.double().reshape(-1), bad.double()[None]]
    if entropy:
        columns.append(torch.cat([p[3] for p in parts]).double())
    host = torch.cat(columns).cpu()
    n = tokens.numel()
    if host[2 * n]:
        raise_nonfinite()
    return (
        host[:n].long().numpy().reshape(tokens.shape),
        host[n : 2 * n].numpy().reshape(tokens.shape),
        host[2 * n + 1 :].numpy() if entropy else None,
    )


def _fused_draw_step(head, hidden, index, u_dev, width: int, params: SamplingParams, entropy: bool, memory_bytes):
    """``draw_step`` with the fused draw: a chunk's fp32 logits are the only [rows, vocab] buffer, and every row's
    results land in one fp64 buffer that reaches the host in one copy."""
    from treerpo.kernels.draw import fused_draw, result_columns

    count = len(u_dev)
    out = torch.empty((count, result_columns(width)), dtype=torch.float64, device=hidden.device)
    step = rows_per_chunk(head.weight.shape[0], memory_bytes, FUSED_DRAW_BYTES_PER_LOGIT)
    for start in range(0, count, step):
        chunk = hidden[start : start + step] if index is None else hidden.index_select(0, index[start : start + step])
        logits = head.logits(chunk).contiguous()
        fused_draw(logits, u_dev[start : start + step], params.temperature, entropy, out[start : start + step])
    host = out.cpu().numpy()
    if host[:, 2 * width].any():
        raise_nonfinite()
    return host[:, :width].astype(np.int64), host[:, width : 2 * width], host[:, 2 * width + 1] if entropy else None


FUSED_DRAW_BYTES_PER_LOGIT = 4  # the chunk's fp32 logits; the kernel keeps nothing else a logit


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device`` without waiting for the queued forward: on CUDA through pinned memory (a copy
    from pageable memory would synchronise), on the CPU as it is."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)

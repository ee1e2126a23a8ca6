"""Binary math reward: last boxed answer checked against a gold answer by math-verify.

math-verify's own timeouts use ``signal.alarm`` (main thread only), so every
parse/verify runs with its timeouts disabled in a persistent worker process; the
parent bounds each answer with a deadline and replaces a worker that overruns.
"""
from __future__ import annotations

import multiprocessing as mp
import re
import signal
import threading
import time
from collections import deque
from multiprocessing.connection import wait as _wait_conns

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ENOTATION_RE = re.compile(r"(?<![\w.\\])(\d+(?:\.\d+)?)[eE]([+-]?\d+)(?![\w.])")
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+")
_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_READY = "ready"


def _closing_brace(text: str, open_pos: int) -> int | None:
    """Index of the ``}`` matching the ``{`` at ``open_pos`` (escaped braces ignored)."""
    depth, i = 0, open_pos
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last top-level ``\\boxed{...}``/``\\fbox{...}``; None if none
    (or if the last one is unbalanced, e.g. a truncated completion)."""
    result, pos = None, 0
    for m in _BOX_RE.finditer(text):
        if m.start() < pos:
            continue  # nested inside the previous box
        end = _closing_brace(text, m.end() - 1)
        if end is None:
            return None
        result, pos = text[m.end():end], end + 1
    return result


def _e_to_latex(m: re.Match) -> str:
    return f"{m.group(1)} \\times 10^{{{int(m.group(2))}}}"


def normalize_answer(text: str) -> str:
    """Rewrite e-notation as LaTeX powers of ten, drop thousands separators of a
    plain number, and drop unbalanced ``$`` signs (e.g. ``$221,$8$``)."""
    g = _ENOTATION_RE.sub(_e_to_latex, str(text).strip())
    if _THOUSANDS_RE.fullmatch(g):
        g = g.replace(",", "")
    if len(_DOLLAR_RE.findall(g)) % 2:
        g = _DOLLAR_RE.sub("", g).strip()
    return g


def prepare_gold(gold: str) -> str:
    """Normalize a gold answer for ``math_verify.parse`` and wrap it in ``$...$``."""
    g = normalize_answer(gold)
    wrapped = len(g) >= 2 and g.startswith("$") and g.endswith("$")
    if wrapped or "\\boxed" in g or "\\fbox" in g:
        return g
    return f"${g}$"


def _worker_main(conn) -> None:
    """Worker loop: receive (gold, pred), send back 1.0/0.0; ``None`` stops it."""
    import functools
    import logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import parse, verify

    parse_gold = functools.lru_cache(maxsize=4096)(lambda s: parse(s, parsing_timeout=None))
    conn.send(_READY)
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        if item is None:
            return
        try:
            gold, pred = item
            ok = verify(parse_gold(gold), parse(pred, parsing_timeout=None), timeout_seconds=None)
            score = 1.0 if ok else 0.0
        except Exception:
            score = 0.0
        conn.send(score)


class _Worker:
    """One verifier process and its pipe; waits for the worker's import lazily."""

    def __init__(self, ctx, startup_timeout: float):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True,
                                name="math-verify-worker")
        self.proc.start()
        child.close()
        self.ready, self.startup_timeout = False, startup_timeout

    def submit(self, gold: str, pred: str) -> None:
        if not self.ready:
            try:
                ok = self.conn.poll(self.startup_timeout) and self.conn.recv() == _READY
            except (EOFError, OSError):
                ok = False
            if not ok:
                self.kill()
                raise RuntimeError(
                    "math-verify worker failed to start (see its stderr). It uses the 'spawn' "
                    "start method: the main script must be a file guarded by "
                    "`if __name__ == '__main__':`.")
            self.ready = True
        self.conn.send((gold, pred))

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.proc.join(1)
        except (OSError, ValueError):
            pass
        self.kill()


class MathVerifyReward:
    """1.0 if a completion's last boxed answer equals the gold answer, else 0.0.

    Each answer gets ``deadline_s`` seconds of verifier time; on overrun it scores
    0.0 and its worker is replaced. Safe to call from any thread (calls are
    serialized). Workers use the "spawn" context: scripts need a main guard.
    """

    def __init__(self, deadline_s: float = 5.0, workers: int = 1,
                 startup_timeout_s: float = 120.0):
        if deadline_s <= 0 or workers < 1:
            raise ValueError("deadline_s must be > 0 and workers >= 1")
        self.deadline_s, self.startup_timeout_s = float(deadline_s), startup_timeout_s
        self._ctx = mp.get_context("spawn")
        self._slots: list[_Worker | None] = [None] * workers
        self._lock = threading.Lock()

    def _worker(self, slot: int) -> _Worker:
        w = self._slots[slot]
        if w is None or not w.proc.is_alive():
            if w is not None:
                w.kill()
            w = self._slots[slot] = _Worker(self._ctx, self.startup_timeout_s)
        return w

    def _replace(self, slot: int) -> None:
        self._slots[slot].kill()
        self._slots[slot] = _Worker(self._ctx, self.startup_timeout_s)  # warms up meanwhile

    def __call__(self, completions: list[str], golds: list[str]) -> list[float]:
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        scores = [0.0] * len(completions)
        jobs = deque()
        for i, (text, gold) in enumerate(zip(completions, golds)):
            pred = extract_boxed(text or "")
            if pred is not None and pred.strip():
                jobs.append((i, prepare_gold(gold), f"${normalize_answer(pred)}$"))
        if jobs:
            with self._lock:
                self._run(jobs, scores)
        return scores

    def _run(self, jobs: deque, scores: list[float]) -> None:
        busy: dict[int, tuple[int, float]] = {}  # slot -> (item index, deadline)
        while jobs or busy:
            for slot in range(len(self._slots)):
                if jobs and slot not in busy:
                    i, gold, pred = jobs.popleft()
                    self._worker(slot).submit(gold, pred)
                    busy[slot] = (i, time.monotonic() + self.deadline_s)
            timeout = max(0.0, min(d for _, d in busy.values()) - time.monotonic())
            ready = _wait_conns([self._slots[s].conn for s in busy], timeout)
            for slot, (i, deadline) in list(busy.items()):
                w = self._slots[slot]
                if w.conn in ready:
                    try:
                        scores[i] = float(w.conn.recv())
                    except (EOFError, OSError):  # worker crashed on this item
                        self._replace(slot)
                    del busy[slot]
                elif time.monotonic() >= deadline:
                    self._replace(slot)
                    del busy[slot]

    def close(self) -> None:
        """Stop the worker processes."""
        for slot, w in enumerate(self._slots):
            if w is not None:
                w.stop()
                self._slots[slot] = None

    def __enter__(self) -> "MathVerifyReward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

"""Binary math reward: last boxed answer checked against a gold answer by math-verify.

math-verify's own timeouts use ``signal.alarm`` (main thread only), so every
parse/verify runs with its timeouts disabled in a pool of persistent worker processes;
the parent bounds each answer with a deadline and kills a worker that overruns, and
warm spare workers keep the queue moving meanwhile.
"""

from __future__ import annotations

import multiprocessing as mp
import os
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
_PARENT_SIGNALS = {signal.SIGINT, signal.SIGTERM}
WORKER_NAME = "math-verify-worker"
_STALL_S = 0.5  # a worker busy this long on one answer lets a spare take the next one


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
        result, pos = text[m.end() : end], end + 1
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

    for signum in _PARENT_SIGNALS:  # the parent decides when to stop; then it closes or kills us
        signal.signal(signum, signal.SIG_IGN)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    from math_verify import parse, verify

    parse_gold = functools.lru_cache(maxsize=4096)(lambda s: parse(s, parsing_timeout=None))
    # the first verify loads more (0.2 s): keep that off an answer's deadline
    verify(parse_gold("$1$"), parse_gold("$1$"), timeout_seconds=None)
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
    """One verifier process, its pipe, and the answer it is verifying (if any)."""

    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name=WORKER_NAME)
        self.proc.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False
        self.job: tuple[int, float] | None = None  # (answer index, time it was sent)

    def submit(self, index: int, gold: str, pred: str) -> None:
        self.job = (index, time.monotonic())
        try:
            self.conn.send((gold, pred))
        except OSError:
            pass  # the process just died: the pool reads EOF and the answer scores 0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def _stopped_by_parent_signal(w: _Worker) -> bool:
    w.proc.join(1)
    return w.proc.exitcode in {-s for s in _PARENT_SIGNALS}


class _WorkerPool:
    """Up to ``workers`` answers verified at once by a set of at most ``workers + spares``
    processes; the processes not in use are warm spares.

    A process busy for ``stall_s`` on one answer no longer counts against ``workers``, so a
    spare takes the next queued answer while it is stuck. A process past its answer's
    deadline, or crashed, is killed and a replacement started at once; it warms up in the
    background and is not used before it is ready.
    """

    def __init__(self, workers: int, spares: int, deadline_s: float, startup_timeout_s: float):
        self.procs: list[_Worker] = []
        self._ctx = mp.get_context("spawn")
        self._workers, self._size = workers, workers + spares
        self._deadline_s, self._startup_timeout_s = deadline_s, startup_timeout_s
        self._stall_s = min(_STALL_S, deadline_s / 4)

    def run(self, jobs: deque, scores: list[float]) -> None:
        """Write the score of each ``(index, gold, pred)`` of ``jobs`` to ``scores[index]``."""
        self._fill()
        try:
            while jobs or self._busy():
                self._dispatch(jobs)
                self._wait(jobs_waiting=bool(jobs))
                self._check_started()
                self._collect(scores)
        finally:
            for w in self._busy():  # only after an exception: its late result must not be
                self._remove(w)  # read as the result of a later answer; the next call refills

    def wait_ready(self) -> None:
        self._fill()
        while not all(w.ready for w in self.procs):
            self._wait(jobs_waiting=False)
            self._check_started()

    def close(self) -> None:
        for w in self.procs:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        end = time.monotonic() + 1.0
        for w in self.procs:
            w.proc.join(max(0.0, end - time.monotonic()))
            w.kill()
        self.procs = []

    def _busy(self) -> list[_Worker]:
        return [w for w in self.procs if w.job is not None]

    def _idle(self) -> list[_Worker]:
        idle = []
        for w in [w for w in self.procs if w.ready and w.job is None]:
            if w.proc.is_alive():
                idle.append(w)
            else:  # died between calls (e.g. killed from outside)
                self._replace(w)
        return idle

    def _dispatch(self, jobs: deque) -> None:
        now = time.monotonic()
        running = sum(1 for w in self._busy() if now - w.job[1] < self._stall_s)
        for w in self._idle():
            if not jobs or running >= self._workers:
                return
            w.submit(*jobs.popleft())
            running += 1

    def _wait(self, jobs_waiting: bool) -> None:
        """Block until a process answers or becomes ready, or until the next deadline,
        stall (if answers are queued) or start-up timeout."""
        now = time.monotonic()
        events, conns = [], []
        for w in self.procs:
            if not w.ready:
                events.append(w.started + self._startup_timeout_s)
            elif w.job is not None:
                sent = w.job[1]
                events.append(sent + self._deadline_s)
                if jobs_waiting and now < sent + self._stall_s:
                    events.append(sent + self._stall_s)
            else:
                continue
            conns.append(w.conn)
        _wait_conns(conns, max(0.0, min(events, default=now) - now))

    def _check_started(self) -> None:
        now = time.monotonic()
        for w in [w for w in self.procs if not w.ready]:
            try:
                w.ready = w.conn.poll() and w.conn.recv() == _READY
                failed = not w.ready and now - w.started > self._startup_timeout_s
            except (EOFError, OSError):
                failed = True
            if failed and _stopped_by_parent_signal(w):
                self._replace(w)  # Ctrl-C / SIGTERM to the process group hit it before it could ignore them
            elif failed:
                self._remove(w)
                raise RuntimeError(
                    "math-verify worker failed to start (see its stderr). It uses the 'spawn' "
                    "start method: the main script must be a file guarded by "
                    "`if __name__ == '__main__':`."
                )

    def _collect(self, scores: list[float]) -> None:
        """Record finished answers; replace a process that crashed or is past its answer's
        deadline (that answer keeps its score of 0)."""
        for w in self._busy():
            index, sent = w.job
            try:
                if w.conn.poll():
                    scores[index] = float(w.conn.recv())
                    w.job = None
                elif time.monotonic() - sent >= self._deadline_s:
                    self._replace(w)
            except (EOFError, OSError):
                self._replace(w)

    def _remove(self, w: _Worker) -> None:
        w.kill()
        self.procs.remove(w)

    def _replace(self, w: _Worker) -> None:
        self._remove(w)
        self._fill()

    def _fill(self) -> None:
        while len(self.procs) < self._size:
            self.procs.append(_Worker(self._ctx))


class MathVerifyReward:
    """1.0 if a completion's last boxed answer equals the gold answer, else 0.0.

    Answers are verified in parallel by ``workers`` processes (default ``min(4, CPUs)``). An
    answer not verified within ``deadline_s`` of wall-clock after a ready worker received it
    scores 0.0, and that worker is killed. ``spares`` more processes are kept started and
    warm: one takes a killed worker's place at once, and takes queued answers while a worker
    is stuck, so the answers that hang in one batch time out side by side. A batch thus takes
    about one deadline plus normal verification time while fewer than ``workers + spares`` of
    its answers hang (more hangs add a deadline and a worker start-up per round). At most
    ``workers + spares`` worker processes are alive at any time.

    Processes start on the first call with a boxed answer (or on ``warm_up()``); a call waits
    for a start-up only when no started process is free. Safe to call from any thread (calls
    are serialized). Workers use the "spawn" context: scripts need a main guard.
    """

    def __init__(
        self, deadline_s: float = 5.0, workers: int | None = None, spares: int = 2, startup_timeout_s: float = 120.0
    ):
        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        if deadline_s <= 0 or workers < 1 or spares < 0:
            raise ValueError("deadline_s must be > 0, workers >= 1 and spares >= 0")
        self.deadline_s = float(deadline_s)
        self._pool = _WorkerPool(workers, spares, self.deadline_s, startup_timeout_s)
        self._lock = threading.Lock()

    def __call__(self, completions: list[str], golds: list[str]) -> list[float]:
        if len(completions) != len(golds):
            raise ValueError(f"{len(completions)} completions but {len(golds)} golds")
        scores = [0.0] * len(completions)
        jobs = deque()
        for i, (text, gold) in enumerate(zip(completions, golds, strict=True)):
            pred = extract_boxed(text or "")
            if pred is not None and pred.strip():
                jobs.append((i, prepare_gold(gold), f"${normalize_answer(pred)}$"))
        if jobs:
            with self._lock:
                self._pool.run(jobs, scores)
        return scores

    def warm_up(self) -> None:
        """Start all worker processes now and wait until each has imported math-verify."""
        with self._lock:
            self._pool.wait_ready()

    def close(self) -> None:
        """Stop the worker processes."""
        with self._lock:
            self._pool.close()

    def __enter__(self) -> "MathVerifyReward":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

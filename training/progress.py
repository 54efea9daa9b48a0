"""Progress for long training commands, from the first second to the last step.

Contract
- :class:`Reporter` prints timestamped lines (``[m:ss] text``, time since the reporter was
  made). :meth:`Reporter.track` walks an iterable with a rich progress bar on a terminal and,
  on anything else (logs, pipes, CI), a line at the start, every ``every_s`` seconds and at
  the end, so a captured log shows progress too.
- :func:`eta_callback` is a transformers ``TrainerCallback`` printing, at every logging step,
  ``step N/TOTAL``, the loss, the learning rate, the time spent training and an ETA for the
  remaining steps (from this run's own pace, so a resumed run does not count the steps it
  skipped); and a line for every checkpoint written. transformers is imported only when it is
  called: this module loads in the stream environment too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from rich.console import Console

T = TypeVar("T")


def fmt_duration(seconds: float) -> str:
    """``m:ss`` below an hour, ``h:mm:ss`` above; negative or unknown durations as ``?``."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):  # NaN, negative, infinite
        return "?"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Reporter:
    """Timestamped progress lines on a rich console (see the module contract)."""

    def __init__(self, console: Console | None = None, every_s: float = 5.0) -> None:
        self.console = console or Console()
        self.every_s = every_s
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        """Seconds since this reporter was made."""
        return time.monotonic() - self.t0

    def note(self, text: str) -> None:
        """Print ``[m:ss] text`` at once."""
        self.console.print(f"[{fmt_duration(self.elapsed())}] {text}", highlight=False, markup=False, soft_wrap=True)

    def track(self, items: Iterable[T], total: int, what: str) -> Iterator[T]:
        """Yield ``items`` while showing ``what: done/total`` (a bar on a terminal, periodic lines otherwise)."""
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
            with Progress(*columns, console=self.console, transient=False) as bar:
                task = bar.add_task(what, total=total)
                for item in items:
                    yield item
                    bar.advance(task)
            return
        start = last = time.monotonic()
        self.note(f"{what}: 0/{total:,}")
        done = 0
        for item in items:
            yield item
            done += 1
            now = time.monotonic()
            if now - last >= self.every_s and done < total:
                last = now
                eta = (now - start) / done * (total - done)
                self.note(f"{what}: {done:,}/{total:,} ({done / max(total, 1):.0%}, eta {fmt_duration(eta)})")
        self.note(f"{what}: {done:,}/{total:,} in {fmt_duration(time.monotonic() - start)}")


def eta_line(step: int, total: int, loss: float | None, lr: float | None, trained_s: float, steps_done: int) -> str:
    """``step N/TOTAL  loss x  lr y  elapsed a  eta b``; the ETA extrapolates this run's pace (``steps_done`` in ``trained_s``)."""
    eta = trained_s / steps_done * max(total - step, 0) if steps_done > 0 else float("nan")
    parts = [f"step {step:,}/{total:,}"]
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if lr is not None:
        parts.append(f"lr {lr:.2e}")
    parts += [f"elapsed {fmt_duration(trained_s)}", f"eta {fmt_duration(eta)}"]
    return "  ".join(parts)


def eta_callback(reporter: Reporter) -> Any:
    """A ``transformers.TrainerCallback`` that reports step/total, loss, elapsed and ETA through ``reporter``."""
    from transformers import TrainerCallback

    class EtaCallback(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = time.monotonic()
            self.step0 = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t0, self.step0 = time.monotonic(), int(state.global_step)
            start = f", resuming at step {self.step0:,}" if self.step0 else ""
            reporter.note(f"training: {int(state.max_steps):,} steps{start}")

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return
            step = int(state.global_step)
            lr = float(logs["learning_rate"]) if logs.get("learning_rate") is not None else None
            elapsed = time.monotonic() - self.t0
            reporter.note(eta_line(step, int(state.max_steps), float(logs["loss"]), lr, elapsed, step - self.step0))

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                reporter.note(f"checkpoint saved: {args.output_dir}/checkpoint-{int(state.global_step)}")

    return EtaCallback()

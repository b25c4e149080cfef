"""The text of one request as the API returns it: engine tokens → incremental detokenizing →
stop strings → text deltas, plus the usage counts.

Stop strings: generation ends before the first stop string, the stop string itself is never
emitted, and no delta leaks the start of a stop string that a later delta completes (a tail that
could be such a start is held back until it is decided)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from fireflyer.workloads.serve.protocol import Usage
from fireflyer.workloads.serve.types import FinishReason, TokenEvent

if TYPE_CHECKING:
    from fireflyer.workloads.serve.tokenizer import ServeTokenizer

FinishText = Literal["stop", "length", "abort"]


class StopStringFilter:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped: str | None = None  # the stop string found, once found

    def feed(self, delta: str) -> str:
        """The part of the text so far that is safe to emit. After a stop string is found
        (`stopped` is set) it returns the text before it, and nothing more afterwards."""
        if self.stopped is not None:
            return ""
        if not self._stops:
            return delta
        text = self._held + delta
        first: tuple[int, str] | None = None
        for stop in self._stops:
            at = text.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            self.stopped = first[1]
            self._held = ""
            return text[: first[0]]
        keep = self._possible_start(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """At the end of generation without a stop string: the held-back tail."""
        held, self._held = self._held, ""
        return held if self.stopped is None else ""

    def _possible_start(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class _Stream(Protocol):
    @property
    def request_id(self) -> str: ...

    def __aiter__(self) -> AsyncIterator[TokenEvent]: ...

    def abort(self, reason: FinishReason = FinishReason.ABORT) -> None: ...


@dataclass(frozen=True)
class Delta:
    text: str
    finish_reason: FinishText | None  # set on the last delta only


class Generation:
    """One engine request seen as text. Iterate `deltas()` once; call `close()` when done with
    it, which aborts the engine request unless it already finished."""

    def __init__(
        self,
        stream: _Stream,
        tokenizer: ServeTokenizer,
        prompt_ids: Sequence[int],
        stops: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self._stream = stream
        self._detokenizer = tokenizer.detokenizer(prompt_ids, skip_special_tokens=skip_special_tokens)
        self._stops = StopStringFilter(stops)
        self.prompt_tokens = len(prompt_ids)
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.finished = False

    @property
    def request_id(self) -> str:
        return self._stream.request_id

    def usage(self) -> Usage:
        return Usage.of(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self._stream.abort()

    async def deltas(self) -> AsyncIterator[Delta]:
        """Text deltas (empty ones skipped); the last one carries the finish reason."""
        async for event in self._stream:
            self.prompt_tokens = event.num_prompt_tokens
            self.cached_tokens = event.num_cached_tokens
            text = ""
            if event.token_id is not None:
                self.completion_tokens += 1
                text = self._detokenizer.add(event.token_id)
            if event.finish_reason is not None:
                text += self._detokenizer.flush()
            text = self._stops.feed(text)
            if self._stops.stopped is not None:
                if event.finish_reason is None:
                    # the engine would go on generating past the stop string
                    self._stream.abort(FinishReason.STOP)
                self.finished = True
                yield Delta(text, "stop")
                return
            if event.finish_reason is not None:
                self.finished = True
                yield Delta(text + self._stops.flush(), _finish_text(event.finish_reason))
                return
            if text:
                yield Delta(text, None)
        # The stream ended without a final event: treat it as cancelled by the engine.
        self.finished = True
        text = self._stops.feed(self._detokenizer.flush())
        stopped = self._stops.stopped is not None
        yield Delta(text if stopped else text + self._stops.flush(), "stop" if stopped else "abort")


def _finish_text(reason: FinishReason) -> FinishText:
    return "stop" if reason == FinishReason.STOP else "length" if reason == FinishReason.LENGTH else "abort"

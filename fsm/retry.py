"""Retry policy for calls that need S3: exponential backoff with jitter, up to a deadline.

What is retried: S3 being unreachable or not serving (`S3Unavailable`: connection refused,
timeouts, 5xx, SlowDown), and a tool failure whose output says the same. What is not: S3 answering
"no" (`S3AccessError`: wrong credentials, no permission, no such bucket) and any other error:
waiting would not fix them, so they are reported at once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    RetryError,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
    wait_random,
)

from .errors import FsmError, S3AccessError, S3Unavailable, ToolError

T = TypeVar("T")

# First wait 0.2 s, doubling to at most 5 s, plus up to 0.2 s of jitter.
INITIAL_WAIT = 0.2
MAX_WAIT = 5.0
JITTER = 0.2

# How juicefs (AWS Go SDK) and litestream report S3 refusing us; matched in their stderr tail.
_REFUSED = re.compile(
    r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|NoSuchBucket|"
    r"InvalidBucketName|StatusCode: 40[134]\b")
# ... and S3 not answering (or answering 5xx).
_UNAVAILABLE = re.compile(
    r"connection refused|connection reset|no such host|i/o timeout|timeout|timed out|"
    r"request send failed|StatusCode: 0\b|StatusCode: 5\d\d|SlowDown|ServiceUnavailable|"
    r"InternalError|broken pipe|EOF", re.IGNORECASE)


def classify_tool_error(exc: ToolError) -> FsmError:
    """An S3 error type for a failed juicefs/litestream call, judged by its stderr tail;
    the ToolError itself when it is something else."""
    if _REFUSED.search(exc.stderr_tail):
        return S3AccessError(f"S3 refused {exc.tool} {exc.action}; check the credentials, "
                             f"bucket name and permissions:\n{exc.stderr_tail}")
    if exc.returncode is None or _UNAVAILABLE.search(exc.stderr_tail):
        return S3Unavailable(f"{exc.tool} {exc.action} could not reach S3:\n{exc.stderr_tail}")
    return exc


async def with_s3_retries(what: str, attempt: Callable[[], Awaitable[T]], *, deadline: float,
                          log: Any) -> T:
    """Run `attempt` until it succeeds, retrying S3Unavailable with backoff until `deadline`
    seconds after the first attempt (the last attempt is made at the deadline). Every retry is
    an `s3_retry` event; giving up raises S3Unavailable naming the deadline."""
    started = time.monotonic()

    def before_sleep(state: RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        log.warning("s3_retry", what=what, attempt=state.attempt_number,
                    error=str(error), error_type=type(error).__name__,
                    sleep_s=round(state.upcoming_sleep, 3),
                    elapsed_s=round(time.monotonic() - started, 3), deadline_s=deadline)

    # (wait_exponential_jitter renamed its arguments in tenacity 9; this works in 8 and 9)
    backoff = wait_exponential(multiplier=INITIAL_WAIT, max=MAX_WAIT) + wait_random(0, JITTER)

    def wait(state: RetryCallState) -> float:
        # The last wait is cut short so that one more attempt is made at the deadline.
        remaining = deadline - (state.seconds_since_start or 0.0)
        return max(0.0, min(backoff(state), remaining))

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(S3Unavailable),
        stop=stop_after_delay(deadline),
        wait=wait,
        before_sleep=before_sleep,
        reraise=False,
    )
    try:
        result: T = await retrying(attempt)
    except RetryError as gave_up:
        last = gave_up.last_attempt.exception()
        elapsed = time.monotonic() - started
        log.error("s3_retry_gave_up", what=what, attempts=gave_up.last_attempt.attempt_number,
                  elapsed_s=round(elapsed, 3), deadline_s=deadline, error=str(last))
        raise S3Unavailable(
            f"{what}: S3 still unavailable after {elapsed:.1f}s and "
            f"{gave_up.last_attempt.attempt_number} attempts (s3_retry_deadline={deadline:g}s); "
            f"check that the endpoint is up and reachable, or raise s3_retry_deadline. "
            f"Last error: {last}") from last
    attempts = retrying.statistics.get("attempt_number", 1)
    if attempts > 1:
        log.info("s3_retry_succeeded", what=what, attempts=attempts,
                 elapsed_s=round(time.monotonic() - started, 3))
    return result


async def with_s3(config: Any, log: Any, what: str, step: Callable[[], Awaitable[T]], *,
                  check_first: bool = True) -> T:
    """Run a step that needs S3; in S3 mode, check the bucket before each attempt (ms, where
    the tools' own SDK retries take seconds to minutes) and retry while S3 is unavailable, up
    to s3_retry_deadline. Local mode: just the step."""
    if config.local_mode:
        return await step()
    from . import s3  # s3 imports the adapters; retry stays importable on its own

    async def attempt() -> T:
        if check_first:
            await s3.check_bucket(s3.target_of(config))
        try:
            return await step()
        except ToolError as exc:
            raise classify_tool_error(exc) from exc

    return await with_s3_retries(what, attempt, deadline=config.s3_retry_deadline, log=log)

"""The regular expressions a config gives over module names, matched under a time bound.

``target_modules`` and ``exclude_modules`` (as a string), the keys of ``rank_pattern`` and
``alpha_pattern``, and ``layers_pattern`` are regexes a user, or an adapter file from
anywhere, writes. Two things may go wrong with one, and both become a ``PatternError``
that names the field and the pattern:

- it is not valid where PEFT places it: ``(?i)q_proj`` is fine alone, but inside PEFT's
  ``(.*\\.)?(KEY)$`` its global flag is no longer at the start; a ``layers_pattern`` of
  ``(?P<idx>layers)`` clashes with PEFT's own group. The syntax is checked with Python's
  ``re``, as PEFT does, so loralab accepts exactly the patterns PEFT accepts;
- it backtracks catastrophically: ``re`` holds the interpreter's lock while it matches,
  so one such pattern would freeze every thread of a server for hours. Matching is done
  by the ``regex`` package (a dependency of Transformers, made to be compatible with
  ``re``), which takes a ``timeout`` and, with ``concurrent=True``, lets other threads
  run meanwhile. ``re2`` has no backtracking, but it also has no look-ahead, which PEFT
  users write (``^(?!.*vision).*q_proj``), so it would refuse valid files.

The time bound is per match, and optionally for a whole operation
(``matching_deadline``): a pattern slow on every one of a model's hundreds of names is
stopped once, not once per name.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import time
from collections.abc import Iterator

import regex

MAX_PATTERN_LENGTH = 100_000  # characters: an alternation of every module of a 70B model fits
MATCH_SECONDS = 1.0  # for one match when no deadline is set
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "loralab_pattern_deadline", default=None
)

# Where PEFT places each kind of pattern (``{}`` is the user's text).
WHOLE_NAME = "{}"  # target_modules / exclude_modules as a string: re.fullmatch
NAME_END = r"(.*\.)?({})$"  # rank_pattern / alpha_pattern keys: re.match
LAYERS = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."  # layers_pattern: re.match


class PatternError(ValueError):
    """A user's regex is invalid where it is used, or took too long to match."""


@functools.lru_cache(maxsize=4096)
def compile_pattern(field: str, source: str, template: str = WHOLE_NAME) -> regex.Pattern:
    """``source`` placed in ``template``, checked with ``re``'s syntax and compiled for
    bounded matching; a ``PatternError`` names ``field`` and ``source`` otherwise."""
    if not isinstance(source, str):
        raise PatternError(f"{field}: a pattern must be a string, got {source!r}")
    if len(source) > MAX_PATTERN_LENGTH:
        raise PatternError(
            f"{field}: the pattern is {len(source)} characters long; at most "
            f"{MAX_PATTERN_LENGTH} are allowed"
        )
    text = template.format(source)
    try:
        re.compile(text)
        return regex.compile(text)
    except (re.error, regex.error, RecursionError, OverflowError) as error:
        where = "" if template == WHOLE_NAME else f" (as PEFT reads it: {text!r})"
        raise PatternError(f"{field} {source!r} is not a valid regex{where}: {error}") from None


def fullmatch(field: str, source: str, name: str, template: str = WHOLE_NAME):
    """``re.fullmatch`` of the placed pattern over ``name``, under the time bound."""
    return _run(field, source, template, name, whole=True)


def match(field: str, source: str, name: str, template: str = WHOLE_NAME):
    """``re.match`` of the placed pattern at the start of ``name``, under the time bound."""
    return _run(field, source, template, name, whole=False)


@contextlib.contextmanager
def matching_deadline(seconds: float) -> Iterator[None]:
    """Every match inside the block shares one bound of ``seconds`` (on this thread)."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def _run(field: str, source: str, template: str, name: str, whole: bool):
    compiled = compile_pattern(field, source, template)
    deadline = _deadline.get()
    seconds = MATCH_SECONDS if deadline is None else deadline - time.monotonic()
    try:
        if seconds <= 0:
            raise TimeoutError
        find = compiled.fullmatch if whole else compiled.match
        return find(name, timeout=seconds, concurrent=True)
    except TimeoutError:
        raise PatternError(
            f"{field} {source!r} took too long to match the module name {name!r}; it "
            "backtracks catastrophically (nested or overlapping repeats): write it without "
            "nested repeats"
        ) from None

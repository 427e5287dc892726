"""A small PromQL evaluator for the alert rules' tests: the subset alerts.yml writes (selectors
with matchers, ``rate`` / ``increase`` with Prometheus's extrapolation, ``sum [by (...)]``,
``scalar``, ``vector``, arithmetic, comparisons, ``and`` / ``or`` / ``unless``), over synthetic
series sampled once a minute. promtool is not installed by the project; this evaluates a rule
the way Prometheus does closely enough to tell whether it fires on a given story (a series that
first shows at 1 loses that event to ``rate``, as in Prometheus)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

Labels = frozenset[tuple[str, str]]
Vector = dict[Labels, float]
Value = float | Vector

STEP_S = 60.0  # the synthetic series' scrape interval (and the rules' evaluation interval)

_TOKEN = re.compile(
    r"""\s*(?:
    (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<range>\[[0-9]+[smh]\])
  | (?P<number>[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|==|!=|>=|<=|[-+*/%<>=(){},])
    )""",
    re.VERBOSE,
)
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_COMPARISONS = {
    ">": float.__gt__, "<": float.__lt__, ">=": float.__ge__, "<=": float.__le__,
    "==": float.__eq__, "!=": float.__ne__,
}  # fmt: skip
_ARITHMETIC: dict[str, Callable[[float, float], float]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b if b else (math.nan if a == 0 else math.copysign(math.inf, a)),
}


@dataclass
class Series:
    """One series: its name, labels, and a value per minute from 0 (None: not exposed then)."""

    name: str
    labels: Mapping[str, str]
    values: Sequence[float | None]


def counter(start: float, per_min: float, minutes: int, from_min: int = 0) -> list[float | None]:
    """A counter's samples: absent before ``from_min``, then ``start`` growing by ``per_min``."""
    return [None if m < from_min else start + per_min * (m - from_min) for m in range(minutes)]


class _Parser:
    def __init__(self, expr: str, series: Sequence[Series], at_s: float) -> None:
        self._tokens: list[tuple[str, str]] = []
        at = 0
        expr = expr.strip()
        while at < len(expr):
            match = _TOKEN.match(expr, at)
            if match is None or match.end() == at:
                raise ValueError(f"cannot read {expr[at : at + 20]!r}")
            at = match.end()
            self._tokens.append((str(match.lastgroup), match.group(match.lastgroup or 0)))
        self._i = 0
        self._series = series
        self._at = at_s

    def parse(self) -> Value:
        value = self._or()
        if self._i != len(self._tokens):
            raise ValueError(f"left over: {self._tokens[self._i :]}")
        return value

    def _peek(self) -> str:
        return self._tokens[self._i][1] if self._i < len(self._tokens) else ""

    def _take(self, want: str | None = None) -> str:
        text = self._tokens[self._i][1]
        if want is not None and text != want:
            raise ValueError(f"expected {want}, got {text}")
        self._i += 1
        return text

    def _or(self) -> Value:
        left = self._and()
        while self._peek() == "or":
            self._take()
            right = self._and()
            assert isinstance(left, dict) and isinstance(right, dict)
            left = {**right, **left}
        return left

    def _and(self) -> Value:
        left = self._comparison()
        while self._peek() in ("and", "unless"):
            op = self._take()
            right = self._comparison()
            assert isinstance(left, dict) and isinstance(right, dict)
            left = {k: v for k, v in left.items() if (k in right) == (op == "and")}
        return left

    def _comparison(self) -> Value:
        left = self._additive()
        while self._peek() in _COMPARISONS:
            test = _COMPARISONS[self._take()]
            right = self._additive()
            left = _filter(left, right, test)
        return left

    def _additive(self) -> Value:
        left = self._multiplicative()
        while self._peek() in ("+", "-"):
            op = _ARITHMETIC[self._take()]
            left = _combine(left, self._multiplicative(), op)
        return left

    def _multiplicative(self) -> Value:
        left = self._primary()
        while self._peek() in ("*", "/"):
            op = _ARITHMETIC[self._take()]
            left = _combine(left, self._primary(), op)
        return left

    def _primary(self) -> Value:
        kind, text = self._tokens[self._i]
        if kind == "number":
            self._i += 1
            return float(text)
        if text == "(":
            self._take()
            value = self._or()
            self._take(")")
            return value
        if kind != "ident":
            raise ValueError(f"unexpected {text}")
        self._i += 1
        if text in ("sum", "max", "min", "count"):
            return self._aggregate(text)
        if text in ("rate", "increase"):
            self._take("(")
            matched, window_s = self._selector(self._take()), self._range()
            self._take(")")
            return {
                labels: (result if text == "increase" else result / window_s)
                for labels, samples in matched.items()
                if (result := _increase(samples, self._at, window_s)) is not None
            }
        if text in ("scalar", "vector"):
            self._take("(")
            inner = self._or()
            self._take(")")
            if text == "vector":
                assert isinstance(inner, float)
                return {frozenset(): inner}
            assert isinstance(inner, dict)
            return next(iter(inner.values())) if len(inner) == 1 else math.nan
        matched = self._selector(text)
        return {labels: samples[-1][1] for labels, samples in matched.items() if samples}

    def _aggregate(self, how: str) -> Vector:
        by: list[str] | None = None
        if self._peek() == "by":
            self._take()
            by = self._labels()
        self._take("(")
        inner = self._or()
        self._take(")")
        if self._peek() == "by":
            self._take()
            by = self._labels()
        assert isinstance(inner, dict)
        groups: dict[Labels, list[float]] = {}
        for labels, value in inner.items():
            key = frozenset((k, v) for k, v in labels if by is not None and k in by)
            groups.setdefault(key, []).append(value)
        picks: dict[str, Callable[[list[float]], float]] = {
            "sum": math.fsum,
            "max": max,
            "min": min,
            "count": lambda values: float(len(values)),
        }
        pick = picks[how]
        return {key: pick(values) for key, values in groups.items()}

    def _labels(self) -> list[str]:
        self._take("(")
        names = []
        while self._peek() != ")":
            names.append(self._take())
            if self._peek() == ",":
                self._take()
        self._take(")")
        return names

    def _range(self) -> float:
        text = self._take()
        return float(text[1:-2]) * _UNITS[text[-2]]

    def _selector(self, name: str) -> dict[Labels, list[tuple[float, float]]]:
        """Each series ``name{...}`` matches -> its samples up to now (the range's caller
        cuts them to its window); its labels without the name."""
        matchers: list[tuple[str, str, str]] = []
        if self._peek() == "{":
            self._take()
            while self._peek() != "}":
                label, op, value = self._take(), self._take(), self._take()[1:-1]
                matchers.append((label, op, value))
                if self._peek() == ",":
                    self._take()
            self._take("}")
        found: dict[Labels, list[tuple[float, float]]] = {}
        for series in self._series:
            if series.name != name or not all(_matches(series.labels, m) for m in matchers):
                continue
            samples = [
                (m * STEP_S, v)
                for m, v in enumerate(series.values)
                if v is not None and m * STEP_S <= self._at
            ]
            # an instant selector sees a sample up to 5 minutes old (Prometheus's lookback)
            if self._peek().startswith("[") or (samples and samples[-1][0] > self._at - 300):
                found[frozenset((k, v) for k, v in series.labels.items() if v)] = samples
        return found


def _matches(labels: Mapping[str, str], matcher: tuple[str, str, str]) -> bool:
    label, op, want = matcher
    have = labels.get(label, "")
    if op in ("=~", "!~"):
        hit = re.fullmatch(want, have) is not None
        return hit if op == "=~" else not hit
    return (have == want) if op == "=" else (have != want)


def _increase(samples: list[tuple[float, float]], at_s: float, window_s: float) -> float | None:
    """Prometheus's ``increase`` (``extrapolatedRate``): the samples in (at - window, at],
    counter resets handled, extrapolated to the window's edges (not past a counter's zero)."""
    inside = [(t, v) for t, v in samples if at_s - window_s < t <= at_s]
    if len(inside) < 2:
        return None
    delta, previous = 0.0, inside[0][1]
    for _, value in inside[1:]:
        delta += value - previous if value >= previous else value
        previous = value
    first_t, last_t = inside[0][0], inside[-1][0]
    sampled = last_t - first_t
    average = sampled / (len(inside) - 1)
    to_start, to_end = first_t - (at_s - window_s), at_s - last_t
    if delta > 0 and inside[0][1] >= 0:
        to_start = min(to_start, sampled * (inside[0][1] / delta))
    threshold = average * 1.1
    extended = sampled
    extended += to_start if to_start < threshold else average / 2
    extended += to_end if to_end < threshold else average / 2
    return delta * extended / sampled


def _combine(left: Value, right: Value, op: Callable[[float, float], float]) -> Value:
    if isinstance(left, float) and isinstance(right, float):
        return op(left, right)
    if isinstance(left, dict) and isinstance(right, dict):
        return {k: op(v, right[k]) for k, v in left.items() if k in right}
    if isinstance(left, dict):
        assert isinstance(right, float)
        return {k: op(v, right) for k, v in left.items()}
    assert isinstance(right, dict)
    return {k: op(left, v) for k, v in right.items()}


def _filter(left: Value, right: Value, test: Callable[[float, float], bool]) -> Value:
    if isinstance(left, dict) and isinstance(right, float):
        return {k: v for k, v in left.items() if test(v, right)}
    if isinstance(left, dict) and isinstance(right, dict):
        return {k: v for k, v in left.items() if k in right and test(v, right[k])}
    raise ValueError("a comparison of two scalars needs bool")


def evaluate(expr: str, series: Sequence[Series], at_s: float) -> Value:
    """``expr``'s value at ``at_s`` seconds over ``series``."""
    return _Parser(expr, series, at_s).parse()


def fires(expr: str, for_s: float, series: Sequence[Series], at_min: int) -> bool:
    """Whether an alert of ``expr`` with ``for: for_s`` fires at minute ``at_min``: its
    expression had a result at every evaluation (once a minute) over the ``for`` before."""
    steps = int(for_s // STEP_S)
    return all(bool(evaluate(expr, series, (at_min - back) * STEP_S)) for back in range(steps + 1))

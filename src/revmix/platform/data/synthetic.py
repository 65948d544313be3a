"""Synthetic forward/reverse task families: the embedded default's workload.

Each family is a bijection ``y = f_p(x)`` with parameters ``p`` and an exact inverse, so both directions
have verifiable answers and no downloads are needed. As in "When Inverse Data Outperforms" (arXiv
2509.13079), the reverse question turns the forward answer into a given and asks for the premise:

    forward:  <head(p)> Given x = <x>, find y.      reverse:  <head(p)> Given y = <y>, find x.

Both directions share the head (same template words, same numbers), so a model must read the question
direction to answer. Solutions are short single-operation steps a tiny transformer can learn and end
with the line ``Answer: <answer>``; a reverse solution undoes the steps, then replays the forward steps
as a ``Check:`` — so y+ and y− share most tokens too, as the paper's traces do.

Families (:data:`FAMILIES`): ``affine_mod``, ``arith_chain``, ``string_ops`` and ``base_conv``. Rows are
plain dicts with exactly :data:`~revmix.platform.data.schema.ALL_FIELDS`.
"""

from __future__ import annotations

import abc
import math
import random
import re
from collections.abc import Sequence
from typing import Any, ClassVar

from revmix.platform.data.schema import ALL_FIELDS, DIRECTIONS

Params = tuple[Any, ...]
_QUESTION = re.compile(
    r"(?P<head>.+) Given (?P<given>[a-z]) = (?P<value>-?[0-9a-z]+), find (?P<find>[a-z])\."
)


class Family(abc.ABC):
    """One task family: sampling, exact maths both ways, prompt/solution rendering and prompt parsing.

    Values (premise ``x`` and result ``y``) are the strings that appear in prompts and answers.
    ``forward_steps``/``reverse_steps`` compute their value step by step, independently of
    ``apply``/``invert``, so :func:`verify_row` cross-checks the solution text against the maths.
    """

    name: ClassVar[str]
    x_name: ClassVar[str] = "x"
    y_name: ClassVar[str] = "y"

    @abc.abstractmethod
    def sample(self, rng: random.Random) -> tuple[Params, str]:
        """Draw (params, premise x) from ``rng`` only — never global random state."""

    @abc.abstractmethod
    def apply(self, p: Params, x: str) -> str:
        """Exact forward maths: ``y = f_p(x)``."""

    @abc.abstractmethod
    def invert(self, p: Params, y: str) -> str:
        """Exact inverse maths: ``x = f_p⁻¹(y)``; raise ValueError if ``y`` has no preimage."""

    @abc.abstractmethod
    def head(self, p: Params) -> str: ...

    @abc.abstractmethod
    def parse_head(self, head: str) -> Params: ...

    @abc.abstractmethod
    def check_value(self, p: Params, direction: str, value: str) -> None:
        """Raise ValueError if ``value`` is outside the domain of the given side of ``f_p``."""
        ...

    @abc.abstractmethod
    def forward_steps(self, p: Params, x: str) -> tuple[list[str], str]: ...

    @abc.abstractmethod
    def reverse_steps(self, p: Params, y: str) -> tuple[list[str], str]: ...

    def prompt(self, p: Params, direction: str, given: str) -> str:
        g, f = (self.x_name, self.y_name) if direction == "forward" else (self.y_name, self.x_name)
        return f"{self.head(p)} Given {g} = {given}, find {f}."

    def solution(self, p: Params, direction: str, given: str) -> str:
        if direction == "forward":
            lines, value = self.forward_steps(p, given)
        else:
            lines, value = self.reverse_steps(p, given)
            check, _ = self.forward_steps(p, value)
            lines = [*lines, f"Check: {check[0]}", *check[1:]]
        return "\n".join([*lines, f"Answer: {value}"])

    def parse(self, prompt: str) -> tuple[Params, str, str]:
        """``prompt`` → (params, direction, given value); the prompt must re-render byte for byte."""
        m = _QUESTION.fullmatch(prompt)
        if m is None:
            raise ValueError(
                f"{self.name}: prompt does not end with 'Given <v> = <value>, find <v>.': {prompt!r}"
            )
        names = (m["given"], m["find"])
        if names not in ((self.x_name, self.y_name), (self.y_name, self.x_name)):
            raise ValueError(f"{self.name}: prompt asks 'Given {names[0]} ..., find {names[1]}': {prompt!r}")
        direction = "forward" if names[0] == self.x_name else "reverse"
        p = self.parse_head(m["head"])
        if self.prompt(p, direction, m["value"]) != prompt:
            raise ValueError(f"{self.name}: prompt is not in canonical form: {prompt!r}")
        return p, direction, m["value"]


def _int(value: str, lo: int, hi: int, what: str) -> int:
    if not re.fullmatch(r"-?\d+", value) or str(int(value)) != value or not lo <= int(value) <= hi:
        raise ValueError(f"{what} must be a canonical integer in [{lo}, {hi}], got {value!r}")
    return int(value)


class AffineMod(Family):
    """``y = (a*x + b) mod m`` for prime m ≤ 23; reverse: ``x = a⁻¹ (y − b) mod m``."""

    name = "affine_mod"
    MODULI: ClassVar[tuple[int, ...]] = (5, 7, 11, 13, 17, 19, 23)
    _HEAD: ClassVar[re.Pattern[str]] = re.compile(
        r"Let y = \((\d+)\*x \+ (\d+)\) mod (\d+), with 0 <= x < (\d+)\."
    )

    def sample(self, rng: random.Random) -> tuple[Params, str]:
        m = rng.choice(self.MODULI)
        return (rng.randint(2, m - 1), rng.randint(1, m - 1), m), str(rng.randrange(m))

    def apply(self, p: Params, x: str) -> str:
        a, b, m = p
        return str((a * int(x) + b) % m)

    def invert(self, p: Params, y: str) -> str:
        a, b, m = p
        return str(pow(a, -1, m) * (int(y) - b) % m)

    def head(self, p: Params) -> str:
        a, b, m = p
        return f"Let y = ({a}*x + {b}) mod {m}, with 0 <= x < {m}."

    def parse_head(self, head: str) -> Params:
        mt = self._HEAD.fullmatch(head)
        if mt is None:
            raise ValueError(f"affine_mod: head is not 'Let y = (a*x + b) mod m, with 0 <= x < m.': {head!r}")
        a, b, m, m2 = map(int, mt.groups())
        if m != m2 or m < 2 or math.gcd(a, m) != 1:
            raise ValueError(
                f"affine_mod: need matching moduli and gcd(a, m) = 1, got a={a} m={m} bound={m2}"
            )
        return a, b, m

    def check_value(self, p: Params, direction: str, value: str) -> None:
        _int(value, 0, p[2] - 1, f"affine_mod {direction} given value")

    def forward_steps(self, p: Params, x: str) -> tuple[list[str], str]:
        a, b, m = p
        ax, y = a * int(x), (a * int(x) + b) % m
        return [f"{a}*{x} = {ax}", f"{ax} + {b} = {ax + b}", f"{ax + b} mod {m} = {y}"], str(y)

    def reverse_steps(self, p: Params, y: str) -> tuple[list[str], str]:
        a, b, m = p
        d = int(y) - b
        inv = next(k for k in range(1, m) if a * k % m == 1)  # search, not pow(): independent of invert()
        raw = d % m * inv
        return [
            f"{y} - {b} = {d}",
            f"{d} mod {m} = {d % m}",
            f"{a}*{inv} = {a * inv} = 1 mod {m}, so 1/{a} = {inv}",
            f"{d % m}*{inv} = {raw}",
            f"{raw} mod {m} = {raw % m}",
        ], str(raw % m)


class ArithChain(Family):
    """``x`` → 2–4 of add/subtract (1–20), multiply/divide (2–5); values stay in [0, 200], divisions exact."""

    name = "arith_chain"
    MAX_VALUE: ClassVar[int] = 200
    WORDS: ClassVar[dict[str, str]] = {"+": "add", "-": "subtract", "*": "multiply by", "/": "divide by"}
    UNDO: ClassVar[dict[str, str]] = {"+": "-", "-": "+", "*": "/", "/": "*"}
    _HEAD: ClassVar[re.Pattern[str]] = re.compile(r"Start from x, then (.+) to get y\.")
    _OP: ClassVar[re.Pattern[str]] = re.compile(r"(add|subtract|multiply by|divide by) (\d+)")

    @staticmethod
    def _do(op: str, v: int, k: int) -> int:
        if op == "/" and v % k:
            raise ValueError(f"arith_chain: {v} / {k} is not exact")
        return {"+": v + k, "-": v - k, "*": v * k, "/": v // k}[op]

    def sample(self, rng: random.Random) -> tuple[Params, str]:
        x = v = rng.randint(1, 20)
        ops: list[tuple[str, int]] = []
        for _ in range(rng.randint(2, 4)):
            choices = []
            for op in "+-*/":
                ks = range(1, 21) if op in "+-" else range(2, 6)
                ok = [
                    k for k in ks if (op != "/" or v % k == 0) and 0 <= self._do(op, v, k) <= self.MAX_VALUE
                ]
                if ok and (not ops or ops[-1][0] != op):  # no two same-kind steps in a row
                    choices.append((op, ok))
            op, ok = rng.choice(choices)  # never empty: "+1" or "-1" is always legal
            ops.append((op, rng.choice(ok)))
            v = self._do(op, v, ops[-1][1])
        return tuple(ops), str(x)

    def apply(self, p: Params, x: str) -> str:
        v = int(x)
        for op, k in p:
            v = self._do(op, v, k)
        return str(v)

    def invert(self, p: Params, y: str) -> str:
        v = int(y)
        for op, k in reversed(p):
            v = self._do(self.UNDO[op], v, k)
        return str(v)

    def head(self, p: Params) -> str:
        return f"Start from x, then {', '.join(f'{self.WORDS[op]} {k}' for op, k in p)} to get y."

    def parse_head(self, head: str) -> Params:
        mt = self._HEAD.fullmatch(head)
        if mt is None:
            raise ValueError(f"arith_chain: head is not 'Start from x, then <ops> to get y.': {head!r}")
        ops = []
        for part in mt[1].split(", "):
            om = self._OP.fullmatch(part)
            if om is None or int(om[2]) == 0:
                raise ValueError(
                    f"arith_chain: bad step {part!r}; expected add|subtract|multiply by|divide by <k>"
                )
            ops.append(({v: k for k, v in self.WORDS.items()}[om[1]], int(om[2])))
        return tuple(ops)

    def check_value(self, p: Params, direction: str, value: str) -> None:
        _int(value, 0, 10**6, f"arith_chain {direction} given value")

    def _steps(self, ops: list[tuple[str, int]], v: int) -> tuple[list[str], str]:
        lines = []
        for op, k in ops:
            new = self._do(op, v, k)
            lines.append(f"{v} {op} {k} = {new}")
            v = new
        return lines, str(v)

    def forward_steps(self, p: Params, x: str) -> tuple[list[str], str]:
        return self._steps(list(p), int(x))

    def reverse_steps(self, p: Params, y: str) -> tuple[list[str], str]:
        return self._steps([(self.UNDO[op], k) for op, k in reversed(p)], int(y))


def _shift(word: str, k: int) -> str:
    return "".join(chr((ord(c) - 97 + k) % 26 + 97) for c in word)


class StringOps(Family):
    """A 3–5 letter lowercase word through 2–3 of reverse / rotate left by k / shift letters by k (1–5)."""

    name = "string_ops"
    x_name, y_name = "s", "t"
    _HEAD: ClassVar[re.Pattern[str]] = re.compile(r"Take word s, then (.+) to get t\.")
    _OP: ClassVar[re.Pattern[str]] = re.compile(r"reverse it|rotate left by (\d+)|shift letters by (\d+)")

    @staticmethod
    def _do(op: str, w: str, k: int, undo: bool = False) -> str:
        if op == "reverse":
            return w[::-1]
        if op == "rotate":
            k = -k if undo else k
            return w[k:] + w[:k]
        return _shift(w, -k if undo else k)

    @staticmethod
    def _label(op: str, k: int, undo: bool) -> str:
        if op == "reverse":
            return "reverse"
        if op == "rotate":
            return f"rotate {'right' if undo else 'left'} {k}"
        return f"shift {'-' if undo else ''}{k}"

    def sample(self, rng: random.Random) -> tuple[Params, str]:
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 5)))
        ops: list[tuple[str, int]] = []
        for _ in range(rng.randint(2, 3)):
            op = rng.choice([o for o in ("reverse", "rotate", "shift") if not ops or ops[-1][0] != o])
            k = {"reverse": 0, "rotate": rng.randint(1, len(word) - 1), "shift": rng.randint(1, 5)}[op]
            ops.append((op, k))
        return tuple(ops), word

    def apply(self, p: Params, x: str) -> str:
        for op, k in p:
            x = self._do(op, x, k)
        return x

    def invert(self, p: Params, y: str) -> str:
        for op, k in reversed(p):
            y = self._do(op, y, k, undo=True)
        return y

    def head(self, p: Params) -> str:
        words = {"reverse": "reverse it", "rotate": "rotate left by {}", "shift": "shift letters by {}"}
        return f"Take word s, then {', '.join(words[op].format(k) for op, k in p)} to get t."

    def parse_head(self, head: str) -> Params:
        mt = self._HEAD.fullmatch(head)
        if mt is None:
            raise ValueError(f"string_ops: head is not 'Take word s, then <ops> to get t.': {head!r}")
        ops = []
        for part in mt[1].split(", "):
            om = self._OP.fullmatch(part)
            if om is None:
                raise ValueError(
                    f"string_ops: bad step {part!r}; expected reverse it|rotate left by k|shift letters by k"
                )
            if om[1] is not None:
                ops.append(("rotate", int(om[1])))
            elif om[2] is not None:
                ops.append(("shift", int(om[2])))
            else:
                ops.append(("reverse", 0))
        return tuple(ops)

    def check_value(self, p: Params, direction: str, value: str) -> None:
        if not re.fullmatch(r"[a-z]+", value) or any(
            op == "rotate" and not 1 <= k < len(value) for op, k in p
        ):
            raise ValueError(
                f"string_ops {direction} given value must be lowercase letters longer than each rotation, got {value!r}"
            )

    def _steps(self, ops: Params, w: str, undo: bool) -> tuple[list[str], str]:
        lines = [" ".join(w)]
        for op, k in ops:
            w = self._do(op, w, k, undo)
            lines.append(f"{self._label(op, k, undo)}: {' '.join(w)}")
        return lines, w

    def forward_steps(self, p: Params, x: str) -> tuple[list[str], str]:
        return self._steps(p, x, undo=False)

    def reverse_steps(self, p: Params, y: str) -> tuple[list[str], str]:
        return self._steps(tuple(reversed(p)), y, undo=True)


class BaseConv(Family):
    """``d`` = base-b digits (b in 2–9) of ``n`` in [b, min(b⁴ − 1, 200)]; reverse: Horner's rule."""

    name = "base_conv"
    x_name, y_name = "n", "d"
    _HEAD: ClassVar[re.Pattern[str]] = re.compile(r"Let d be the base (\d) digits of a number n\.")

    def sample(self, rng: random.Random) -> tuple[Params, str]:
        b = rng.randint(2, 9)
        return (b,), str(rng.randint(b, min(b**4 - 1, 200)))

    def apply(self, p: Params, x: str) -> str:
        (b,), n, digits = p, int(x), ""
        while n:
            n, r = divmod(n, b)
            digits = str(r) + digits
        return digits

    def invert(self, p: Params, y: str) -> str:
        return str(int(y, p[0]))

    def head(self, p: Params) -> str:
        return f"Let d be the base {p[0]} digits of a number n."

    def parse_head(self, head: str) -> Params:
        mt = self._HEAD.fullmatch(head)
        if mt is None or int(mt[1]) < 2:
            raise ValueError(
                f"base_conv: head is not 'Let d be the base <2-9> digits of a number n.': {head!r}"
            )
        return (int(mt[1]),)

    def check_value(self, p: Params, direction: str, value: str) -> None:
        if direction == "forward":
            _int(value, 1, 10**6, "base_conv forward given value n")
        elif not re.fullmatch(rf"[1-{p[0] - 1}][0-{p[0] - 1}]*", value):
            raise ValueError(
                f"base_conv reverse given value must be base-{p[0]} digits without a leading 0, got {value!r}"
            )

    def forward_steps(self, p: Params, x: str) -> tuple[list[str], str]:
        (b,), v, lines, rems = p, int(x), [], []
        while v:
            q, r = v // b, v % b
            lines.append(f"{v} = {q}*{b} + {r}")
            rems.append(str(r))
            v = q
        return lines, "".join(reversed(rems))

    def reverse_steps(self, p: Params, y: str) -> tuple[list[str], str]:
        (b,), v, lines = p, int(y[0]), [" ".join(y)]
        for c in y[1:]:
            lines.append(f"{v}*{b} + {c} = {v * b + int(c)}")
            v = v * b + int(c)
        return lines, str(v)


FAMILIES: dict[str, Family] = {f.name: f for f in (AffineMod(), ArithChain(), StringOps(), BaseConv())}


def family_names() -> list[str]:
    return list(FAMILIES)


def _family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown synthetic family {name!r}; valid: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _twins(fam: Family, item_id: str, p: Params, x: str) -> list[dict[str, Any]]:
    y = fam.apply(p, x)
    fwd, rev = fam.solution(p, "forward", x), fam.solution(p, "reverse", y)
    task = f"synthetic/{fam.name}"
    return [
        dict(zip(ALL_FIELDS, (item_id, "forward", task, fam.prompt(p, "forward", x), fwd, rev, y))),
        dict(zip(ALL_FIELDS, (item_id, "reverse", task, fam.prompt(p, "reverse", y), rev, fwd, x))),
    ]


def facts(
    family: str, n: int, seed: int = 0, namespace: str = "revmix.synthetic"
) -> list[tuple[Params, str]]:
    """The first ``n`` distinct facts ``(params, premise)`` of ``family`` drawn from the random stream
    ``<namespace>/<family>/<seed>``: what :func:`generate` renders (namespace ``revmix.synthetic``) and
    what the pretraining corpus draws from its own namespace (:mod:`revmix.platform.pretrain`).

    Prefix-stable; asking for more facts than the family holds raises instead of looping.
    """
    fam = _family(family)
    if n < 0:
        raise ValueError(f"generate({family!r}): n must be >= 0, got {n}")
    rng = random.Random(f"{namespace}/{family}/{seed}")
    seen: dict[tuple[Params, str], None] = {}  # insertion-ordered set
    attempts = 0
    while len(seen) < n:
        attempts += 1
        if attempts > 20 * n + 1000:
            raise ValueError(
                f"generate({family!r}): found only {len(seen)} distinct facts in {attempts - 1} draws; ask for fewer than n={n}"
            )
        seen.setdefault(fam.sample(rng))
    return list(seen)


def twins(family: str, item_id: str, p: Params, x: str) -> list[dict[str, Any]]:
    """The forward row of fact ``(p, x)`` and its reverse twin, sharing ``item_id``."""
    return _twins(_family(family), item_id, p, x)


def generate(family: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct facts of ``family`` → ``2n`` rows (forward row, then its reverse twin).

    Deterministic in (family, seed) and prefix-stable: ``generate(f, 10, s)`` is the head of
    ``generate(f, 20, s)``. Facts (params, premise) never repeat; asking for more facts than the family
    holds raises instead of looping.
    """
    fam = _family(family)
    return [
        row
        for i, (p, x) in enumerate(facts(family, n, seed))
        for row in _twins(fam, f"{family}-s{seed}-{i:05d}", p, x)
    ]


def generate_mix(families: Sequence[str], n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` items spread evenly over ``families`` (the first ``n % k`` get one extra), interleaved
    round-robin item by item so any prefix of the rows is mixed."""
    if not families or len(set(families)) != len(families):
        raise ValueError(
            f"generate_mix: families must be non-empty and distinct, got {list(families)}; valid: {', '.join(FAMILIES)}"
        )
    k = len(families)
    counts = [n // k + (i < n % k) for i in range(k)]
    per = [generate(f, c, seed) for f, c in zip(families, counts)]
    return [
        row
        for j in range(max(counts))
        for rows, c in zip(per, counts)
        if j < c
        for row in rows[2 * j : 2 * j + 2]
    ]


def split_by_item(
    rows: Sequence[dict[str, Any]], test_fraction: float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) with ``round(test_fraction * #items)`` whole items in test: twins never straddle the
    split, so no fact leaks. Depends only on the set of item ids and ``seed``; row order is kept."""
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"split_by_item: test_fraction must be in [0, 1], got {test_fraction}")
    ids = sorted({r["item_id"] for r in rows})
    random.Random(f"revmix.split/{seed}").shuffle(ids)
    test_ids = set(ids[: math.floor(test_fraction * len(ids) + 0.5)])
    return [r for r in rows if r["item_id"] not in test_ids], [r for r in rows if r["item_id"] in test_ids]


def verify_row(row: dict[str, Any]) -> None:
    """Recompute a synthetic row from its prompt with the family's exact maths; raise ValueError naming
    the item and field on any mismatch (fields, answer, round trip, response, twin response)."""
    where = f"synthetic row item_id={row.get('item_id')!r} direction={row.get('direction')!r}"
    if set(row) != set(ALL_FIELDS):
        raise ValueError(f"{where}: fields {sorted(row)} != {list(ALL_FIELDS)}")
    if row["direction"] not in DIRECTIONS:
        raise ValueError(f"{where}: field 'direction' must be one of {list(DIRECTIONS)}")
    task = str(row["task"])
    if not task.startswith("synthetic/") or task.removeprefix("synthetic/") not in FAMILIES:
        raise ValueError(
            f"{where}: field 'task' is {task!r}; valid: {', '.join('synthetic/' + f for f in FAMILIES)}"
        )
    fam = FAMILIES[task.removeprefix("synthetic/")]
    try:
        p, direction, given = fam.parse(str(row["prompt"]))
        fam.check_value(p, direction, given)
        answer = fam.apply(p, given) if direction == "forward" else fam.invert(p, given)
        back = fam.invert(p, answer) if direction == "forward" else fam.apply(p, answer)
    except ValueError as e:
        raise ValueError(f"{where}: field 'prompt': {e}") from e
    if direction != row["direction"]:
        raise ValueError(
            f"{where}: field 'direction' is {row['direction']!r} but the prompt asks a {direction} question"
        )
    if back != given:
        raise ValueError(f"{where}: {fam.name} round trip {given!r} -> {answer!r} -> {back!r} is not exact")
    if str(row["answer"]) != answer:
        raise ValueError(f"{where}: field 'answer' is {row['answer']!r}; {fam.name} maths gives {answer!r}")
    other = "reverse" if direction == "forward" else "forward"
    for field, d, g, ans in (
        ("response", direction, given, answer),
        ("other_response", other, answer, given),
    ):
        text = str(row[field])
        if text.rsplit("\n", 1)[-1] != f"Answer: {ans}" or text != fam.solution(p, d, g):
            raise ValueError(
                f"{where}: field {field!r} is not the {d} solution ending 'Answer: {ans}': {text!r}"
            )

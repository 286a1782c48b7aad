"""The verifiable tasks: multi-digit addition with a per-column scratchpad (the default), and the earlier
answer-only addition, each with a binary reward.

:class:`ScratchpadAdditionTask` (the miniature's task, docs/training.md says why). A prompt is ``"347+589="``
(operands zero-padded to ``n_digits``). The completion works the sum column by column, least-significant
first: for column i it writes the two operand digits, the sum digit and the carry out (``a_i b_i s_i c_i``),
then ``>``, then the sum's ``n_digits + 1`` digits most-significant first, then ``<eos>``::

    347+589=  7 9 6 1  4 8 3 1  3 5 9 0  >  0 9 3 6 <eos>     (18 completion tokens for 3 digits)

The verifier reads the **final answer only**: the tokens between the last ``>`` and the first ``<eos>``.
The scratchpad is never checked, so a completion with a wrong scratchpad and the right answer earns 1, and
a per-token teacher signal on the scratchpad carries information the sequence reward does not.

>>> task = ScratchpadAdditionTask()
>>> task.decode(task.encode_prompt(347, 589)), task.decode(task.completion(347, 589))
('347+589=', '796148313590>0936<eos>')
>>> task.reward(task.encode_prompt(347, 589), task.completion(347, 589))
1.0
>>> task.reward(task.encode_prompt(347, 589), task.encode("000000000000>0936<eos>"))   # scratchpad not read
1.0
>>> task.reward(task.encode_prompt(347, 589), task.encode("796148313590>0937<eos>"))
0.0

:class:`AdditionTask` (kept for existing code; not the default): the completion is the sum's digits
least-significant first and ``<eos>``, 5 tokens that all decide the reward (``"347+589="`` -> ``"6390<eos>"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import WeightgeoError

__all__ = ["ScratchpadAdditionTask", "AdditionTask", "VOCAB", "EOS", "SEP"]

# <eos> keeps id 12 (the answer-only task's vocabulary is the first 13 entries); ">" is new.
VOCAB = [str(i) for i in range(10)] + ["+", "=", "<eos>", ">"]
PLUS, EQUALS, EOS, SEP = 10, 11, 12, 13


class _Addition:
    """What both addition tasks share: tokens, prompts, seeded batches, operands read back from a prompt."""

    n_digits: int

    @property
    def prompt_len(self) -> int:
        return 2 * self.n_digits + 2

    @property
    def eos_id(self) -> int:
        return EOS

    @staticmethod
    def encode(text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            if text.startswith("<eos>", i):
                out.append(EOS)
                i += 5
            else:
                out.append(VOCAB.index(text[i]))
                i += 1
        return out

    @staticmethod
    def decode(tokens: Sequence[int] | torch.Tensor) -> str:
        return "".join(VOCAB[int(t)] for t in tokens)

    @staticmethod
    def _digits(x: int, n: int) -> list[int]:
        return [int(c) for c in str(x).zfill(n)]

    def encode_prompt(self, a: int, b: int) -> list[int]:
        n = self.n_digits
        return self._digits(a, n) + [PLUS] + self._digits(b, n) + [EQUALS]

    def completion(self, a: int, b: int) -> list[int]:  # pragma: no cover - defined by each task
        raise NotImplementedError

    def rewards(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """[B] float 0/1: the verifier on a batch (defined by each task)."""
        raise NotImplementedError

    def answer(self, a: int, b: int) -> list[int]:
        """The full correct completion (alias of :meth:`completion`, the name the answer-only task used)."""
        return self.completion(a, b)

    def operands(self, prompt: Sequence[int] | torch.Tensor) -> tuple[int, int]:
        p = [int(t) for t in prompt]
        n = self.n_digits
        if len(p) != self.prompt_len or p[n] != PLUS or p[-1] != EQUALS or max(p[:n] + p[n + 1 : 2 * n + 1]) > 9:
            raise WeightgeoError(
                f"{type(self).__name__}.operands: {self.decode(p)!r} ({len(p)} tokens) is not a prompt of this task "
                f"(n_digits={n}: {n} digits, '+', {n} digits, '=', {self.prompt_len} tokens); pass a prompt from "
                f"encode_prompt(a, b) or prompts(n, generator) of a task with the same n_digits"
            )
        return int("".join(map(str, p[:n]))), int("".join(map(str, p[n + 1 : 2 * n + 1])))

    def _prompt_operands(self, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.n_digits
        pw = 10 ** torch.arange(n - 1, -1, -1)
        return (prompts[:, :n] * pw).sum(1), (prompts[:, n + 1 : 2 * n + 1] * pw).sum(1)

    # ---- batches (seeded; never the global RNG) ------------------------------------------------------
    def sample_operands(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[n, 2] uniform operands in [0, 10^n_digits)."""
        return torch.randint(0, 10**self.n_digits, (n, 2), generator=generator)

    def _tokens(self, ops: torch.Tensor, with_answer: bool) -> torch.Tensor:
        rows = [self.encode_prompt(a, b) + (self.completion(a, b) if with_answer else []) for a, b in ops.tolist()]
        return torch.tensor(rows, dtype=torch.long)

    def prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[n, prompt_len] prompt tokens."""
        return self._tokens(self.sample_operands(n, generator), with_answer=False)

    def demonstrations(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Correct demonstrations for SFT: tokens [n, prompt_len + completion_len] and a loss mask over the
        *targets* ``tokens[:, 1:]`` ([n, T-1]) that is 1 on completion tokens only (scratchpad included)."""
        tokens = self._tokens(self.sample_operands(n, generator), with_answer=True)
        mask = torch.zeros(n, tokens.shape[1] - 1)
        mask[:, self.prompt_len - 1 :] = 1.0
        return tokens, mask

    def reward(self, prompt: Sequence[int] | torch.Tensor, completion: Sequence[int] | torch.Tensor) -> float:
        """The verifier on one completion (:meth:`rewards` is the batched form and equals it); a malformed
        prompt raises :class:`~weightgeo.errors.WeightgeoError`."""
        self.operands(prompt)  # validates
        return float(
            self.rewards(torch.tensor([[int(t) for t in prompt]]), torch.tensor([[int(t) for t in completion]]))[
                0
            ].item()
        )


@dataclass(frozen=True)
class ScratchpadAdditionTask(_Addition):
    """``n_digits``-digit addition with a per-column scratchpad; the reward reads the final answer only.

    >>> t = ScratchpadAdditionTask(n_digits=2)
    >>> t.decode(t.completion(58, 67)), t.completion_len
    ('87515621>125<eos>', 13)
    """

    n_digits: int = 3  # operand digits; completion = 4 n scratchpad + ">" + (n + 1) answer digits + <eos>

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    @property
    def scratchpad_len(self) -> int:
        return 4 * self.n_digits

    @property
    def completion_len(self) -> int:
        return self.scratchpad_len + self.n_digits + 3

    def scratchpad(self, a: int, b: int) -> list[int]:
        """``a_i b_i s_i c_i`` for each column i, least-significant first (c_i = the carry out of column i)."""
        n, out, carry = self.n_digits, [], 0
        da, db = self._digits(a, n)[::-1], self._digits(b, n)[::-1]
        for x, y in zip(da, db):
            s = x + y + carry
            carry = s // 10
            out += [x, y, s % 10, carry]
        return out

    def completion(self, a: int, b: int) -> list[int]:
        return self.scratchpad(a, b) + [SEP] + self._digits(a + b, self.n_digits + 1) + [EOS]

    def rewards(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """[B] float 0/1: 1 iff the completion has an ``<eos>``, the token ``n_digits + 2`` places before the
        first ``<eos>`` is ``>``, and the ``n_digits + 1`` tokens between them are the sum's digits. Nothing
        before that ``>`` (the scratchpad) is read; the answer digits contain no ``>``, so that ``>`` is the
        last one before ``<eos>``."""
        n = self.n_digits
        a, b = self._prompt_operands(prompts)
        s = a + b
        want = torch.stack([(s // 10**i) % 10 for i in range(n, -1, -1)], 1)  # [B, n+1], MSB first
        B, N = completions.shape
        is_eos = completions == EOS
        has_eos = is_eos.any(1)
        e = torch.where(has_eos, is_eos.float().argmax(1), torch.full((B,), N))  # first <eos>
        ok = has_eos & (e >= n + 2)
        idx = (e[:, None] - (n + 2) + torch.arange(n + 2)[None, :]).clamp(0, N - 1)  # ">" then n+1 digits
        window = completions.gather(1, idx)
        ok &= (window[:, 0] == SEP) & (window[:, 1:] == want).all(1)
        return ok.float()


@dataclass(frozen=True)
class AdditionTask(_Addition):
    """The answer-only addition of earlier versions (reversed digits, 5 tokens that all decide the reward).

    >>> t = AdditionTask()
    >>> t.decode(t.answer(347, 589)), t.reward(t.encode_prompt(347, 589), t.answer(347, 589))
    ('6390<eos>', 1.0)
    """

    n_digits: int = 3  # operand digits; completion n_digits + 1 reversed digits + <eos>

    @property
    def vocab_size(self) -> int:
        return 13  # no ">"

    @property
    def completion_len(self) -> int:
        return self.n_digits + 2

    def completion(self, a: int, b: int) -> list[int]:
        return self._digits(a + b, self.n_digits + 1)[::-1] + [EOS]

    def rewards(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """[B] float 0/1: 1 iff the first n + 2 tokens are the reversed sum and ``<eos>``."""
        n = self.n_digits
        a, b = self._prompt_operands(prompts)
        s = a + b
        want = torch.stack([(s // 10**i) % 10 for i in range(n + 1)] + [torch.full_like(s, EOS)], 1)
        got = completions[:, : n + 2]
        if got.shape[1] < n + 2:
            return torch.zeros(len(s))
        return (got == want).all(1).float()

"""The verifiable task: 3-digit addition with the answer's digits reversed, binary reward.

A prompt is ``"347+589="`` (operands zero-padded to ``n_digits``); the completion is the sum's
``n_digits + 1`` digits least-significant first, zero-padded, then ``<eos>``: ``"6390<eos>"`` (936).
Reversed digits let a left-to-right model compute each digit from the operands and the carry it just
produced, which is what makes the task learnable by a ~1 M-parameter model in about a thousand steps
(docs/training.md says why this task and not another). Every sequence has the same length
(``2 n + 2`` prompt + ``n + 2`` completion tokens), so batches need no padding.

>>> task = AdditionTask()
>>> task.decode(task.encode_prompt(347, 589)), task.decode(task.answer(347, 589))
('347+589=', '6390<eos>')
>>> task.reward(task.encode_prompt(347, 589), task.answer(347, 589))
1.0
>>> task.reward(task.encode_prompt(347, 589), task.encode("6391<eos>"))
0.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["AdditionTask", "VOCAB", "EOS"]

VOCAB = [str(i) for i in range(10)] + ["+", "=", "<eos>"]
PLUS, EQUALS, EOS = 10, 11, 12


@dataclass(frozen=True)
class AdditionTask:
    n_digits: int = 3  # operand digits; prompts "abc+def=", completions n_digits+1 reversed digits + <eos>

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    @property
    def prompt_len(self) -> int:
        return 2 * self.n_digits + 2

    @property
    def completion_len(self) -> int:
        return self.n_digits + 2

    @property
    def eos_id(self) -> int:
        return EOS

    # ---- text <-> tokens -----------------------------------------------------------------------------
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

    def _digits(self, x: int, n: int) -> list[int]:
        return [int(c) for c in str(x).zfill(n)]

    def encode_prompt(self, a: int, b: int) -> list[int]:
        n = self.n_digits
        return self._digits(a, n) + [PLUS] + self._digits(b, n) + [EQUALS]

    def answer(self, a: int, b: int) -> list[int]:
        return self._digits(a + b, self.n_digits + 1)[::-1] + [EOS]

    # ---- batches (seeded; never the global RNG) ------------------------------------------------------
    def sample_operands(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[n, 2] uniform operands in [0, 10^n_digits)."""
        return torch.randint(0, 10 ** self.n_digits, (n, 2), generator=generator)

    def _tokens(self, ops: torch.Tensor, with_answer: bool) -> torch.Tensor:
        rows = []
        for a, b in ops.tolist():
            rows.append(self.encode_prompt(a, b) + (self.answer(a, b) if with_answer else []))
        return torch.tensor(rows, dtype=torch.long)

    def prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """[n, prompt_len] prompt tokens."""
        return self._tokens(self.sample_operands(n, generator), with_answer=False)

    def demonstrations(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Correct demonstrations for SFT: tokens [n, prompt_len + completion_len] and a loss mask over the
        *targets* ``tokens[:, 1:]`` ([n, T-1]) that is 1 on completion tokens only."""
        tokens = self._tokens(self.sample_operands(n, generator), with_answer=True)
        mask = torch.zeros(n, tokens.shape[1] - 1)
        mask[:, self.prompt_len - 1:] = 1.0
        return tokens, mask

    # ---- the verifier ---------------------------------------------------------------------------------
    def reward(self, prompt: Sequence[int] | torch.Tensor, completion: Sequence[int] | torch.Tensor) -> float:
        """1.0 iff the completion is exactly the reversed sum followed by ``<eos>`` (tokens after it ignored)."""
        p = [int(t) for t in prompt]
        n = self.n_digits
        if len(p) != self.prompt_len or p[n] != PLUS or p[-1] != EQUALS:
            raise ValueError(f"not a prompt of this task: {self.decode(p)!r}")
        a = int("".join(map(str, p[:n])))
        b = int("".join(map(str, p[n + 1:2 * n + 1])))
        want = self.answer(a, b)
        got = [int(t) for t in completion][: len(want)]
        return float(got == want)

    def rewards(self, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
        """Batched :meth:`reward`: [B] float tensor of 0/1 (vectorised; equals the loop)."""
        n = self.n_digits
        pw = 10 ** torch.arange(n - 1, -1, -1)
        a = (prompts[:, :n] * pw).sum(1)
        b = (prompts[:, n + 1:2 * n + 1] * pw).sum(1)
        s = a + b
        want = torch.stack([(s // 10 ** i) % 10 for i in range(n + 1)] + [torch.full_like(s, EOS)], 1)
        got = completions[:, : n + 2]
        if got.shape[1] < n + 2:
            return torch.zeros(len(s))
        return (got == want).all(1).float()

"""Turn (prompt, response) pairs into the token ids the reward model was trained on.

The text is the tokenizer's chat template of ``[user: prompt, assistant: response]`` without a generation
prompt, exactly what TRL's RewardTrainer tokenizes for conversational preference data. The reward is read on
the last token, so a pair longer than ``max_length`` loses the *head of its prompt* first; only when the whole
prompt is gone does the head of the response go. The end of a response is never cut, and every cut is counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer

# Private-use code points: a template will not produce them on its own, so they mark where content lands.
_PROMPT_MARK = "\ue000prompt\ue001"
_RESPONSE_MARK = "\ue000response\ue001"


@dataclass(frozen=True)
class Encoded:
    """One templated pair: ``ids`` (list of token ids, at most max_length) and the tokens cut from it."""

    ids: list[int]
    prompt_tokens_dropped: int = 0
    response_tokens_dropped: int = 0


def _conversation(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


class PairEncoder:
    """Chat-template, tokenize and truncate pairs; thread-safe (several threads may encode at once).

    ``tokenizer`` must be a fast (Rust) tokenizer with a chat template: character offsets tell which tokens
    belong to the prompt and which to the response.
    """

    def __init__(self, tokenizer, max_length: int):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the reward server needs a fast tokenizer (a tokenizer.json next to the model)")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the model's tokenizer has no chat template; save the tokenizer the reward model was trained with"
            )
        self.tokenizer = tokenizer
        self.max_length = max_length
        # The Rust tokenizer itself, called directly: it encodes from several threads at once, but transformers'
        # __call__ may first change its truncation or padding, which fails while another thread encodes. A
        # tokenizer saved with truncation, padding or split special tokens gets a copy without (what __call__
        # would set), so that this one is never changed.
        backend = tokenizer.backend_tokenizer
        if backend.truncation or backend.padding or backend.encode_special_tokens:
            backend = Tokenizer.from_str(backend.to_str())
            backend.no_truncation()
            backend.no_padding()
            backend.encode_special_tokens = False
        self._backend = backend
        skeleton = self._render(_PROMPT_MARK, _RESPONSE_MARK)
        if skeleton.count(_PROMPT_MARK) != 1 or skeleton.count(_RESPONSE_MARK) != 1:
            raise ValueError("the chat template does not insert the user and assistant content once each")
        self._prompt_at = skeleton.index(_PROMPT_MARK)
        self._gap = skeleton.index(_RESPONSE_MARK) - self._prompt_at - len(_PROMPT_MARK)
        overhead = len(backend.encode(skeleton.replace(_PROMPT_MARK, "").replace(_RESPONSE_MARK, ""),
                                      add_special_tokens=False).ids)
        # Room for the template and a meaningful piece of the response.
        if max_length < overhead + 16:
            raise ValueError(
                f"max_length={max_length} leaves under 16 tokens for content after the chat template's "
                f"{overhead} tokens; raise --max-length"
            )

    def _render(self, prompt: str, response: str) -> str:
        return self.tokenizer.apply_chat_template(_conversation(prompt, response), tokenize=False)

    def _spans(self, text: str, prompt: str, response: str) -> tuple[tuple[int, int], tuple[int, int]]:
        """Character spans of prompt and response in ``text``. Templates that rewrite content (e.g. ones
        that move a reasoning block) are handled by search; an unplaceable span is empty."""
        p0 = self._prompt_at
        if text[p0:p0 + len(prompt)] != prompt:
            p0 = text.find(prompt)
        r0 = (p0 + len(prompt) + self._gap) if p0 >= 0 else -1
        if r0 < 0 or text[r0:r0 + len(response)] != response:
            r0 = text.rfind(response) if response else -1
        prompt_span = (p0, p0 + len(prompt)) if p0 >= 0 else (0, 0)
        response_span = (r0, r0 + len(response)) if r0 >= 0 else (len(text), len(text))
        return prompt_span, response_span

    def encode(self, prompts: list[str], responses: list[str]) -> list[Encoded]:
        """Encode equally long lists of prompts and responses, in order."""
        texts = [self._render(p, r) for p, r in zip(prompts, responses)]
        out = []
        for text, p, r, encoding in zip(texts, prompts, responses,
                                        self._backend.encode_batch(texts, add_special_tokens=False)):
            ids = encoding.ids
            excess = len(ids) - self.max_length
            if excess <= 0:
                out.append(Encoded(ids))
                continue
            prompt_span, response_span = self._spans(text, p, r)
            out.append(self._truncate(ids, encoding.offsets, prompt_span, response_span, excess))
        return out

    @staticmethod
    def _truncate(ids, offsets, prompt_span, response_span, excess) -> Encoded:
        """Remove ``excess`` tokens: the prompt's first ones, then (whole prompt gone) the response's first."""
        def token_range(span, absent):
            inside = [i for i, (s, e) in enumerate(offsets) if span[0] <= s < span[1] and e > s]
            return (inside[0], inside[-1] + 1) if inside else (absent, absent)

        r_lo, r_hi = token_range(response_span, len(ids))
        p_lo, p_hi = token_range(prompt_span, r_lo)
        drop_p = min(excess, p_hi - p_lo)
        drop_r = min(excess - drop_p, r_hi - r_lo)
        ids = ids[:p_lo] + ids[p_lo + drop_p:r_lo] + ids[r_lo + drop_r:]
        left = excess - drop_p - drop_r
        if left > 0:
            # Content could not be placed (a template that rewrites it): keep the end, where the reward is read.
            ids = ids[left:]
            drop_r += left
        return Encoded(ids, drop_p, drop_r)

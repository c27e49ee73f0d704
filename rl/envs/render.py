"""Observation tokens: the environment's messages rendered with the model's chat template, as ids to append.

The conversation so far is never re-rendered or re-tokenised: the model's turns stay the ids it
generated. Only what follows a turn is rendered: the template applied to a stand-in conversation
with and without the observation tells which text closes an assistant turn and opens the next
one (for ChatML: `<|im_end|>\n<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n`). A
closing end-of-turn token the model already generated is not repeated.
"""

from __future__ import annotations

MARK = "\u2063OBS\u2063"
"""Stand-in assistant content whose end marks where a turn's own text stops in the rendering."""


class ObservationRenderer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.end_ids = {tokenizer.eos_token_id} - {None}
        eos = tokenizer.eos_token
        self.end_text = eos if isinstance(eos, str) else None

    def _template(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def render(self, turn_ids: list[int], messages: list[dict[str, str]]) -> list[int]:
        """Ids to append after a turn (`turn_ids`, as generated) so the model sees `messages` and answers next."""
        head = [{"role": "user", "content": "q"}, {"role": "assistant", "content": MARK}]
        text = self._template(head + list(messages), True)
        cut = text.find(MARK)
        if cut < 0:
            raise ValueError("the chat template dropped the assistant turn; cannot render observations")
        suffix = text[cut + len(MARK) :]
        if turn_ids and turn_ids[-1] in self.end_ids and self.end_text and suffix.startswith(self.end_text):
            suffix = suffix[len(self.end_text) :]  # the model closed its turn itself
        return list(self.tokenizer(suffix, add_special_tokens=False)["input_ids"])

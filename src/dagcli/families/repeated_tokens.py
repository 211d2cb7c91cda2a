"""Joint attention in which the text stream's last token stands for n identical tokens.

An SD3 pipeline without T5 appends `max_sequence_length` (256) zero token embeddings to the CLIP tokens. They
enter the transformer identical and stay identical through every block (each token is projected, normalised and
fed forward on its own, and the text stream has no positional embedding), so:

- as keys and values, n identical tokens act as one token whose softmax weight is n times larger, i.e. whose
  attention logit is larger by log n;
- as queries, they give n identical rows: computing one of them suffices.

`RepeatedTokenAttention` wraps the transformer's own processor. Called with `repeated_tokens=n` (through the
transformer's `joint_attention_kwargs`) on a text stream whose last token stands for n of them, it computes the
joint attention of the whole sequence on the short one; called without it (the plain pipeline, the dual
attention of SD3.5's image-only `attn2`) it is the wrapped processor, unchanged. For tiny-flow this turns 336
tokens into 81; the results differ from the full sequence by float32 rounding (relative ~1e-6).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KWARG = "repeated_tokens"  # the `joint_attention_kwargs` key
# log n is added to the logits in the query's dtype: exact enough in float32 / float64 only (bfloat16 would round
# log 256 = 5.545 to 5.531 or 5.562, 1.5 % of that key's weight); other dtypes run the full sequence.
SHORT_DTYPES = (torch.float32, torch.float64)


class RepeatedTokenAttention:
    """A joint-attention processor (`attn.processor`) with the repeated-last-token shortcut."""

    def __init__(self, base) -> None:
        self.base = base

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, repeated_tokens: int = 1, **kwargs):
        if encoder_hidden_states is None or repeated_tokens <= 1:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if attention_mask is not None or kwargs or hidden_states.dtype not in SHORT_DTYPES:
            return self._expanded(attn, hidden_states, encoder_hidden_states, attention_mask, repeated_tokens,
                                  **kwargs)
        return self._short(attn, hidden_states, encoder_hidden_states, repeated_tokens)

    def _expanded(self, attn, hidden_states, encoder_hidden_states, attention_mask, copies: int, **kwargs):
        """The wrapped processor on the full sequence (the last token repeated), cut back to the short one."""
        length = encoder_hidden_states.shape[1]
        img, ctx = self.base(attn, hidden_states, expand(encoder_hidden_states, copies), attention_mask, **kwargs)
        return img, None if ctx is None else ctx[:, :length]

    @staticmethod
    def _heads(attn, x: torch.Tensor, projections, norms) -> list[torch.Tensor]:
        """q, k, v of one stream: (B, L, heads * d) -> (B, heads, L, d), with the q / k norms."""
        q, k, v = (p(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2) for p in projections)
        return [q if norms[0] is None else norms[0](q), k if norms[1] is None else norms[1](k), v]

    def _short(self, attn, hidden_states, encoder_hidden_states, copies: int):
        """`JointAttnProcessor2_0`'s arithmetic with log(copies) added to the last key's logit."""
        n = hidden_states.shape[1]
        image = self._heads(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
        text = self._heads(attn, encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                           (attn.norm_added_q, attn.norm_added_k))
        q, k, v = (torch.cat(pair, dim=2) for pair in zip(image, text, strict=True))
        bias = torch.zeros(1, k.shape[2], dtype=q.dtype, device=q.device)  # added to every query's logits
        bias[0, -1] = math.log(copies)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(2).to(q.dtype)
        img, ctx = out[:, :n], out[:, n:]
        img = attn.to_out[1](attn.to_out[0](img))
        return img, ctx if attn.context_pre_only else attn.to_add_out(ctx)


def install(transformer) -> None:
    """Wrap every attention processor of `transformer` (once); without the keyword nothing changes."""
    processors = transformer.attn_processors
    if all(isinstance(p, RepeatedTokenAttention) for p in processors.values()):
        return
    transformer.set_attn_processor({name: p if isinstance(p, RepeatedTokenAttention) else RepeatedTokenAttention(p)
                                    for name, p in processors.items()})


def expand(embeds: torch.Tensor, copies: int) -> torch.Tensor:
    """The full sequence: the last token of `embeds` [B, L, D] repeated to stand `copies` times."""
    return torch.cat([embeds, embeds[:, -1:].expand(-1, copies - 1, -1)], dim=1)

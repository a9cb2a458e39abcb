"""Layer-wise concept tokens: each concept token has one input embedding per token slot, and each cross-attention
layer reads one slot.

A prompt such as "a <dog> on a beach" is expanded to the concept's tokens ("a <dog1> <dog2> on a beach") and encoded
once per slot s with every token replaced by its slot-s embedding; layer l's attn2 then attends to the encoding of
its slot. The token slots (`token_slots[l]`, the slot of layer l) are one per layer, as the CIDM paper has it
(Sec. 3.3, one token embedding per layer, after P+ and Mix-of-Show), or one shared by several layers (the layers of
one SDXL transformer stack: `cidm.family.ModelFamily.token_slots`), which takes fewer text-encoder passes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

import torch

from .errors import CIDMInputError
from .layers import tensor_fingerprint
from .names import MARKER_PATTERN, TOKEN_PATTERN, name_key
from .routing import NamedConcept

# σ of the first token's random start: `<rand-0.013>` in the official code's task 1 (JiahuaDong/CIFC@9819aa8
# `options/cidm/task_1.yml`, initializer_token; later tasks use 0.011-0.020).
RANDOM_INIT_STD = 0.013
FINGERPRINT_ROWS = 2048  # token-embedding rows hashed: enough to tell text encoders apart, cheap to read


def check_token_slots(token_slots: list[int] | None, num_layers: int, input_name: str = "library") -> list[int]:
    """`token_slots` as a list of ints after checking it maps `num_layers` layers to slots 0..S-1 numbered in order of
    first use (so every slot is used and the identity map is one slot per layer); None is one slot per layer.

    Raises:
        CIDMInputError: (`input_name`) saying what is wrong.
    """
    slots = list(range(num_layers) if token_slots is None else token_slots)
    if len(slots) != num_layers or not all(isinstance(s, int) and not isinstance(s, bool) for s in slots):
        raise CIDMInputError(input_name, f"token slots {slots!r} do not map {num_layers} layers to slot numbers")
    seen = 0
    for slot in slots:
        if not 0 <= slot <= seen:
            raise CIDMInputError(input_name, f"token slots {slots!r} are not numbered 0, 1, ... in order of first use")
        seen = max(seen, slot + 1)
    return slots


def layers_from_slots(encoded: torch.Tensor, token_slots: list[int]) -> torch.Tensor:
    """[S, ...] per slot -> [L, ...] per layer: layer l takes slot token_slots[l]'s row (differentiably)."""
    if token_slots == list(range(encoded.shape[0])):
        return encoded
    return encoded[torch.tensor(token_slots, device=encoded.device)]


@dataclass(frozen=True)
class ConceptVocabulary:
    """What a prompt may name: concept names (`<dog>`) expand to their tokens; tokens (`<dog1>`) stand for
    themselves. `embeddings[token]` is that token's [S, D] embedding, one row per token slot."""

    concept_tokens: dict[str, list[str]]  # concept name -> its tokens
    embeddings: dict[str, torch.Tensor]

    @cached_property
    def _markers(self) -> dict[str, str]:
        """`name_key` of every `<name>` and token -> what it stands for (tokens win, as they are checked first)."""
        markers = {name_key(f"<{name}>"): " ".join(tokens) for name, tokens in self.concept_tokens.items()}
        markers.update({name_key(token): token for token in self.embeddings})
        return markers

    def expand(self, text: str, input_name: str = "text") -> str:
        """`text` with every marker (`cidm.names.MARKER_PATTERN`) replaced: a concept's `<name>` by its tokens, a
        token by its stored spelling. Markers compare by `name_key`, so `<My Dog>` names the concept `my dog`.

        Raises:
            CIDMInputError: `input_name`, for a `<…>` that is neither a concept nor a token, listing the known ones.
        """
        def replace(match: re.Match) -> str:
            word = match.group(0)
            # The exact spelling first: a library from before names were unique ignoring case may hold `Cat` and `cat`.
            if word in self.embeddings:
                return word
            if word[1:-1] in self.concept_tokens:
                return " ".join(self.concept_tokens[word[1:-1]])
            if name_key(word) in self._markers:
                return self._markers[name_key(word)]
            known = ", ".join(f"<{n}>" for n in self.concept_tokens) or "none (the library is empty)"
            raise CIDMInputError(input_name, f"unknown concept {word}; known concepts (any case): {known}")
        return MARKER_PATTERN.sub(replace, text)

    def tokens_in(self, text: str) -> list[str]:
        return [t for t in TOKEN_PATTERN.findall(text) if t in self.embeddings]

    def named_concepts(self, text: str, positions: list[int]) -> tuple[NamedConcept, ...]:
        """The concepts an expanded prompt names, in the order they first occur, each with its tokens and their
        context positions; `positions[i]` is where the i-th token of `tokens_in(text)` sits in the context (the
        encoder's `token_positions`)."""
        owner = {token: name for name, tokens in self.concept_tokens.items() for token in tokens}
        found: dict[str, tuple[list[str], list[int]]] = {}
        for token, position in zip(self.tokens_in(text), positions):
            tokens, places = found.setdefault(owner.get(token, token), ([], []))
            if token not in tokens:
                tokens.append(token)
            places.append(position)
        return tuple(NamedConcept(name, tuple(tokens), tuple(places)) for name, (tokens, places) in found.items())


def initial_embeddings(num_tokens: int, num_slots: int, dim: int, class_vectors: list[torch.Tensor | None],
                       generator: torch.Generator, random_std: float = RANDOM_INIT_STD) -> torch.Tensor:
    """[n, S, D]: token 0 (and any token without a class word) starts random with σ = `random_std`, the others from
    their class word's input embedding, copied to every slot."""
    rows = []
    for index in range(num_tokens):
        vector = class_vectors[index] if index < len(class_vectors) else None
        if vector is None or index == 0:
            vector = torch.randn(dim, generator=generator) * random_std
        rows.append(vector.detach().float().expand(num_slots, dim))
    return torch.stack(rows).clone()


def mean_embedding_norm(embeddings: torch.Tensor, width: int | None = None) -> float:
    """Mean L2 norm over all (token, slot) rows of `embeddings` [n, S, D], reading the first `width` features only
    (None: all). The official code freezes the embeddings once this reaches `emb_norm_threshold` = 0.55 for SD1.5's
    CLIP-L (JiahuaDong/CIFC@9819aa8 `train.py`, `options/cidm/task_*.yml`). On SDXL a row joins CLIP-L's 768 and
    CLIP-G's 1280 features, so the whole row's norm is not the rule's: a random start of σ 0.013 alone has norm
    0.013·√2048 ≈ 0.59, past the threshold before any step. The rule reads the CLIP-L part (`LayerwiseTextEncoder.
    norm_width`), the same text encoder the threshold was set for."""
    rows = embeddings.detach() if width is None else embeddings.detach()[..., :width]
    return rows.norm(dim=-1).mean().item()


class LayerwiseTextEncoder(Protocol):
    """Encodes a prompt once per token slot with the slot's concept-token embeddings, for every cross-attention
    layer the contexts of its slot."""

    num_layers: int
    token_slots: list[int]  # [L]: the slot of each layer (check_token_slots)
    num_slots: int  # S
    tokens_per_layer: int
    norm_width: int  # the leading features of an embedding that the freeze rule reads (`mean_embedding_norm`)

    def encode(self, text: str, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        """[L, T, D]; differentiable with respect to `embeddings` (token -> [S, D])."""
        ...

    def word_embedding(self, word: str) -> torch.Tensor | None:
        """The input embedding of a word that is a single token, else None."""
        ...


def pack_layer_contexts(contexts: torch.Tensor) -> torch.Tensor:
    """[B, L, T, D] -> [B, L·T, D]: the transport through an ordinary CONDITIONING tensor."""
    batch, layers, tokens, dim = contexts.shape
    return contexts.reshape(batch, layers * tokens, dim)


def concept_features(encoder: LayerwiseTextEncoder, tokens: list[str], embeddings: torch.Tensor) -> torch.Tensor:
    """[n, L, D]: each token's encoding inside the prompt made of the concept's tokens alone (after BOS), per
    layer (`embeddings` [n, S, D]). Stored with the task, so routing needs no text encoder and does not depend on
    the other tasks."""
    table = {token: embeddings[i] for i, token in enumerate(tokens)}
    with torch.no_grad():
        encoded = encoder.encode(" ".join(tokens), table)  # [L, T, D]
    return encoded[:, 1:1 + len(tokens)].transpose(0, 1).contiguous()


def vocabulary_from_tasks(concepts: list[str], tokens: list[list[str]],
                          embeddings: list[torch.Tensor]) -> ConceptVocabulary:
    """The vocabulary of a library's tasks (each task's embeddings are [n_tokens, S, D])."""
    table = {}
    for task_tokens, task_embeddings in zip(tokens, embeddings):
        table.update({token: task_embeddings[i] for i, token in enumerate(task_tokens)})
    return ConceptVocabulary(concept_tokens=dict(zip(concepts, tokens)), embeddings=table)


def token_embedding_fingerprint(table: torch.Tensor) -> str:
    """Which text encoder a library was trained with: a hash of the first rows of its token-embedding table
    [vocab, D] (fp32 values)."""
    return tensor_fingerprint([("token_embedding", table[:FINGERPRINT_ROWS])])

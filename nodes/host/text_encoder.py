"""cidm's LayerwiseTextEncoder over a ComfyUI CLIP (SD1.5's CLIP-L)."""

from __future__ import annotations

import contextlib
import logging

import torch

from ...cidm.errors import CIDMInputError
from ...cidm.tokens import TOKEN_PATTERN, token_embedding_fingerprint

TOKENS_PER_LAYER = 77
TEXT_ENCODER_KEY = "text_encoder"  # the library's base_model entry: the fingerprint of the CLIP it was trained with
# Single-BPE words used as placeholders for concept tokens while tokenizing; the first one absent from the prompt
# is used, so a user's own words are never mistaken for a concept token.
SENTINEL_WORDS = ("sks", "xqz", "zwx", "qxv")


class ComfyLayerwiseEncoder:
    """cidm's LayerwiseTextEncoder over a ComfyUI CLIP: one encode per layer with the layer's token embeddings
    inserted as embedding tensors (ComfyUI's tokenizer accepts tensors in place of token ids)."""

    def __init__(self, clip, num_layers: int):
        self.clip = clip
        self.num_layers = num_layers
        self.tokens_per_layer = TOKENS_PER_LAYER
        self.text_model = self._text_model()

    def _text_model(self):
        encoder = self.clip.cond_stage_model
        for attribute in ("clip_l", "clip_g", "transformer"):
            candidate = getattr(encoder, attribute, None)
            if candidate is not None and hasattr(candidate, "transformer"):
                return candidate.transformer
        raise CIDMInputError("clip", "unsupported text encoder; supported: SD1.5's CLIP-L")

    def _chunks(self, text: str) -> list[list[tuple]]:
        """ComfyUI's tokenization: one 77-token chunk (start, 75 tokens, end and padding) per 75 tokens of text."""
        tokenized = self.clip.tokenize(text)
        if len(tokenized) != 1:
            raise CIDMInputError("clip", "unsupported text encoder (more than one tokenizer); supported: SD1.5")
        return next(iter(tokenized.values()))

    def _token_ids(self, text: str) -> list[tuple]:
        return self._chunks(text)[0]

    def _sentinel(self, text: str) -> tuple[str, int]:
        for word in SENTINEL_WORDS:
            ids = [entry[0] for entry in self._token_ids(word)]
            if word not in text.lower() and isinstance(ids[1], int) and ids[2] == ids[-1]:
                return word, ids[1]
        raise CIDMInputError("text", f"the prompt uses every placeholder word {SENTINEL_WORDS}; rephrase it")

    def word_embedding(self, word: str) -> torch.Tensor | None:
        ids = [entry[0] for entry in self._token_ids(word)]
        body = [i for i in ids[1:] if i != ids[-1]]  # drop BOS and the EOS/padding run
        if len(body) != 1:
            return None
        table = self.text_model.get_input_embeddings().weight
        return table[body[0]].detach().float().clone()

    def encode_with_pooled(self, text: str, embeddings: dict[str, torch.Tensor], whole: bool = True):
        """([L, k·77, D], pooled) for a prompt whose concept tokens are keys of `embeddings` (token -> [L, D]).

        A prompt longer than 75 tokens is k 77-token chunks joined along the tokens, as ComfyUI's CLIPTextEncode
        joins them, and a concept token may sit in any chunk. `whole=False` keeps the first chunk only (k = 1),
        for training, whose batches need one length.

        Raises:
            CIDMInputError: ("text") when, with `whole=False`, a concept token falls past the first 75 tokens.
        """
        occurrences = [t for t in TOKEN_PATTERN.findall(text) if t in embeddings]
        word, sentinel = self._sentinel(text)
        substituted = TOKEN_PATTERN.sub(lambda m: word if m.group(0) in embeddings else m.group(0), text)
        base = self._chunks(substituted)
        if not whole and len(base) > 1:
            logging.warning("CIDM: training prompt longer than 75 tokens, truncated to the first 77-token chunk: %r",
                            text)
            base = base[:1]
        positions = [(chunk, i) for chunk, ids in enumerate(base) for i, entry in enumerate(ids)
                     if entry[0] == sentinel]
        if len(positions) != len(occurrences):
            raise CIDMInputError("text", f"{occurrences[len(positions)]} falls past the first 75 tokens of the "
                                         f"training prompt {text!r}, which is all training reads; shorten the caption")
        tokenizer_key = next(iter(self.clip.tokenize("")))
        chunks = []
        for layer in range(self.num_layers):
            tokens = [list(ids) for ids in base]
            for (chunk, i), token in zip(positions, occurrences):
                tokens[chunk][i] = (embeddings[token][layer],) + tuple(base[chunk][i][1:])
            chunks += tokens
        # ComfyUI encodes a prompt's 77-token chunks as one batch and joins them along the token axis, so one call
        # with the chunks of every layer runs the text encoder once and returns the packed [1, L·k·77, D] layout.
        cond, pooled = self.clip.encode_from_tokens({tokenizer_key: chunks}, return_pooled=True)
        return cond[0].reshape(self.num_layers, len(base) * TOKENS_PER_LAYER, -1), pooled

    def encode(self, text: str, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        """[L, 77, D]: the training encoding (the first chunk, `encode_with_pooled` with whole=False)."""
        if not torch.is_grad_enabled():
            return self.encode_with_pooled(text, embeddings, whole=False)[0]
        with _out_of_place_residuals(self.text_model):
            return self.encode_with_pooled(text, embeddings, whole=False)[0]


def _residual_forward(layer):
    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


@contextlib.contextmanager
def _out_of_place_residuals(text_model: torch.nn.Module):
    """ComfyUI's CLIPLayer adds its residuals in place (x += ...), which autograd rejects once the token embeddings
    require grad. While training, each layer runs the same arithmetic out of place."""
    layers = [m for m in text_model.modules() if all(hasattr(m, a) for a in
                                                     ("self_attn", "layer_norm1", "mlp", "layer_norm2"))]
    for layer in layers:
        layer.forward = _residual_forward(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def text_encoder_fingerprint(encoder: ComfyLayerwiseEncoder) -> str:
    """A short hash of the CLIP's first token-embedding rows: which text encoder a library was trained with."""
    return token_embedding_fingerprint(encoder.text_model.get_input_embeddings().weight)


def check_text_encoder(library, fingerprint: str) -> None:
    """Raises CIDMInputError naming `clip` when the library records another text encoder (libraries written before
    the fingerprint was recorded are not checked)."""
    expected = library.base_model.get(TEXT_ENCODER_KEY)
    if expected is not None and expected != fingerprint:
        raise CIDMInputError("clip", f"library {library.name} was trained with text encoder {expected}, this CLIP is "
                                     f"{fingerprint}; connect the CLIP of the checkpoint the library was trained on")

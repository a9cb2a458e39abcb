"""cidm's LayerwiseTextEncoder over a ComfyUI CLIP of any supported family (cidm.family)."""

from __future__ import annotations

import contextlib
import logging

import torch

from ...cidm.errors import CIDMInputError
from ...cidm.tokens import TOKEN_PATTERN, check_token_slots, layers_from_slots, token_embedding_fingerprint
from .family import clip_family

TEXT_ENCODER_KEY = "text_encoder"  # the library's base_model entry: the fingerprint of the CLIP it was trained with
# Single-BPE words used as placeholders for concept tokens while tokenizing; the first one absent from the prompt
# is used, so a user's own words are never mistaken for a concept token.
SENTINEL_WORDS = ("sks", "xqz", "zwx", "qxv")


class ComfyLayerwiseEncoder:
    """cidm's LayerwiseTextEncoder over a ComfyUI CLIP: one encode per token slot with the slot's token embeddings
    inserted as embedding tensors (ComfyUI's tokenizer accepts tensors in place of token ids,
    comfy/sd1_clip.py:179-224, v0.3.75).

    Every text tower of the CLIP's family (cidm.family: CLIP-L for SD1.5; CLIP-L and CLIP-G for SDXL) gets the
    same prompt with the concept tokens at the same positions; a token's embedding for one slot is the towers'
    embeddings joined in tower order ([768] for SD1.5, [768 | 1280] for SDXL), each tower taking its slice. The
    output joins the towers' hidden states in the same order, as ComfyUI does (comfy/sdxl_clip.py:56-62)."""

    def __init__(self, clip, num_layers: int, token_slots: list[int] | None = None):
        """`token_slots`: the token slot of each layer (a library's `token_slots`); None, one per layer."""
        self.clip = clip
        self.family = clip_family(clip)
        self.num_layers = num_layers
        self.token_slots = check_token_slots(token_slots, num_layers, "token_slots")
        self.num_slots = max(self.token_slots) + 1
        self.tokens_per_layer = self.family.tokens_per_chunk
        self.norm_width = self.family.towers[0].width  # CLIP-L's part: the freeze rule's (cidm.tokens)
        self.text_models = [self._text_model(tower.key) for tower in self.family.towers]

    def _text_model(self, key: str):
        """The CLIP text transformer of tower `key` ("l": SD1ClipModel.clip_l, "g": SDXLClipModel.clip_g)."""
        candidate = getattr(self.clip.cond_stage_model, f"clip_{key}", None)
        if candidate is None or not hasattr(candidate, "transformer"):
            raise CIDMInputError("clip", f"no {key.upper()} text tower in this {self.family.name} CLIP")
        return candidate.transformer

    def _chunks(self, text: str) -> dict[str, list[list[tuple]]]:
        """ComfyUI's tokenization per tower: one 77-token chunk (start, 75 tokens, end and padding) per 75 tokens
        of text."""
        tokenized = self.clip.tokenize(text)
        return {tower.key: tokenized[tower.key] for tower in self.family.towers}

    def _token_ids(self, text: str) -> list[int]:
        """The first chunk's ids of the first tower (CLIP-L, which pads with its end token)."""
        return [entry[0] for entry in self._chunks(text)[self.family.towers[0].key][0]]

    def _sentinel(self, text: str) -> tuple[str, int]:
        for word in SENTINEL_WORDS:
            ids = self._token_ids(word)
            if word not in text.lower() and isinstance(ids[1], int) and ids[2] == ids[-1]:
                return word, ids[1]
        raise CIDMInputError("text", f"the prompt uses every placeholder word {SENTINEL_WORDS}; rephrase it")

    def input_embeddings(self) -> torch.Tensor:
        """[vocab, D]: the towers' token-embedding tables joined in tower order (one vocabulary for all towers)."""
        return torch.cat([model.get_input_embeddings().weight for model in self.text_models], dim=-1)

    def word_embedding(self, word: str) -> torch.Tensor | None:
        ids = self._token_ids(word)
        body = [i for i in ids[1:] if i != ids[-1]]  # drop BOS and the EOS/padding run
        if len(body) != 1:
            return None
        return torch.cat([model.get_input_embeddings().weight[body[0]] for model in self.text_models]).detach() \
            .float().clone()

    def _substituted(self, text: str, embeddings: dict[str, torch.Tensor]) -> tuple[list[str], int | None, dict]:
        """(the concept tokens of `embeddings` in `text`, in order; the placeholder word's id, None when there are
        none; each tower's chunks (`_chunks`) of the text with every concept token replaced by the placeholder)."""
        occurrences = [t for t in TOKEN_PATTERN.findall(text) if t in embeddings]
        word, sentinel = self._sentinel(text) if occurrences else (None, None)
        substituted = TOKEN_PATTERN.sub(lambda m: word if m.group(0) in embeddings else m.group(0), text)
        return occurrences, sentinel, self._chunks(substituted)

    def token_positions(self, text: str, embeddings: dict[str, torch.Tensor]) -> list[int]:
        """Where each concept-token occurrence of `text` sits in the packed context [k·77] that `encode_with_pooled`
        returns (chunk · 77 + index in the chunk), read from the first tower (every tower tokenizes alike)."""
        _, sentinel, towers = self._substituted(text, embeddings)
        return [chunk * self.tokens_per_layer + i for chunk, ids in enumerate(towers[self.family.towers[0].key])
                for i, entry in enumerate(ids) if entry[0] == sentinel]

    def encode_with_pooled(self, text: str, embeddings: dict[str, torch.Tensor], whole: bool = True):
        """([L, k·77, D], pooled) for a prompt whose concept tokens are keys of `embeddings` (token -> [S, D], D
        the towers' widths joined), encoded once per token slot; layer l gets its slot's encoding.

        A prompt longer than 75 tokens is k 77-token chunks joined along the tokens, as ComfyUI's CLIPTextEncode
        joins them, and a concept token may sit in any chunk. `whole=False` keeps the first chunk only (k = 1),
        for training, whose batches need one length. A prompt naming no concept is encoded once and shared by
        every layer, exactly as CLIPTextEncode encodes it (so it samples the base model bit for bit).

        The pooled output is ComfyUI's for the packed prompt: that of its first chunk (comfy/sd1_clip.py:48-49),
        i.e. of slot 0's (layer 0's) first chunk, through the family's pooling tower (SDXL: CLIP-G's projected end
        token, the UNet's ADM input; SD1.5: CLIP-L's, unused by its UNet).

        Raises:
            CIDMInputError: ("text") when, with `whole=False`, a concept token falls past the first 75 tokens.
        """
        occurrences, sentinel, towers = self._substituted(text, embeddings)
        first = towers[self.family.towers[0].key]
        if not whole and len(first) > 1:
            logging.warning("CIDM: training prompt longer than 75 tokens, truncated to the first 77-token chunk: %r",
                            text)
            towers = {key: chunks[:1] for key, chunks in towers.items()}
        if not occurrences:  # every layer sees the same prompt: encoded once, exactly as CLIPTextEncode encodes it
            cond, pooled = self.clip.encode_from_tokens(towers, return_pooled=True)
            return cond[0][None].expand(self.num_layers, -1, -1), pooled
        packed, start = {}, 0
        for tower in self.family.towers:
            base = towers[tower.key]
            positions = [(chunk, i) for chunk, ids in enumerate(base) for i, entry in enumerate(ids)
                         if entry[0] == sentinel]
            if len(positions) != len(occurrences):
                raise CIDMInputError("text", f"{occurrences[len(positions)]} falls past the first 75 tokens of the "
                                             f"training prompt {text!r}, which is all training reads; shorten the "
                                             "caption")
            packed[tower.key] = []
            for slot in range(self.num_slots):
                tokens = [list(ids) for ids in base]
                for (chunk, i), token in zip(positions, occurrences):
                    own = embeddings[token][slot][start:start + tower.width]
                    tokens[chunk][i] = (own,) + tuple(base[chunk][i][1:])
                packed[tower.key] += tokens
            start += tower.width
        # ComfyUI encodes a prompt's 77-token chunks as one batch and joins them along the token axis, so one call
        # with the chunks of every slot runs each text tower once and returns the packed [1, S·k·77, D] layout.
        cond, pooled = self.clip.encode_from_tokens(packed, return_pooled=True)
        chunks = len(packed[self.family.towers[0].key]) // self.num_slots
        slots = cond[0].reshape(self.num_slots, chunks * self.tokens_per_layer, -1)
        return layers_from_slots(slots, self.token_slots), pooled

    def encode_pooled(self, text: str, embeddings: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """([L, 77, D], pooled [1, P]): the training encoding (the first chunk, `encode_with_pooled` with
        whole=False), differentiable with respect to `embeddings` while grad is enabled."""
        if not torch.is_grad_enabled():
            return self.encode_with_pooled(text, embeddings, whole=False)
        with _out_of_place_residuals(self.text_models):
            return self.encode_with_pooled(text, embeddings, whole=False)

    def encode(self, text: str, embeddings: dict[str, torch.Tensor]) -> torch.Tensor:
        """[L, 77, D]: the contexts of the training encoding (`encode_pooled`)."""
        return self.encode_pooled(text, embeddings)[0]


def _residual_forward(layer):
    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


@contextlib.contextmanager
def _out_of_place_residuals(text_models: list[torch.nn.Module]):
    """ComfyUI's CLIPLayer adds its residuals in place (x += ...), which autograd rejects once the token embeddings
    require grad. While training, each layer runs the same arithmetic out of place."""
    layers = [m for text_model in text_models for m in text_model.modules()
              if all(hasattr(m, a) for a in ("self_attn", "layer_norm1", "mlp", "layer_norm2"))]
    for layer in layers:
        layer.forward = _residual_forward(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def text_encoder_fingerprint(encoder: ComfyLayerwiseEncoder) -> str:
    """A short hash of the CLIP's first token-embedding rows (every tower's, joined): which text encoder a library
    was trained with."""
    return token_embedding_fingerprint(encoder.input_embeddings())


def check_text_encoder(library, fingerprint: str) -> None:
    """Raises CIDMInputError naming `clip` when the library records another text encoder (libraries written before
    the fingerprint was recorded are not checked)."""
    expected = library.base_model.get(TEXT_ENCODER_KEY)
    if expected is not None and expected != fingerprint:
        raise CIDMInputError("clip", f"library {library.name} was trained with text encoder {expected}, this CLIP is "
                                     f"{fingerprint}; connect the CLIP of the checkpoint the library was trained on")

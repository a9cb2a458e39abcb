"""Translates the Train Concept Increment node's inputs into a cidm training run and writes the library."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

import comfy.model_management
import comfy.utils
from server import PromptServer

from ..cidm.consolidation import CONSOLIDATORS, METHODS
from ..cidm.data import build_training_set, examples_from_image_batch, load_concept_folder
from ..cidm.errors import CIDMInputError
from ..cidm.family import TOKEN_SLOT_RULES, ModelFamily
from ..cidm.library import ConceptLibrary, TaskData, TaskRecord, bytes_for_task, validate_name, validate_tokens
from ..cidm.names import automatic_tokens
from ..cidm.plots import line_plot
from ..cidm.tokens import TOKEN_PATTERN
from ..cidm.train import ConceptSpec, ConceptTrainer, TrainingCallbacks, TrainingConfig
from .common import input_root, input_subfolder, library_ref
from .host.denoiser import ComfyDenoiser
from .host.family import model_family
from .host.model import base_model_info, check_trainable, check_unpatched
from .host.text_encoder import TEXT_ENCODER_KEY, ComfyLayerwiseEncoder, check_text_encoder, text_encoder_fingerprint

LOG_EVERY = 10
PREVIEW_STEPS = 12
PREVIEW_CFG = 5.0
PREVIEW_MAX_SIDE = 512


def parse_tokens(concept: str, tokens: str) -> list[str]:
    """Explicit tokens ("<dog1> <dog2>"), or [] when none are given (the library then picks automatic ones)."""
    if not tokens.strip():
        return []
    found = TOKEN_PATTERN.findall(tokens)
    if " ".join(found) != " ".join(tokens.split()):
        raise CIDMInputError("tokens", f"write tokens as <name> separated by spaces, e.g. '<dog1> <dog2>'; "
                                       f"got {tokens!r}")
    return validate_tokens(found, concept)


def gather_examples(images: list[torch.Tensor], folder: str):
    """Examples from IMAGE batches (one, or a dataset node's list of differently sized ones) and a folder."""
    examples = []
    for batch in images:
        examples += examples_from_image_batch(batch, "images")
    path = input_subfolder(folder)
    if path is not None:
        examples += load_concept_folder(path, "folder", root=input_root())
    if not examples:
        raise CIDMInputError("images", "connect an IMAGE batch or name a folder under ComfyUI's input directory")
    return examples


# Settings that change how a training runs but not what it learns: a re-run may differ in them and still reuse.
RUN_SETTINGS = ("save_every", "gradient_checkpointing")
# Recorded settings under the names of the inputs that set them (Concept Training Options, Train Concept Increment).
INPUT_NAMES = {"seed": "training_seed", "consolidation.orthogonal": "orthogonal_weight",
               "consolidation.shared": "shared_weight", "consolidation.clora": "clora_lambda",
               "training_data": "images (their pixels or captions)"}


def task_settings(config: TrainingConfig, resolution: int, class_words: list[str], training_set) -> dict:
    """Besides the tokens, what decides a task's result, keyed as its hyperparameters record it, so that a re-run
    of the same inputs can be recognised."""
    settings = {key: value for key, value in config.hyperparameters().items() if key not in RUN_SETTINGS}
    return {**settings, "resolution": resolution, "class_words": class_words,
            "training_data": training_set.digest()}


def train_concept_increment(model, clip, vae, library_name: str, concept: str, tokens: str, class_words: str,
                            images, folder: str, config: TrainingConfig, resolution: int, resume: bool,
                            preview_every: int, node_id: str | None, token_slots: str = "family default"):
    """Trains and appends the task, or reuses the task that a run with the same inputs appended before; returns
    (library ref, loss plot, preview samples taken, possibly none). `resolution` 0 is the model family's native
    size (cidm.family), recorded as the size trained at; `token_slots` is a `cidm.family.TOKEN_SLOT_RULES` name,
    which a new library records (`library_token_slots`)."""
    concept = validate_name(concept.strip(), "concept")
    token_list = parse_tokens(concept, tokens)
    if config.method not in METHODS:
        raise CIDMInputError("method", f"unknown method {config.method!r}; supported: {', '.join(METHODS)}")
    config.validate()
    ref = library_ref(library_name)
    root = Path(ref.root)
    info = base_model_info(model)
    check_trainable(model)
    check_unpatched(model)
    library = ConceptLibrary.open(root) if ref.content is not None else None
    if library is not None:  # the model first: a library's token slots fit its own model's layers only
        library.check_base_model(info["fingerprint"], info["num_layers"], info["family"])
    info["token_slots"] = library_token_slots(library, model_family(model), info["layer_paths"], token_slots)
    encoder = ComfyLayerwiseEncoder(clip, info["num_layers"], info["token_slots"])
    info[TEXT_ENCODER_KEY] = text_encoder_fingerprint(encoder)
    # Methods that keep the class word out (c-lora) start every token random: their class words are not recorded.
    words = class_words.split() if CONSOLIDATORS[config.method].class_word_in_prompt else []
    resolution = resolution or model_family(model).resolution
    training_set = build_training_set(gather_examples(images, folder), resolution, config.seed)
    settings = task_settings(config, resolution, words, training_set)
    token_list = token_list or (library.automatic_tokens(concept) if library is not None else automatic_tokens(concept))
    old_tasks, saved = [], None
    if library is not None:
        check_text_encoder(library, info[TEXT_ENCODER_KEY])
        reused = library.trained_task(concept, {"tokens": token_list, **settings}, INPUT_NAMES)
        if reused is not None:
            return reuse(library, reused, node_id)
        library.check_new_task(concept, token_list)
        # ComfyUI runs nodes under inference_mode; tensors read there (old tasks' factors) could not join autograd.
        with torch.inference_mode(False):
            old_tasks = library.load_all()
            saved = library.load_resume_state(concept) if resume else None

    denoiser = ComfyDenoiser(model, vae, config.gradient_checkpointing)
    # A folder that cannot take the task is refused now, not after the training.
    shapes = [layer.projection_shapes() for layer in denoiser.layers]
    ConceptLibrary.check_room(root, bytes_for_task(shapes, config.rank, len(token_list), denoiser.layers[0].context_dim,
                                                   resume_states=config.save_every > 0))
    spec = ConceptSpec(name=concept, tokens=token_list,
                       class_words=[None] + [words[i] if i < len(words) else None
                                             for i in range(len(token_list) - 1)])
    with torch.inference_mode(False):
        trainer = ConceptTrainer(denoiser, encoder, training_set, spec, [t.lora for t in old_tasks], config)
        if saved is not None:
            trainer.restore(*saved)
            logging.info("CIDM: resuming '%s' at step %d", concept, trainer.step)
        progress = comfy.utils.ProgressBar(config.steps, node_id=node_id)
        progress.update_absolute(trainer.step)

        def on_step(step, total, loss):
            progress.update_absolute(step, total)
            show_text(f"step {step}/{total}\nloss {loss:.4f}", node_id)  # the bar shows only the step
            if step % LOG_EVERY == 0 or step == total:
                logging.info("CIDM train '%s': step %d/%d loss %.5f", concept, step, total, loss)

        previews = []

        def preview(step):
            # One seed for every preview, so successive samples show the weights changing, not the noise.
            image = denoiser.sample(*trainer.preview_contexts(), tuple(trainer.latents[:1].shape), PREVIEW_STEPS,
                                    PREVIEW_CFG, torch.Generator().manual_seed(config.seed)).cpu()
            previews.append(image)
            pixels = (image[0].clamp(0, 1) * 255).to(torch.uint8).numpy()
            progress.update_absolute(step, config.steps, ("JPEG", Image.fromarray(pixels), PREVIEW_MAX_SIDE))

        def save_state(tensors, meta):
            # The library is created at the first save, so an interrupted first training leaves no empty library.
            with ConceptLibrary.creating(root):
                ConceptLibrary.open_or_create(root, info).save_resume_state(concept, tensors, meta)

        callbacks = TrainingCallbacks(
            preview=preview, preview_every=preview_every, on_step=on_step,
            check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
            save_state=save_state if config.save_every else None)
        trained = trainer.run(callbacks)

    with ConceptLibrary.creating(root):
        library = ConceptLibrary.open_or_create(root, info)
        library.check_base_model(info["fingerprint"], info["num_layers"], info["family"])
        # Appending also removes this concept's resume state, under the same lock.
        library.append_task(concept=concept, tokens=token_list, method=config.method, rank=config.rank,
                            multiplier=config.multiplier, steps=config.steps, seed=config.seed,
                            hyperparameters={**config.hyperparameters(), **settings,
                                             "images": len(training_set.images), "folder": folder.strip(),
                                             "embeddings_frozen_at": trained.embeddings_frozen_at,
                                             "consolidation_penalty": trained.consolidation_penalty},
                            data=TaskData(lora=trained.lora, embeddings=trained.embeddings, features=trained.features))
    plot = line_plot(trained.losses, f"{concept}: diffusion loss ({config.method})")
    return library_ref(ref.name), plot, previews


def library_token_slots(library: ConceptLibrary | None, family: ModelFamily, layer_paths: list[str],
                        rule: str) -> list[int]:
    """The token slot of each layer for a training run: the library's own map once it exists, else the map of
    `rule` (a `TOKEN_SLOT_RULES` name) for these layers.

    Raises:
        CIDMInputError: ("token_slots") for an unknown rule, or a rule other than "family default" that the
            existing library was not made with (its map is fixed when it is created).
    """
    if rule not in TOKEN_SLOT_RULES:
        raise CIDMInputError("token_slots", f"unknown rule {rule!r}; one of {', '.join(TOKEN_SLOT_RULES)}")
    wanted = family.token_slots(layer_paths, TOKEN_SLOT_RULES[rule])
    if library is None:
        return wanted
    if TOKEN_SLOT_RULES[rule] is not None and wanted != library.token_slots:
        raise CIDMInputError("token_slots", f"library '{library.name}' has {max(library.token_slots) + 1} token "
                                            f"slots for {library.num_layers} layers, fixed when it was created; "
                                            f"'{rule}' gives {max(wanted) + 1}. Choose 'family default' to "
                                            "train with the library's own, or use a new library")
    return library.token_slots


def reuse(library: ConceptLibrary, task: TaskRecord, node_id: str | None):
    """The result of a re-run whose task already exists: nothing is trained, and the node says so."""
    note = (f"'{task.concept}' is already task {task.index} of library '{library.name}' with these inputs: "
            "reused it, nothing was trained")
    logging.info("CIDM: %s", note)
    show_text(note, node_id)
    return library_ref(library.name), line_plot([], f"{task.concept}: reused task {task.index}"), []


def show_text(text: str, node_id: str | None) -> None:
    """Text on the node in the frontend (the progress-text channel)."""
    if node_id is not None:
        server = PromptServer.instance
        server.send_progress_text(text, node_id, server.client_id)

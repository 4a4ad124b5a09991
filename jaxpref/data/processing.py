"""Rows in TRL's dataset schema -> model inputs: decoded images, prompt and completion token ids,
padded batches.

A row holds images (`images`: a list, or `image`: one) and text columns: `prompt`, `chosen`,
`rejected` (preference), `prompt` (prompt-only), `prompt`/`completion` or `messages` (SFT). Each
text is a plain string or conversational (a list of {"role", "content"} messages, the content a
string or a list of {"type": "image"} / {"type": "text", "text": ...} blocks).

Layouts (one example; `<image>` stands for num_image_tokens copies of image_token_index):
  paligemma  prompt: <image>.. <bos> text "\n"            completion: text <eos>
  llava      prompt: <bos> "USER: <image>\n" text " ASSISTANT:"  completion: " " text <eos>
Only the user text of a prompt is ever truncated: image tokens, <bos> and the template are kept.
See docs/DATA.md, section "Processing".
"""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

from jaxpref.data.errors import BadRecordError
from jaxpref.models.config import VLMConfig

KINDS = ("preference", "prompt", "sft")
TRUNCATION_MODES = ("keep_start", "keep_end")
ROLES = ("system", "user", "assistant")
# Numeric columns a row may carry through to the batch: the reward model's optional `margin`, and
# the reference log-probs DPO's precompute_ref_log_probs attaches (jaxpref.train.dpo).
FLOAT_COLUMNS = ("margin", "ref_chosen_logps", "ref_rejected_logps")
# Per vision tower: (mean, std) of the normalisation, as in SiglipImageProcessor / CLIPImageProcessor.
IMAGE_STATS = {
    "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
    kind: str  # "preference" (prompt, chosen, rejected) | "prompt" (prompt only) | "sft"
    max_prompt_length: int | None = 512  # prompt tokens; only its text is cut, image tokens never
    max_completion_length: int | None = 256  # completion tokens (with eos), the start is kept
    max_length: int | None = 1024  # prompt + longest completion
    truncation_mode: str = "keep_start"  # which end of the prompt text survives; see truncate()
    num_images: int = 1  # images per row; a row with another count is a bad record
    length_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)  # padded lengths
    max_text_chars: int = 20000  # a text field longer than this is a bad record

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"ProcessorConfig.kind must be one of {KINDS}, got {self.kind!r}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}")
        for name in ("max_prompt_length", "max_completion_length", "max_length"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be positive or None, got {v}")
        if self.num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {self.num_images}")
        b = self.length_buckets
        if not b or any(x < 1 for x in b) or list(b) != sorted(set(b)):
            raise ValueError(f"length_buckets must be increasing positive lengths, got {b}")
        if self.max_text_chars < 1:
            raise ValueError(f"max_text_chars must be positive, got {self.max_text_chars}")


# ---------------------------------------------------------------------------
# Images


def decode_image(value: Any, field: str) -> Image.Image:
    """An RGB PIL image from a row's image value: {"bytes", "path"} dict, bytes, PIL image or
    uint8[H, W, 3]. Transparency is composited onto white, as transformers' convert_to_rgb does."""
    try:
        image = _open_image(value, field)
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        if isinstance(e, BadRecordError):
            raise
        raise BadRecordError(field, f"cannot decode image: {type(e).__name__}: {e}") from e
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _open_image(value: Any, field: str) -> Image.Image:
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            value = value["bytes"]
        elif isinstance(value.get("path"), str) and value["path"]:
            if "://" in value["path"]:
                raise BadRecordError(field, f"image path {value['path']!r} is a URL; only local files are read")
            return Image.open(value["path"])
        else:
            raise BadRecordError(field, "image dict has neither 'bytes' nor 'path'")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype != np.uint8 or value.ndim != 3 or value.shape[-1] != 3:
            raise BadRecordError(field, f"image array must be uint8[H, W, 3], got {value.dtype}{list(value.shape)}")
        return Image.fromarray(value)
    raise BadRecordError(field, f"unsupported image value of type {type(value).__name__}")


def preprocess_image(image: Image.Image, size: int, vision_kind: str) -> np.ndarray:
    """RGB image -> float32[size, size, 3], normalised for the vision tower.

    siglip: bicubic resize to size x size (SiglipImageProcessor).
    clip: bicubic resize of the shortest edge to `size`, then a centre crop (CLIPImageProcessor,
    LLaVA-1.5). Then x / 255, (x - mean) / std.
    """
    if vision_kind == "siglip":
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    else:
        w, h = image.size
        long = int(size * max(w, h) / min(w, h))
        new_w, new_h = (size, long) if w <= h else (long, size)
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    mean, std = IMAGE_STATS[vision_kind]
    x = np.asarray(image, np.float32) * np.float32(1 / 255)
    return ((x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


# ---------------------------------------------------------------------------
# Text structure: a text field -> turns [(role, parts)], a part being a str or IMAGE.


class _ImagePlaceholder:
    def __repr__(self):
        return "IMAGE"


IMAGE = _ImagePlaceholder()


class _Text(str):
    """User text inside a rendered prompt: the only part truncation may cut."""


def _split_placeholders(text: str, image_token: str) -> list:
    """Splits text at the image token: "a <image> b" -> ["a ", IMAGE, " b"] (empty strings dropped)."""
    parts: list = []
    for i, piece in enumerate(text.split(image_token)):
        if i:
            parts.append(IMAGE)
        if piece:
            parts.append(piece)
    return parts


def parse_text(value: Any, field: str, image_token: str, max_chars: int) -> list[tuple[str, list]]:
    """A plain or conversational text field -> [(role, parts)]; a plain string is one user turn."""
    if isinstance(value, str):
        turns = [("user", _split_placeholders(value, image_token))]
    elif isinstance(value, (list, tuple)) and value:
        turns = [_parse_message(m, field, i, image_token) for i, m in enumerate(value)]
    else:
        raise BadRecordError(field, f"expected a string or a non-empty list of messages, got {_describe(value)}")
    chars = sum(len(p) for _, parts in turns for p in parts if p is not IMAGE)
    if chars > max_chars:
        raise BadRecordError(field, f"text of {chars} characters exceeds max_text_chars={max_chars}")
    return turns


def _parse_message(m: Any, field: str, i: int, image_token: str) -> tuple[str, list]:
    if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise BadRecordError(field, f"message {i}: expected a {{'role', 'content'}} dict, got {_describe(m)}")
    role, content = m["role"], m["content"]
    if role not in ROLES:
        raise BadRecordError(field, f"message {i}: role {role!r} is not one of {ROLES}")
    if isinstance(content, str):
        return role, _split_placeholders(content, image_token)
    if not isinstance(content, (list, tuple)):
        raise BadRecordError(field, f"message {i}: content must be a string or a list of blocks, "
                                    f"got {_describe(content)}")
    parts: list = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "image":
            parts.append(IMAGE)
        elif kind == "text" and isinstance(block.get("text"), str):
            parts.extend(_split_placeholders(block["text"], image_token))
        else:
            raise BadRecordError(field, f"message {i}, block {j}: expected {{'type': 'image'}} or "
                                        f"{{'type': 'text', 'text': str}}, got {_describe(block)}")
    return role, parts


def _describe(x: Any) -> str:
    r = repr(x)
    return f"{type(x).__name__} {r[:60] + '...' if len(r) > 60 else r}"


def place_images(turns: list[tuple[str, list]], num_images: int, field: str) -> list[tuple[str, list]]:
    """Checks the placeholders against the images; a prompt without any gets them before the text
    of its first user turn."""
    count = sum(p is IMAGE for _, parts in turns for p in parts)
    if count == 0 and num_images:
        users = [i for i, (role, _) in enumerate(turns) if role == "user"]
        if not users:
            raise BadRecordError(field, f"no user turn to hold the {num_images} image(s)")
        turns = list(turns)
        role, parts = turns[users[0]]
        turns[users[0]] = (role, [IMAGE] * num_images + parts)
    elif count != num_images:
        raise BadRecordError(field, f"{count} image placeholder(s) for {num_images} image(s)")
    return turns


def _turn_text(parts: list) -> str:
    return "".join(p for p in parts if p is not IMAGE)


def render_prompt(family: str, turns: list[tuple[str, list]], bos_id: int) -> list:
    """Prompt turns -> items: int (a token id), IMAGE, str (template text) or _Text (user text).

    paligemma: <image>.. <bos> t1 "\n" t2 "\n" ..   (images first, as its processor puts them)
    llava: <bos> "USER: " parts " ASSISTANT: " parts ... " ASSISTANT:"   (an image renders "<image>\n")
    """
    if family == "paligemma":
        n = sum(p is IMAGE for _, parts in turns for p in parts)
        items: list = [IMAGE] * n + [bos_id]
        for _, parts in turns:
            items += [_Text(_turn_text(parts)), "\n"]
        return items
    items = [bos_id]
    for i, (role, parts) in enumerate(turns):
        items.append(("" if i == 0 else " ") + {"system": "", "user": "USER: ", "assistant": "ASSISTANT: "}[role])
        for p in parts:
            items += [IMAGE, "\n"] if p is IMAGE else [_Text(p)]
    if turns[-1][0] != "assistant":
        items.append(" ASSISTANT:")
    return items


# ---------------------------------------------------------------------------
# Truncation


def truncate(prompt_ids: np.ndarray, prompt_is_text: np.ndarray, completions: list[np.ndarray],
             config: ProcessorConfig, prompt_field: str, completion_fields: Sequence[str]):
    """Fits one example into the configured lengths without ever cutting an image token.

    1. Completions are cut to max_completion_length, keeping their start (a cut completion loses
       its eos, so the model is not taught to stop there).
    2. The prompt's text tokens (prompt_is_text) are cut until the prompt fits max_prompt_length
       and, with keep_end, until prompt + longest completion fits max_length; keep_start keeps the
       beginning of the text, keep_end its end. Image tokens, bos and template tokens stay.
    3. With keep_start, completions are then cut to the room max_length leaves.
    Raises BadRecordError when the uncuttable prompt tokens do not fit or no completion token would remain.
    Returns (prompt_ids int32[Lp], [completion_ids int32[Lc_i]]).
    """
    fixed = int((~prompt_is_text).sum())
    limits = [(n, v) for n, v in (("max_prompt_length", config.max_prompt_length),
                                  ("max_length", config.max_length)) if v is not None]
    for name, limit in limits:
        if fixed > limit:
            raise BadRecordError(prompt_field, f"{fixed} image, bos and template tokens exceed {name}={limit}")
    completions = [c[:config.max_completion_length] for c in completions]
    budget = int(prompt_is_text.sum())
    if config.max_prompt_length is not None:
        budget = min(budget, config.max_prompt_length - fixed)
    if config.max_length is not None:
        reserve = max((len(c) for c in completions), default=0) if config.truncation_mode == "keep_end" else 0
        budget = max(0, min(budget, config.max_length - fixed - reserve))
    text_pos = np.flatnonzero(prompt_is_text)
    drop = text_pos[budget:] if config.truncation_mode == "keep_start" else text_pos[:len(text_pos) - budget]
    prompt_ids = np.delete(prompt_ids, drop)
    if config.max_length is not None:
        room = config.max_length - len(prompt_ids)
        if completions and room < 1:
            raise BadRecordError(completion_fields[0], f"the prompt's {len(prompt_ids)} tokens leave no room "
                                                       f"for a completion within max_length={config.max_length}")
        completions = [c[:room] for c in completions]
    return prompt_ids, completions


# ---------------------------------------------------------------------------
# The processor


class Processor:
    """One row (a dict in TRL's schema) -> one unpadded example; a list of examples -> a padded batch.

    Example fields: prompt_ids int32[Lp]; chosen_ids, rejected_ids int32[Lc] (preference) or
    completion_ids int32[Lc] (sft); pixel_values float32[num_images, H, W, 3]; the FLOAT_COLUMNS
    (margin, precomputed reference log-probs) as float32[] and scene (str) when the row has them.
    """

    def __init__(self, model_config: VLMConfig, tokenizer, config: ProcessorConfig):
        if model_config.family not in ("paligemma", "llava"):
            raise ValueError(f"unsupported model family {model_config.family!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(f"the tokenizer ({type(tokenizer).__name__}) must be a fast (tokenizers-backed) "
                             "tokenizer: processing needs its offset mappings")
        self.model_config, self.tokenizer, self.config = model_config, tokenizer, config
        added = tokenizer.added_tokens_decoder.get(model_config.image_token_index)
        if added is None:
            raise ValueError(f"the tokenizer has no added token with the model's image_token_index "
                             f"{model_config.image_token_index} (e.g. '<image>')")
        self.image_token = added.content

    def __call__(self, row: dict) -> dict[str, Any]:
        """A row -> an example (see the class docstring). Raises BadRecordError."""
        cfg, mc = self.config, self.model_config
        images = [preprocess_image(im, mc.vision.image_size, mc.vision.kind) for im in self._images(row)]
        prompt_field, prompt_turns, completions = self._fields(row)
        prompt_turns = place_images(prompt_turns, len(images), prompt_field)
        if not images and not any(_turn_text(parts).strip() for _, parts in prompt_turns):
            raise BadRecordError(prompt_field, "empty prompt (no text and no image)")
        prompt_ids, is_text = self._tokenize(render_prompt(mc.family, prompt_turns, mc.bos_token_id))
        completion_ids = [self._completion(turns, field) for _, field, turns in completions]
        prompt_ids, completion_ids = truncate(prompt_ids, is_text, completion_ids, cfg, prompt_field,
                                              [field for _, field, _ in completions])
        size = mc.vision.image_size
        out: dict[str, Any] = {
            "prompt_ids": prompt_ids,
            "pixel_values": np.stack(images) if images else np.zeros((0, size, size, 3), np.float32),
        }
        out.update({f"{name}_ids": ids for (name, _, _), ids in zip(completions, completion_ids)})
        for key in FLOAT_COLUMNS:
            if key in row:
                m = row[key]
                if isinstance(m, bool) or not isinstance(m, (int, float, np.number)) or not math.isfinite(m):
                    raise BadRecordError(key, f"expected a finite number, got {_describe(m)}")
                out[key] = np.asarray(m, np.float32)
        if "scene" in row:
            if not isinstance(row["scene"], str):
                raise BadRecordError("scene", f"expected a string, got {_describe(row['scene'])}")
            out["scene"] = row["scene"]
        return out

    def _images(self, row: dict) -> list[Image.Image]:
        if "images" in row:
            field, values = "images", row["images"]
            if isinstance(values, np.ndarray) and values.dtype == object:
                values = list(values)
            if not isinstance(values, (list, tuple)):
                raise BadRecordError(field, f"expected a list of images, got {_describe(values)}")
        elif "image" in row:
            field, values = "image", [] if row["image"] is None else [row["image"]]
        elif self.config.num_images == 0:
            return []
        else:
            raise BadRecordError("images", "missing column (expected 'images' or 'image')")
        if len(values) != self.config.num_images:
            raise BadRecordError(field, f"{len(values)} image(s), expected num_images={self.config.num_images}")
        return [decode_image(v, field) for v in values]

    def _fields(self, row: dict):
        """-> (prompt field, prompt turns, [(output name, field, completion turns)])."""
        def text(field):
            if field not in row:
                raise BadRecordError(field, "missing column")
            return parse_text(row[field], field, self.image_token, self.config.max_text_chars)

        kind = self.config.kind
        if kind == "sft" and "messages" in row:
            turns = text("messages")
            if len(turns) < 2 or turns[-1][0] != "assistant":
                raise BadRecordError("messages", "expected at least one prompt message followed by the "
                                                 "assistant's final message")
            return "messages", turns[:-1], [("completion", "messages", turns[-1:])]
        names = {"preference": ("chosen", "rejected"), "prompt": (), "sft": ("completion",)}[kind]
        return "prompt", text("prompt"), [(n, n, text(n)) for n in names]

    def _completion(self, turns: list[tuple[str, list]], field: str) -> np.ndarray:
        """Completion turns -> int32[Lc]: the text (turns joined by " ") and eos."""
        if any(p is IMAGE for _, parts in turns for p in parts):
            raise BadRecordError(field, "image placeholders in a completion are not supported")
        text = " ".join(_turn_text(parts) for _, parts in turns)
        if not text.strip():
            raise BadRecordError(field, "empty completion")
        prefix = " " if self.model_config.family == "llava" else ""
        ids, _ = self._tokenize([prefix + text])
        return np.append(ids, np.int32(self.model_config.eos_token_id)).astype(np.int32)

    def _tokenize(self, items: list) -> tuple[np.ndarray, np.ndarray]:
        """Rendered items -> (ids int32[T], is_text bool[T]); each image becomes num_image_tokens ids.

        Runs of text between token ids are tokenized as one string (the image placeholder written
        as the image token), as transformers' processors do; is_text marks tokens starting in _Text.
        """
        ids: list[int] = []
        is_text: list[bool] = []
        run, spans = "", []

        def flush():
            if run:
                enc = self.tokenizer(run, add_special_tokens=False, return_offsets_mapping=True)
                ids.extend(enc.input_ids)
                is_text.extend(any(s <= start < e for s, e in spans) for start, _ in enc.offset_mapping)

        for item in items:
            if isinstance(item, int):
                flush()
                run, spans = "", []
                ids.append(item)
                is_text.append(False)
            elif item is IMAGE:
                run += self.image_token
            else:
                if isinstance(item, _Text):
                    spans.append((len(run), len(run) + len(item)))
                run += item
        flush()
        ids_arr = np.asarray(ids, np.int32)
        repeats = np.where(ids_arr == self.model_config.image_token_index, self.model_config.num_image_tokens, 1)
        return np.repeat(ids_arr, repeats), np.repeat(np.asarray(is_text, bool), repeats)

    def collate(self, examples: list[dict]) -> dict[str, np.ndarray]:
        """Examples -> a batch: prompts left-padded, completions right-padded, each to a length bucket.

        prompt_ids, prompt_mask int32[B, Lp]; chosen_/rejected_ids and _mask int32[B, Lc] (one Lc for
        both) or completion_ids, completion_mask int32[B, Lc]; pixel_values float32[B, N, H, W, 3];
        the FLOAT_COLUMNS as float32[B] and scene object[B] when the examples have them.
        """
        if not examples:
            raise ValueError("collate needs at least one example")
        buckets, pad_id = self.config.length_buckets, self.model_config.pad_token_id
        prompts = [e["prompt_ids"] for e in examples]
        batch: dict[str, np.ndarray] = {}
        batch["prompt_ids"], batch["prompt_mask"] = pad_to(
            prompts, bucket_length(max(map(len, prompts)), buckets), pad_id, "left")
        names = [k[:-4] for k in examples[0] if k.endswith("_ids") and k != "prompt_ids"]
        if names:
            length = bucket_length(max(len(e[f"{n}_ids"]) for e in examples for n in names), buckets)
            for n in names:
                batch[f"{n}_ids"], batch[f"{n}_mask"] = pad_to([e[f"{n}_ids"] for e in examples], length,
                                                                pad_id, "right")
        batch["pixel_values"] = np.stack([e["pixel_values"] for e in examples]).astype(np.float32)
        for key, dtype in [(k, np.float32) for k in FLOAT_COLUMNS] + [("scene", object)]:
            present = sum(key in e for e in examples)
            if present not in (0, len(examples)):
                raise ValueError(f"{present} of {len(examples)} examples have {key!r}: a column must be in every row")
            if present:
                batch[key] = np.array([e[key] for e in examples], dtype=dtype)
        return batch


# ---------------------------------------------------------------------------
# Padding and concatenation


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= n; past the largest bucket, the next multiple of it."""
    for b in buckets:
        if b >= n:
            return b
    return -(-n // buckets[-1]) * buckets[-1]


def pad_to(seqs: Sequence[np.ndarray], length: int, pad_id: int, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Sequences -> (ids int32[B, length], mask int32[B, length]); side "left" or "right" gets the pads."""
    ids = np.full((len(seqs), length), pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"sequence {i} of length {len(s)} does not fit the padded length {length}")
        cols = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        ids[i, cols], mask[i, cols] = s, 1
    return ids, mask

"""Data processing: TRL-schema rows -> examples -> padded batches, checked against transformers'
processors (PaliGemma, LLaVA, SigLIP/CLIP image processors) and hand-computed arrays."""

import copy
import dataclasses
import io

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlavaProcessor, PaliGemmaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from jaxpref.data.errors import BadRecordError
from jaxpref.data.processing import Processor, ProcessorConfig, bucket_length, decode_image, pad_to, preprocess_image
from jaxpref.models.config import TextConfig, VisionConfig, VLMConfig
from jaxpref.models.presets import get_preset
from jaxpref.sequence import concat_prompt_completion

PAD, EOS, BOS, UNK, IMG = 0, 1, 2, 3, 4
WORDS = ("what is in the image describe a red blue green circle square triangle on left right there are two "
         "shapes USER ASSISTANT : ? . , \n you see hello system be brief").split(" ")


@pytest.fixture(scope="module")
def tok():
    """A real fast tokenizer: words, punctuation and "\\n" are tokens, spaces are dropped."""
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"])}
    for w in WORDS + ["\n"]:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(" +"), "removed"), pre_tokenizers.Split("\n", "isolated"),
        pre_tokenizers.Punctuation("isolated")])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                   unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


# 16x16 images with 8x8 patches: 4 image tokens per image.
PALI = get_preset("tiny").replace(vision=dataclasses.replace(get_preset("tiny").vision, image_size=16))
LLAVA = VLMConfig(
    family="llava", vision=VisionConfig(kind="clip", image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, hidden_act="quick_gelu"),
    text=TextConfig(kind="llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2, head_dim=8, hidden_act="silu"),
    projector="mlp", vision_feature_layer=-2, vision_feature_select_strategy="default",
    image_token_index=IMG, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS).validate()
N_TOK = 4


def png(h=20, w=30, seed=0, mode="RGB"):
    arr = np.random.RandomState(seed).randint(0, 256, (h, w, len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr.squeeze(-1) if mode == "L" else arr).save(buf, format="PNG")
    return buf.getvalue()


def proc(tok, model=PALI, **kw):
    return Processor(model, tok, ProcessorConfig(**{"kind": "preference", **kw}))


def rlaif_row(question="what is in the image?", chosen="a red circle", rejected="two blue squares"):
    """The schema of HuggingFaceH4/rlaif-v_formatted (images decoded as {"bytes", "path"})."""
    return {
        "images": [{"bytes": png(), "path": None}],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": rejected}]}],
    }


# ---------------------------------------------------------------------------
# Images vs transformers' PIL image processors


@pytest.mark.parametrize("hw,mode", [((20, 30), "RGB"), ((31, 17), "RGB"), ((24, 24), "RGBA"), ((19, 26), "L")])
def test_images_match_transformers_processors(hw, mode):
    img = Image.open(io.BytesIO(png(*hw, mode=mode)))
    refs = {"siglip": SiglipImageProcessorPil(size={"height": 16, "width": 16}),
            "clip": CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})}
    for kind, ref in refs.items():
        want = np.asarray(ref(images=img, return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)
        got = preprocess_image(decode_image({"bytes": png(*hw, mode=mode), "path": None}, "images"), 16, kind)
        assert got.dtype == np.float32 and got.shape == (16, 16, 3)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=kind)


def test_image_value_forms_decode_alike(tmp_path):
    data = png()
    path = tmp_path / "x.png"
    path.write_bytes(data)
    arr = np.asarray(Image.open(io.BytesIO(data)))
    forms = [data, {"bytes": data, "path": "ignored.png"}, {"bytes": None, "path": str(path)},
             Image.open(io.BytesIO(data)), arr]
    for form in forms:
        np.testing.assert_array_equal(np.asarray(decode_image(form, "image")), arr)


# ---------------------------------------------------------------------------
# Layouts vs transformers' processors


def test_paligemma_layout_matches_processor(tok):
    ip = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    ip.image_seq_length = N_TOK
    ref = PaliGemmaProcessor(image_processor=ip, tokenizer=copy.deepcopy(tok))
    p = proc(tok)
    rows = [{"image": png(seed=0), "prompt": "what is in the image?", "chosen": "a red circle", "rejected": "two"},
            {"image": png(seed=1), "prompt": "describe", "chosen": "two blue squares on the left", "rejected": "a"}]
    examples = [p(r) for r in rows]
    # By hand: <image> x 4, <bos>, prompt text, "\n" | completion, <eos>.
    assert examples[0]["prompt_ids"].tolist() == [IMG] * 4 + [BOS] + ids(tok, "what is in the image?") + ids(tok, "\n")
    assert examples[0]["chosen_ids"].tolist() == ids(tok, "a red circle") + [EOS]

    want = ref(images=[[Image.open(io.BytesIO(r["image"]))] for r in rows], text=[r["prompt"] for r in rows],
               suffix=[r["chosen"] for r in rows], padding="longest", return_tensors="np")
    batch = p.collate(examples)
    seq = concat_prompt_completion(batch["prompt_ids"], batch["prompt_mask"], batch["chosen_ids"], batch["chosen_mask"])
    for i in range(2):
        real, ref_real = seq["attention_mask"][i] == 1, want["attention_mask"][i] == 1
        np.testing.assert_array_equal(seq["input_ids"][i][real], want["input_ids"][i][ref_real])
        np.testing.assert_array_equal(seq["token_type_ids"][i][real], want["token_type_ids"][i][ref_real])
        np.testing.assert_array_equal(seq["completion_mask"][i][real], want["labels"][i][ref_real] != -100)
        assert (seq["token_type_ids"][i][~real] == 0).all() and (want["token_type_ids"][i][~ref_real] == 0).all()
    np.testing.assert_allclose(batch["pixel_values"][:, 0], want["pixel_values"].transpose(0, 2, 3, 1), atol=1e-5)


def test_llava_layout_matches_processor(tok):
    cip = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    ref = LlavaProcessor(image_processor=cip, tokenizer=copy.deepcopy(tok), patch_size=8, image_token="<image>",
                         vision_feature_select_strategy="default", num_additional_image_tokens=1)
    img = Image.open(io.BytesIO(png()))
    want = ref(images=[img], text=["USER: <image>\nwhat is in the image? ASSISTANT:"], add_special_tokens=False,
               return_tensors="np")
    ex = proc(tok, LLAVA)(rlaif_row())
    assert ex["prompt_ids"].tolist() == [BOS] + want["input_ids"][0].tolist()
    assert (ex["prompt_ids"] == IMG).sum() == LLAVA.num_image_tokens == N_TOK
    assert ex["chosen_ids"].tolist() == ids(tok, " a red circle") + [EOS]
    np.testing.assert_allclose(ex["pixel_values"][0], want["pixel_values"][0].transpose(1, 2, 0), atol=1e-5)


def test_rlaif_v_rows_equal_plain_rows_and_survive_parquet(tok, tmp_path):
    p = proc(tok)
    plain = p({"image": png(), "prompt": "what is in the image?", "chosen": "a red circle",
               "rejected": "two blue squares", "margin": 0.5})
    pq.write_table(pa.Table.from_pylist([{**rlaif_row(), "margin": 0.5}]), tmp_path / "rlaif.parquet")
    (row,) = pq.read_table(tmp_path / "rlaif.parquet").to_pylist()
    assert row["prompt"][0]["content"][0] == {"type": "image", "text": None}  # arrow's struct unification
    for r in (rlaif_row(), row):
        ex = p({**r, "margin": 0.5})
        for k in ("prompt_ids", "chosen_ids", "rejected_ids", "pixel_values", "margin"):
            np.testing.assert_array_equal(ex[k], plain[k], err_msg=k)
    assert plain["margin"].dtype == np.float32


def test_conversational_placement_and_multi_turn(tok):
    t = lambda ex: tok.convert_ids_to_tokens(ex["prompt_ids"].tolist())
    img4 = ["<image>"] * 4
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "you see"},
            {"role": "user", "content": [{"type": "text", "text": "what is"}, {"type": "image"}]}]
    row = {"image": png(), "prompt": msgs, "chosen": "a", "rejected": "two"}
    # LLaVA: image blocks stay where they are; turns joined by " ", role prefixes from the template.
    assert t(proc(tok, LLAVA)(row)) == (["<bos>", "be", "brief", "USER", ":", "hello", "ASSISTANT", ":", "you",
                                         "see", "USER", ":", "what", "is"] + img4 + ["\n", "ASSISTANT", ":"])
    # PaliGemma: images first, turn texts joined by "\n".
    assert t(proc(tok)(row)) == img4 + ["<bos>", "be", "brief", "\n", "hello", "\n", "you", "see", "\n", "what",
                                        "is", "\n"]
    # String contents without placeholders: the images go before the first user text.
    row["prompt"] = msgs[:3] + [{"role": "user", "content": "what is"}]
    assert t(proc(tok, LLAVA)(row))[2:7] == ["brief", "USER", ":", *img4[:2]]
    # A literal <image> in a string content is the placeholder.
    row["prompt"] = [{"role": "user", "content": "what is <image> there"}]
    assert t(proc(tok, LLAVA)(row)) == ["<bos>", "USER", ":", "what", "is"] + img4 + ["\n", "there", "ASSISTANT", ":"]


def test_sft_and_prompt_kinds(tok):
    sft = Processor(PALI, tok, ProcessorConfig(kind="sft"))
    a = sft({"image": png(), "prompt": "describe", "completion": "a red circle"})
    b = sft({"image": png(), "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                           "text": "describe"}]},
                                          {"role": "assistant", "content": "a red circle"}]})
    assert sorted(a) == sorted(b) == ["completion_ids", "pixel_values", "prompt_ids"]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["completion_ids"].tolist() == ids(tok, "a red circle") + [EOS]
    prompt = Processor(PALI, tok, ProcessorConfig(kind="prompt"))({"image": png(), "prompt": "describe",
                                                                   "scene": '{"shapes": []}'})
    assert sorted(prompt) == ["pixel_values", "prompt_ids", "scene"] and prompt["scene"] == '{"shapes": []}'
    np.testing.assert_array_equal(prompt["prompt_ids"], a["prompt_ids"])
    none = Processor(PALI, tok, ProcessorConfig(kind="prompt", num_images=0))({"prompt": "describe"})
    assert none["prompt_ids"].tolist() == [BOS] + ids(tok, "describe\n") and none["pixel_values"].shape == (0, 16, 16, 3)


# ---------------------------------------------------------------------------
# Truncation never cuts image tokens


TEXT = "a red circle on the left there are two shapes"  # 10 tokens


def test_prompt_truncation_keeps_image_tokens(tok):
    words = ids(tok, TEXT)
    row = {"image": png(), "prompt": TEXT, "chosen": "a", "rejected": "two"}
    for mode, kept in (("keep_start", words[:3]), ("keep_end", words[-3:])):
        ex = proc(tok, max_prompt_length=N_TOK + 1 + 3 + 1, truncation_mode=mode)(row)
        assert ex["prompt_ids"].tolist() == [IMG] * 4 + [BOS] + kept + ids(tok, "\n"), mode
    # LLaVA keeps bos, the images and the template; only the user text is cut.
    for mode, kept in (("keep_start", words[:2]), ("keep_end", words[-2:])):
        ex = proc(tok, LLAVA, max_prompt_length=12, truncation_mode=mode)(row)
        assert tok.convert_ids_to_tokens(ex["prompt_ids"].tolist()) == (
            ["<bos>", "USER", ":"] + ["<image>"] * 4 + ["\n"] + tok.convert_ids_to_tokens(kept) + ["ASSISTANT", ":"])


def test_max_length_and_completion_truncation(tok):
    words = ids(tok, TEXT)
    row = {"image": png(), "prompt": TEXT, "chosen": "two blue squares on the left", "rejected": "a"}  # 6 + eos
    chosen = ids(tok, row["chosen"]) + [EOS]
    # Completions keep their start and lose eos when cut.
    ex = proc(tok, max_completion_length=4)(row)
    assert ex["chosen_ids"].tolist() == chosen[:4] and ex["rejected_ids"].tolist() == [ids(tok, "a")[0], EOS]
    # keep_end: prompt text is cut (keeping its end) to leave room for the longest completion.
    ex = proc(tok, max_length=6 + 4 + 7, truncation_mode="keep_end")(row)
    assert ex["prompt_ids"].tolist() == [IMG] * 4 + [BOS] + words[-4:] + ids(tok, "\n")
    assert ex["chosen_ids"].tolist() == chosen
    # keep_start: the prompt stays, the completion is cut to the room left.
    ex = proc(tok, max_length=6 + 10 + 3, truncation_mode="keep_start")(row)
    assert ex["prompt_ids"].tolist() == [IMG] * 4 + [BOS] + words + ids(tok, "\n")
    assert ex["chosen_ids"].tolist() == chosen[:3]


@pytest.mark.parametrize("kw,field", [(dict(max_prompt_length=5), "prompt"), (dict(max_length=5), "prompt"),
                                      (dict(max_length=16, max_prompt_length=None), "chosen")])
def test_no_room_is_a_bad_record(tok, kw, field):
    with pytest.raises(BadRecordError) as e:
        proc(tok, **kw)({"image": png(), "prompt": TEXT, "chosen": "a", "rejected": "two"})
    assert e.value.field == field


# ---------------------------------------------------------------------------
# Padding, buckets, concatenation


def test_collate_buckets_and_padding(tok):
    p = Processor(PALI, tok, ProcessorConfig(kind="preference", length_buckets=(4, 8)))
    pix = np.zeros((1, 16, 16, 3), np.float32)
    exs = [{"prompt_ids": np.array([9, 8, 7], np.int32), "chosen_ids": np.array([5, 1], np.int32),
            "rejected_ids": np.array([6, 6, 6, 6, 6], np.int32), "pixel_values": pix, "margin": np.float32(1),
            "scene": "s0"},
           {"prompt_ids": np.array([9, 8, 7, 6, 5], np.int32), "chosen_ids": np.array([5], np.int32),
            "rejected_ids": np.array([6], np.int32), "pixel_values": pix + 1, "margin": np.float32(-2),
            "scene": "s1"}]
    b = p.collate(exs)
    np.testing.assert_array_equal(b["prompt_ids"], [[0, 0, 0, 0, 0, 9, 8, 7], [0, 0, 0, 9, 8, 7, 6, 5]])
    np.testing.assert_array_equal(b["prompt_mask"], [[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(b["chosen_ids"], [[5, 1, 0, 0, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(b["rejected_mask"], [[1, 1, 1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0]])
    assert b["chosen_ids"].dtype == b["prompt_mask"].dtype == np.int32
    assert b["pixel_values"].shape == (2, 1, 16, 16, 3) and b["pixel_values"][1].max() == 1
    np.testing.assert_array_equal(b["margin"], np.array([1, -2], np.float32))
    assert b["scene"].tolist() == ["s0", "s1"]
    short = p.collate([{**e, "prompt_ids": e["prompt_ids"][:2], "chosen_ids": e["chosen_ids"][:1],
                        "rejected_ids": e["rejected_ids"][:1]} for e in exs])
    assert short["prompt_ids"].shape == short["rejected_ids"].shape == (2, 4)
    with pytest.raises(ValueError, match="margin"):
        p.collate([exs[0], {k: v for k, v in exs[1].items() if k != "margin"}])


def test_bucket_length_and_pad_to():
    assert [bucket_length(n, (16, 32)) for n in (1, 16, 17, 32, 33, 65)] == [16, 16, 32, 32, 64, 96]
    ids_, mask = pad_to([np.array([1, 2])], 3, 7, "left")
    assert ids_.tolist() == [[7, 1, 2]] and mask.tolist() == [[0, 1, 1]]


@pytest.mark.parametrize("xp", [np, jnp])
def test_concat_prompt_completion(xp):
    out = concat_prompt_completion(xp.asarray([[0, 5, 6], [7, 8, 9]]), xp.asarray([[0, 1, 1], [1, 1, 1]]),
                                   xp.asarray([[3, 1], [4, 0]]), xp.asarray([[1, 1], [1, 0]]))
    assert out["input_ids"].tolist() == [[0, 5, 6, 3, 1], [7, 8, 9, 4, 0]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert out["token_type_ids"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]]
    assert out["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]]
    assert all(v.dtype == xp.int32 for v in out.values())
    types = concat_prompt_completion(xp.asarray([[5]]), xp.asarray([[1]]), xp.asarray([[3]]), xp.asarray([[1]]),
                                     prompt_token_type=xp.asarray([[1]]))["token_type_ids"]
    assert types.tolist() == [[1, 1]]


# ---------------------------------------------------------------------------
# Bad records


def _bad_rows():
    ok = {"image": png(), "prompt": "describe", "chosen": "a", "rejected": "two"}
    blocks = lambda *b: [{"role": "user", "content": list(b)}]
    img_block, txt_block = {"type": "image"}, {"type": "text", "text": "describe"}
    return [
        ("images", {**rlaif_row(), "images": [b"not an image"]}, {}),
        ("images", {**rlaif_row(), "images": [png()[:60]]}, {}),  # truncated PNG
        ("images", {**rlaif_row(), "images": [{"bytes": None, "path": None}]}, {}),
        ("images", {**rlaif_row(), "images": [{"bytes": None, "path": "http://x/y.png"}]}, {}),
        ("images", {**rlaif_row(), "images": [{"bytes": None, "path": "/nonexistent/y.png"}]}, {}),
        ("images", {**rlaif_row(), "images": [png(), png()]}, {}),
        ("images", {**rlaif_row(), "images": "x.png"}, {}),
        ("image", {**ok, "image": np.zeros((4, 4), np.float32)}, {}),
        ("image", {**ok, "image": 3}, {}),
        ("image", {**ok, "image": None}, {}),
        ("images", {k: v for k, v in ok.items() if k != "image"}, {}),
        ("rejected", {k: v for k, v in ok.items() if k != "rejected"}, {}),
        ("prompt", {**ok, "prompt": blocks(img_block, img_block, txt_block)}, {}),
        ("prompt", {**ok, "prompt": "two <image> <image>"}, {}),
        ("prompt", {**ok, "prompt": 5}, {}),
        ("prompt", {**ok, "prompt": []}, {}),
        ("prompt", {**ok, "prompt": blocks({"type": "text", "text": None})}, {}),
        ("prompt", {**ok, "prompt": blocks({"type": "video"})}, {}),
        ("prompt", {**ok, "prompt": [{"role": "robot", "content": "hi"}]}, {}),
        ("prompt", {**ok, "prompt": [{"content": "hi"}]}, {}),
        ("prompt", {**ok, "prompt": [{"role": "user", "content": {"text": "hi"}}]}, {}),
        ("prompt", {**ok, "prompt": [{"role": "system", "content": "hi"}]}, {}),  # no user turn for the image
        ("prompt", {"prompt": " ", "chosen": "a", "rejected": "b"}, {"num_images": 0}),
        ("chosen", {**ok, "chosen": ""}, {}),
        ("chosen", {**ok, "chosen": "  "}, {}),
        ("chosen", {**ok, "chosen": None}, {}),
        ("chosen", {**ok, "chosen": "a " * 20}, {"max_text_chars": 30}),
        ("chosen", {**ok, "chosen": [{"role": "assistant", "content": [img_block]}]}, {}),
        ("chosen", {**ok, "chosen": "a <image>"}, {}),
        ("margin", {**ok, "margin": "high"}, {}),
        ("margin", {**ok, "margin": float("nan")}, {}),
        ("scene", {**ok, "scene": {"shapes": []}}, {}),
        ("messages", {"image": png(), "messages": [{"role": "user", "content": "describe"}]}, {"kind": "sft"}),
        ("completion", {"image": png(), "prompt": "describe"}, {"kind": "sft"}),
    ]


@pytest.mark.parametrize("i", range(len(_bad_rows())))
def test_bad_records_name_their_field(tok, i):
    field, row, kw = _bad_rows()[i]
    with pytest.raises(BadRecordError) as e:
        proc(tok, **kw)(row)
    assert e.value.field == field, str(e.value)


def test_bad_record_error_location():
    e = BadRecordError("images", "cannot decode image")
    assert str(e) == "field 'images': cannot decode image" and isinstance(e, ValueError)
    located = e.at("shard train-0.parquet, row 17")
    assert str(located) == "shard train-0.parquet, row 17: field 'images': cannot decode image"
    assert (located.field, located.reason, e.where) == ("images", "cannot decode image", None)


def test_config_and_tokenizer_checks(tok):
    for kw in (dict(kind="dpo"), dict(kind="sft", truncation_mode="left"), dict(kind="sft", max_length=0),
               dict(kind="sft", length_buckets=(32, 16)), dict(kind="sft", num_images=-1)):
        with pytest.raises(ValueError):
            ProcessorConfig(**kw)
    with pytest.raises(ValueError, match="image_token_index"):
        Processor(PALI.replace(image_token_index=7), tok, ProcessorConfig(kind="sft"))

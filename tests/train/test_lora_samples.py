"""LoRA dataset builder: prompts from the runtime templates, token ids as llama.cpp's mtmd sees them,
labels on the answer only, images through Gemma3ImageProcessorPil, padded batches, config and CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from vlm2vla_edge.runtime.config import ActionLanguage
from vlm2vla_edge.runtime.errors import ConfigError, UserError
from vlm2vla_edge.runtime.policy.prompts import DEFAULT_PROMPTS, MEDIA_MARKER
from vlm2vla_edge.train.data.dataset import DatasetWriter, Sample, SourceEpisode, read_dataset
from vlm2vla_edge.train.lora.config import TrainConfig, default_config_path, load_train_config
from vlm2vla_edge.train.lora.samples import chat_samples, to_chat_sample

INSTRUCTION = "put the carrot on the plate"
SCENE = "a carrot left of a plate; gripper open above the table"
SUBTASK = "pick up the carrot"
PLAN = "move the gripper left and down"
ACTION = "[[0.025, -0.01, 0, 1], [0, 0, 0.05, 0]]"
AUX_QUESTION = "The gripper moves by [0.03, 0, -0.02] m. Which way does it move?"


def make_dataset(path: Path, episodes: int = 2, steps: int = 2, image_size: tuple[int, int] = (64, 48)) -> Path:
    """A small labelled dataset in the train/data format: every stage, images and scene texts."""
    frames = path.parent / f"{path.name}-frames"
    frames.mkdir(parents=True, exist_ok=True)
    writer = DatasetWriter(path, "local", ActionLanguage())
    rng = np.random.default_rng(0)
    for e in range(episodes):
        episode = f"ep{e:03d}"
        samples = []
        for step in range(steps):
            frame = frames / f"{episode}-{step}.png"
            pixels = rng.integers(0, 255, (image_size[1], image_size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(frame)
            common = dict(episode=episode, step=step, instruction=INSTRUCTION, image=writer.copy_image(episode, frame),
                          scene=SCENE)
            base_id = f"{episode}/{step:06d}"
            samples += [
                Sample(id=f"{base_id}/subtasks", stage="subtasks", subtasks=[SUBTASK, "place it on the plate"],
                       target=json.dumps([SUBTASK, "place it on the plate"]), **common),
                Sample(id=f"{base_id}/motion", stage="motion", subtask=SUBTASK, subtask_index=0, target=PLAN, **common),
                Sample(id=f"{base_id}/action", stage="action", subtask=SUBTASK, subtask_index=0, motion_plan=PLAN,
                       target=ACTION, **common),
                Sample(id=f"{base_id}/aux", stage="aux", episode=episode, step=step, instruction=AUX_QUESTION,
                       target="right and down"),
            ]
        writer.add_episode(
            SourceEpisode(episode=episode, path=str(frames), content_hash="0" * 64, annotator="local", samples=0),
            samples,
        )
    writer.finish()
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return read_dataset(make_dataset(tmp_path_factory.mktemp("lora-samples") / "ds"))


@pytest.fixture(scope="module")
def tokenizer(gemma_tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gemma_tokenizer_dir))


# --- rendering (no torch) ----------------------------------------------------------------------------


def test_prompts_are_the_runtime_templates(dataset) -> None:  # type: ignore[no-untyped-def]
    by_stage = {c.stage: c for c in chat_samples(dataset, vision=True)}
    assert by_stage["subtasks"].prompt == DEFAULT_PROMPTS.render_subtasks_prompt(INSTRUCTION)
    assert by_stage["motion"].prompt == DEFAULT_PROMPTS.render_motion_prompt(INSTRUCTION, SUBTASK)
    assert by_stage["action"].prompt == DEFAULT_PROMPTS.render_action_prompt(INSTRUCTION, SUBTASK, PLAN)
    # The action prompt is the runtime's cached step prefix + the action suffix, byte for byte.
    assert by_stage["action"].prompt == (
        DEFAULT_PROMPTS.render_step_prefix(INSTRUCTION, SUBTASK) + DEFAULT_PROMPTS.render_action_suffix(PLAN)
    )
    assert by_stage["action"].answer == DEFAULT_PROMPTS.render_answer(ACTION) == ACTION + "<end_of_turn>\n"
    assert all(c.prompt.count(MEDIA_MARKER) == 1 and c.image is not None for c in by_stage.values() if c.stage != "aux")
    # aux: a self-contained question, no observation when the sample has neither image nor scene.
    aux = by_stage["aux"]
    assert aux.image is None and MEDIA_MARKER not in aux.prompt
    assert aux.prompt == f"<start_of_turn>user\nQuestion: {AUX_QUESTION}\n<end_of_turn>\n<start_of_turn>model\n"


def test_text_only_models_get_the_scene_text(dataset) -> None:  # type: ignore[no-untyped-def]
    chats = chat_samples(dataset, vision=False, stages=("motion",))
    assert {c.stage for c in chats} == {"motion"}
    assert chats[0].prompt == DEFAULT_PROMPTS.render_motion_prompt(INSTRUCTION, SUBTASK, SCENE)
    assert f"Scene: {SCENE}\n" in chats[0].prompt and chats[0].image is None


def test_a_sample_without_observation_is_refused_for_text_only_models(dataset) -> None:  # type: ignore[no-untyped-def]
    sample = next(s for s in dataset.samples if s.stage == "motion").model_copy(update={"scene": None})
    with pytest.raises(UserError, match="text-only model cannot see images"):
        to_chat_sample(sample, dataset.image_path(sample), vision=False)
    # A vision model takes its image instead.
    assert to_chat_sample(sample, dataset.image_path(sample), vision=True).has_image


def test_stage_selection_with_nothing_left_is_an_error(tmp_path: Path) -> None:
    ds = read_dataset(make_dataset(tmp_path / "ds", episodes=1, steps=1))
    only_aux = type(ds)(ds.path, ds.info, [s for s in ds.samples if s.stage == "aux"])
    with pytest.raises(UserError, match="no samples of stages"):
        chat_samples(only_aux, vision=True, stages=("action",))


# --- tokenization ------------------------------------------------------------------------------------


def _expand_image(ids: list[int], image_tokens) -> list[int]:  # type: ignore[no-untyped-def]
    """mtmd: the chat template's <start_of_image> becomes <start_of_image> + image embeddings + <end_of_image>."""
    out: list[int] = []
    for token in ids:
        out += image_tokens.ids() if token == image_tokens.boi_id else [token]
    return out


@pytest.mark.parametrize("stage", ["subtasks", "motion", "action"])
def test_vision_sample_tokens_match_the_chat_template_as_mtmd_expands_it(dataset, tokenizer, stage: str) -> None:  # type: ignore[no-untyped-def]
    from vlm2vla_edge.train.lora.collate import IGNORE_INDEX, ImageTokens, encode_sample

    image_tokens = ImageTokens(boi_id=255999, eoi_id=256000, image_id=262143, per_image=4)
    chat = next(c for c in chat_samples(dataset, vision=True) if c.stage == stage)
    encoded = encode_sample(chat, tokenizer, image_tokens)

    user_text = chat.prompt.removeprefix("<start_of_turn>user\n").split("<end_of_turn>")[0].replace(MEDIA_MARKER, "")
    target = chat.answer.removesuffix("<end_of_turn>\n")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text}]},
        {"role": "assistant", "content": target},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    expected = _expand_image(tokenizer(rendered, add_special_tokens=False)["input_ids"], image_tokens)
    assert encoded.input_ids == expected
    assert encoded.input_ids.count(image_tokens.image_id) == 4
    assert [t for t, k in zip(encoded.input_ids, encoded.token_type_ids) if k == 1] == [262143] * 4
    start = encoded.input_ids.index(255999)
    assert encoded.input_ids[start : start + 6] == [255999, 262143, 262143, 262143, 262143, 256000]
    # Labels: -100 on the whole prompt (bos, image, question, turn change), the answer tokens after it.
    answer = [label for label in encoded.labels if label != IGNORE_INDEX]
    n_prompt = len(encoded.labels) - len(answer)
    assert encoded.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert encoded.labels[n_prompt:] == encoded.input_ids[n_prompt:]
    assert tokenizer.decode(answer) == target + "<end_of_turn>\n"
    assert tokenizer.decode(encoded.input_ids[:n_prompt]).endswith("<start_of_turn>model\n")
    assert encoded.input_ids[0] == tokenizer.bos_token_id and encoded.input_ids.count(tokenizer.bos_token_id) == 1


def test_text_only_sample_tokens_have_no_image(dataset, tokenizer) -> None:  # type: ignore[no-untyped-def]
    from vlm2vla_edge.train.lora.collate import ImageTokens, encode_sample

    chat = next(c for c in chat_samples(dataset, vision=False) if c.stage == "action")
    encoded = encode_sample(chat, tokenizer, None)
    assert encoded.input_ids == tokenizer(chat.prompt + chat.answer)["input_ids"]
    assert 255999 not in encoded.input_ids and set(encoded.token_type_ids) == {0}
    vision_chat = next(c for c in chat_samples(dataset, vision=True) if c.stage == "action")
    with pytest.raises(UserError, match="text-only"):
        encode_sample(vision_chat, tokenizer, None)
    assert ImageTokens(1, 2, 3, 2).ids() == [1, 3, 3, 2]


def test_too_long_samples_are_skipped_and_named(dataset, tokenizer) -> None:  # type: ignore[no-untyped-def]
    from vlm2vla_edge.train.lora.collate import encode_all

    chats = chat_samples(dataset, vision=False)
    lengths = {c.id: len(tokenizer(c.prompt + c.answer)["input_ids"]) for c in chats}
    limit = sorted(lengths.values())[len(lengths) // 2]
    kept, skipped = encode_all(chats, tokenizer, None, max_length=limit)
    assert sorted(skipped) == sorted(i for i, n in lengths.items() if n > limit)
    assert all(len(e.input_ids) <= limit for e in kept) and len(kept) + len(skipped) == len(chats)


# --- images and batches ------------------------------------------------------------------------------


def test_images_go_through_the_pil_processor(dataset) -> None:  # type: ignore[no-untyped-def]
    transformers = pytest.importorskip("transformers")
    from vlm2vla_edge.train.lora.collate import load_pixels

    processor = transformers.Gemma3ImageProcessorPil(size={"height": 64, "width": 64})
    sample = next(s for s in dataset.samples if s.image)
    pixels = load_pixels(processor, dataset.image_path(sample))
    assert tuple(pixels.shape) == (3, 64, 64)
    assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0  # mean/std 0.5: [0, 1] → [-1, 1]
    broken = dataset.path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(UserError, match="cannot read image"):
        load_pixels(processor, broken)


@given(
    lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 10), st.booleans()), min_size=1, max_size=6),
    multiple=st.sampled_from([1, 8]),
)
def test_collated_rows_reproduce_their_samples(lengths, multiple: int) -> None:  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    from vlm2vla_edge.train.lora.collate import IGNORE_INDEX, Collator, EncodedSample

    items = []
    for index, (n_prompt, n_answer, with_image) in enumerate(lengths):
        ids = [10 + (index + k) % 50 for k in range(n_prompt + n_answer)]
        sample = EncodedSample(
            id=str(index),
            input_ids=ids,
            labels=[IGNORE_INDEX] * n_prompt + ids[n_prompt:],
            token_type_ids=[0] * len(ids),
            image=Path("x.png") if with_image else None,
        )
        items.append((sample, torch.full((3, 8, 8), float(index)) if with_image else None))
    batch = Collator(pad_id=0, vision=True, pad_to_multiple_of=multiple)(items)
    width = batch.input_ids.shape[1]
    assert width % multiple == 0 and width >= max(p + a for p, a, _ in lengths)
    for row, (sample, _) in enumerate(items):
        n = len(sample.input_ids)
        assert batch.input_ids[row, :n].tolist() == sample.input_ids
        assert batch.labels[row, :n].tolist() == sample.labels
        assert set(batch.input_ids[row, n:].tolist()) <= {0} and set(batch.labels[row, n:].tolist()) <= {IGNORE_INDEX}
        assert batch.attention_mask[row].tolist() == [1] * n + [0] * (width - n)
    images = [float(pixels[0, 0, 0]) for _, pixels in items if pixels is not None]
    if images:
        assert batch.pixel_values[:, 0, 0, 0].tolist() == images  # in batch order
    else:
        assert batch.pixel_values is None
    assert batch.answer_tokens == sum(a for _, a, _ in lengths)


# --- config and CLI ----------------------------------------------------------------------------------


def test_packaged_config_is_the_paper_recipe() -> None:
    config = load_train_config()
    assert default_config_path().is_file()
    assert (config.lora_rank, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    assert (config.learning_rate, config.epochs, config.mixed_precision) == (5e-5, 1, "auto")
    assert config == TrainConfig()  # the YAML spells out the defaults


@pytest.mark.parametrize(
    "text, message",
    [
        ("lora_rnak: 8\n", "unknown field"),
        ("learning_rate: -1\n", "learning_rate"),
        ("stages: [motion, motion]\n", "must not repeat"),
        ("max_steps: 5\nwarmup_steps: 5\n", "warmup_steps"),
        ("stages: [dance]\n", "stages"),
    ],
)
def test_bad_configs_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_train_config(path)


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vlm2vla_edge.train.lora.cli import main

    ds = tmp_path / "ds"
    args = ["--dataset", str(ds), "--base", str(tmp_path), "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "is not a folder" in capsys.readouterr().err
    ds.mkdir()
    assert main(args[:3] + [str(tmp_path / "nope")] + args[4:]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: 0\n")
    assert main(args + ["--config", str(bad)]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert main(args + ["--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # An unfinished dataset folder (no dataset.json) is refused by the dataset reader, still exit 2.
    (ds / "samples.jsonl").write_text("")
    assert main(args) == 2
    assert "dataset.json" in capsys.readouterr().err

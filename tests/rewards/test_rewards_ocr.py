"""OCR accuracy: the pure scoring rule, the reward contract with a stub engine, and real OCR on
text rendered with PIL."""

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFont

from dgpo_lightning.rewards import build
from dgpo_lightning.rewards.ocr import edit_distance, extract_quoted_text, normalize_text, ocr_accuracy


def _reference_distance(a: str, b: str) -> int:
    # Independent definition: the textbook recursion, memoised.
    @functools.lru_cache(maxsize=None)
    def d(i: int, j: int) -> int:
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


texts = st.text(alphabet="abcde xy", max_size=9)


@settings(max_examples=200, deadline=None)
@given(texts, texts)
def test_edit_distance_matches_recursive_definition(a, b):
    assert edit_distance(a, b) == _reference_distance(a, b) == edit_distance(b, a)


@settings(max_examples=100, deadline=None)
@given(texts, texts, texts)
def test_edit_distance_is_a_metric(a, b, c):
    assert (edit_distance(a, b) == 0) == (a == b)
    assert edit_distance(a, c) <= edit_distance(a, b) + edit_distance(b, c)
    assert abs(len(a) - len(b)) <= edit_distance(a, b) <= max(len(a), len(b))


def test_edit_distance_known_values():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert edit_distance("flaw", "lawn") == 2


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abcAB ", min_size=1, max_size=8).filter(lambda s: s.strip()), texts)
def test_ocr_accuracy_rule(target, recognized):
    t = target.replace(" ", "").lower()
    r = recognized.replace(" ", "").lower()
    expected = 1.0 if t in r else 1.0 - min(_reference_distance(r, t), len(t)) / len(t)
    assert ocr_accuracy(target, recognized) == pytest.approx(expected)
    assert 0.0 <= ocr_accuracy(target, recognized) <= 1.0


def test_ocr_accuracy_examples():
    assert ocr_accuracy("Hello World", "a sign: HELLOWORLD!") == 1.0  # contained, case/space-free
    assert ocr_accuracy("hello", "hallo") == pytest.approx(0.8)
    assert ocr_accuracy("hello", "") == 0.0
    assert ocr_accuracy("hi", "completely unrelated text") == 0.0  # distance clipped at len(target)
    with pytest.raises(ValueError, match="empty"):
        ocr_accuracy("  ", "x")


def test_extract_quoted_text():
    assert extract_quoted_text('a sign that says "Hello World" at night') == "Hello World"
    assert extract_quoted_text('a mug with “Good Morning” and "later"') == "Good Morning"
    assert normalize_text(" Hello\tWorld \n") == "helloworld"
    with pytest.raises(ValueError, match="no quoted target text in prompt 'a cat'"):
        extract_quoted_text("a cat")


def test_reward_contract_with_stub_engine():
    seen = []

    def engine(image):
        seen.append((image.dtype, image.shape))
        return "OPEN" if image.mean() > 127 else "CLOSED"

    reward = build("ocr", engine=engine)
    images = torch.stack([torch.ones(3, 8, 8), torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    prompts = ['a door sign "open"', 'a door sign "open"', 'a shop sign "closed now"']
    scores = reward(images, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    expected = [1.0, ocr_accuracy("open", "CLOSED"), ocr_accuracy("closed now", "OPEN")]
    torch.testing.assert_close(scores, torch.tensor(expected))
    assert seen[0] == (np.uint8, (8, 8, 3))
    # Batched == one by one, and deterministic.
    singles = torch.cat([reward(images[i : i + 1], prompts[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(scores, singles)
    torch.testing.assert_close(scores, reward(images, prompts))
    with pytest.raises(ValueError, match="no quoted target"):
        reward(images[:1], ["no quotes here"])
    with pytest.raises(ValueError, match="unknown OCR engine"):
        build("ocr", engine="tesseract")


def _render(text: str, size=(320, 96)) -> torch.Tensor:
    image = Image.new("RGB", size, "white")
    font = ImageFont.load_default(size=40)
    ImageDraw.Draw(image).text((12, 24), text, fill="black", font=font)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def test_real_ocr_on_rendered_text():
    pytest.importorskip("rapidocr", reason="rapidocr is not installed (optional extra: pip install -e '.[ocr]')")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (optional extra: pip install -e '.[ocr]')")
    reward = build("ocr")
    images = torch.stack([_render("HELLO"), _render("OPEN 24"), _render("")])
    prompts = ['a sign that says "hello"', 'a neon sign "Open 24"', 'a blank wall with "text"']
    scores = reward(images, prompts)
    assert scores.tolist()[:2] == [1.0, 1.0]
    assert scores[2] == 0.0  # nothing to read
    swapped = reward(images[:2], prompts[1::-1])
    assert (swapped < 0.5).all()
    assert reward.read_text((images[0].permute(1, 2, 0) * 255).byte().numpy()).replace(" ", "").lower() == "hello"

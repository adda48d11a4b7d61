"""The web page's logic without a browser: what Run shows, bad input as a message, the missing-Gradio hint."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

from dcris.app import INSTALL_HINT, MAX_PHRASES, example_images, run_phrases, show_image
from dcris.cli import main as cli_main
from dcris.draw import overlay

LONG = "the small red circle on the left next to the big blue square below the green triangle"


def test_run_shows_each_phrase_in_its_own_colour(tiny_segmenter, probe, tmp_path):
    image, phrases = probe
    path = tmp_path / "probe.png"
    Image.fromarray(image).save(path)
    picture, table, status = run_phrases(tiny_segmenter, str(path), "\n".join(phrases) + "\n\n")
    masks = [r.mask for r in tiny_segmenter(image, phrases)]
    np.testing.assert_array_equal(np.asarray(picture), np.asarray(overlay(Image.fromarray(image), masks)))
    assert table.count("<tr>") == 1 + len(phrases) and all(p in table for p in phrases)
    assert "rgb(255, 0, 255)" in table and "rgb(0, 200, 255)" in table  # the two tints, in order
    assert status.startswith("2 phrase(s) in ") and "error" not in status
    _, table, _ = run_phrases(tiny_segmenter, str(path), "<b>bold</b>")
    assert "&lt;b&gt;bold&lt;/b&gt;" in table  # phrases are shown as text, not markup


def test_bad_input_is_a_message(tiny_segmenter, probe, tmp_path):
    image, _ = probe
    path = tmp_path / "probe.png"
    Image.fromarray(image).save(path)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    for image_path, text, needle in (
        (None, "the red circle", "upload an image"),
        (str(path), "  \n ", "type a phrase"),
        (str(path), "\n".join(["the circle"] * (MAX_PHRASES + 1)), f"at most {MAX_PHRASES}"),
        (str(tmp_path / "junk.png"), "the red circle", "cannot read 'junk.png'"),
    ):
        picture, table, status = run_phrases(tiny_segmenter, image_path, text)
        assert picture is None and table == "" and status.startswith("**error:**") and needle in status, status
    assert show_image(str(tmp_path / "junk.png"))[2].startswith("**error:** cannot read 'junk.png'")
    assert np.array_equal(np.asarray(show_image(str(path))[0]), image)
    picture, table, status = run_phrases(tiny_segmenter, str(path), f"{LONG}\nthe red circle")
    assert picture is not None and "1 phrase(s) were too long and were cut" in status
    assert table.count("cut to the first 17 tokens") == 1


def test_examples_are_synthetic_images_with_their_phrases(tmp_path):
    examples = example_images(tmp_path)
    assert len(examples) == 4
    for path, phrases in examples:
        with Image.open(path) as im:
            assert im.mode == "RGB" and min(im.size) >= 160
        lines = phrases.splitlines()
        assert 1 <= len(lines) <= 2 and all(line.startswith("the ") for line in lines)


def test_app_without_gradio_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    assert cli_main(["app", "--weights", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {INSTALL_HINT}"] and 'pip install -e ".[app]"' in err[0]


@pytest.mark.parametrize("argv", [["app"], ["app", "--weights", "w", "--port", "x"]])
def test_app_arguments_are_checked(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(argv)
    assert exc.value.code == 2 and "usage: dcris app" in capsys.readouterr().err


def test_the_results_table_says_when_no_object_was_found():
    from dcris.app import results_table
    from dcris.segmenter import Segmentation

    mask = np.zeros((4, 5), dtype=bool)
    found = Segmentation("the red circle", mask | True, np.full((4, 5), 0.9), 0.9, 0.1, None, 0.8, True)
    missing = Segmentation("the yellow square", mask, np.full((4, 5), 0.6), 0.0, 0.1, None, 0.23, False)
    rows = results_table([found, missing], 17).split("<tr>")[2:]
    assert "no object found" not in rows[0]
    assert "no object found (target probability 0.23)" in rows[1] and "the yellow square" in rows[1]

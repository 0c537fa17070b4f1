"""Prompt syntax and embeddings on the command line and in the PNG metadata: --prompt-syntax
(default a1111), --embedding, --embedding-dir, A1111's "TI hashes", and --from."""

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.numpy import save_file

from mlx_sdxl.cli import main
from mlx_sdxl.metadata import format_parameters, parse_parameters, read_metadata

WEIGHTED = "a photo of a (cat:1.3), [blurry] BREAK \\(red\\) car\nin snow"
SMALL = ["--width", "64", "--height", "64", "--dtype", "float32", "--steps", "2", "--refiner", "none", "--quiet"]


def rerun(source, out, base, *flags):
    """generate --from SOURCE (the recorded model names are found next to the tiny base)."""
    return run("generate", "--from", source, "--output", out, "--models-dir", Path(base).parent, *flags)


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def write_embedding(path, n=2, w=64, **tensors):
    rng = np.random.default_rng(0)
    data = {"clip_l": rng.standard_normal((n, w)).astype(np.float32) * 0.2,
            "clip_g": rng.standard_normal((n, w)).astype(np.float32) * 0.2}
    data.update(tensors)
    save_file({k: v for k, v in data.items() if v is not None}, str(path))
    return path


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


@pytest.fixture(scope="module")
def base(tiny_sdxl):
    return str(tiny_sdxl[0])


def test_ti_hashes_format_and_parse():
    settings = {"prompt": WEIGHTED, "negative_prompt": "(ugly:1.2)", "num_inference_steps": 4, "scheduler": "euler",
                "guidance_scale": 5.0, "seed": 1, "embeddings": {"foxstyle": "0123456789ab", "easyneg": "ba9876543210"}}
    text = format_parameters(settings)
    assert 'TI hashes: "foxstyle: 0123456789ab, easyneg: ba9876543210"' in text  # quoted, as A1111 writes it
    back = parse_parameters(text)
    assert back["prompt"] == WEIGHTED and back["negative_prompt"] == "(ugly:1.2)"  # exactly as written
    assert back["embeddings"] == settings["embeddings"] and "TI hashes" not in back.get("extra", {})
    a1111 = 'a (fox:1.2)\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, TI hashes: "EasyNegative: c74b4e810b03"'
    assert parse_parameters(a1111)["embeddings"] == {"EasyNegative": "c74b4e810b03"}


def test_default_is_a1111_recorded_and_rerun_by_from(base, tmp_path):
    out = tmp_path / "w.png"
    rc, _, err = run("generate", WEIGHTED, "--negative-prompt", "(ugly:1.2)", "--model", base, *SMALL,
                     "--seed", "5", "--output", out)
    assert rc == 0, err
    s = read_metadata(out)
    assert s["prompt_syntax"] == "a1111" and s["prompt"] == WEIGHTED
    with Image.open(out) as im:
        assert im.text["parameters"].startswith(WEIGHTED + "\nNegative prompt: (ugly:1.2)\n")
    again = tmp_path / "again.png"
    assert rerun(out, again, base, "--quiet")[0] == 0
    assert np.array_equal(pixels(again), pixels(out)) and read_metadata(again)["prompt_syntax"] == "a1111"
    plain = tmp_path / "plain.png"
    assert rerun(out, plain, base, "--prompt-syntax", "plain", "--quiet")[0] == 0
    assert read_metadata(plain)["prompt_syntax"] == "plain"
    assert rerun(plain, tmp_path / "plain2.png", base, "--quiet")[0] == 0
    assert read_metadata(tmp_path / "plain2.png")["prompt_syntax"] == "plain"


def test_from_an_image_made_before_prompt_syntaxes_is_plain(base, tmp_path):
    out = tmp_path / "old.png"
    assert run("generate", "a photo of a cat", "--model", base, *SMALL, "--seed", "1", "--output", out)[0] == 0
    with Image.open(out) as im:
        settings = json.loads(im.text["mlx_sdxl"])
        settings.pop("prompt_syntax")
        info = PngInfo()
        info.add_text("mlx_sdxl", json.dumps(settings))
        im.save(tmp_path / "older.png", pnginfo=info)
    rc, _, err = rerun(tmp_path / "older.png", tmp_path / "re.png", base, "--quiet")
    assert rc == 0, err
    assert read_metadata(tmp_path / "re.png")["prompt_syntax"] == "plain"


def test_embedding_flags_and_ti_hashes(base, tmp_path):
    emb = write_embedding(tmp_path / "foxstyle.safetensors")
    digest = hashlib.sha256(emb.read_bytes()).hexdigest()[:12]
    out = tmp_path / "e.png"
    rc, _, err = run("generate", "a photo of (foxstyle:1.2)", "--model", base, *SMALL, "--seed", "2",
                     "--embedding", emb, "--output", out)
    assert rc == 0, err
    assert read_metadata(out)["embeddings"] == {"foxstyle": digest}
    with Image.open(out) as im:
        assert f'TI hashes: "foxstyle: {digest}"' in im.text["parameters"]
    folder = tmp_path / "embeddings"
    folder.mkdir()
    write_embedding(folder / "foxstyle.safetensors")
    write_embedding(folder / "sd15.safetensors", clip_l=None, clip_g=None, emb_params=np.zeros((1, 768), np.float32))
    via_dir = tmp_path / "d.png"
    rc, _, err = run("generate", "a photo of (foxstyle:1.2)", "--model", base, *SMALL, "--seed", "2",
                     "--embedding-dir", folder, "--output", via_dir)  # sd15 is not named: not loaded
    assert rc == 0, err
    assert np.array_equal(pixels(via_dir), pixels(out)) and read_metadata(via_dir)["embeddings"] == {"foxstyle": digest}
    rc, _, err = rerun(out, tmp_path / "f.png", base)  # the embedding is not loaded now
    assert rc == 0 and "note: the image used the embeddings foxstyle, which are not loaded now" in err


@pytest.mark.parametrize("flags, expected", [
    (["--embedding", "{tmp}/sd15.safetensors"], "is not an SDXL embedding (an SD 1.x/2.x embedding"),
    (["--embedding", "{tmp}/cat.safetensors"], "'cat' is already a word of CLIP's vocabulary"),
    (["--embedding", "{tmp}/wide.safetensors"], "clip_g vectors are 32 wide"),
    (["--embedding", "{tmp}/none.safetensors"], "embedding file not found"),
    (["--embedding-dir", "{tmp}/nowhere"], "embedding folder not found"),
    (["--prompt-syntax", "compel"], "invalid choice: 'compel'"),
])
def test_bad_embedding_or_syntax_exits_2_with_one_line(base, tmp_path, flags, expected):
    write_embedding(tmp_path / "sd15.safetensors", clip_l=None, clip_g=None, emb_params=np.zeros((1, 768), np.float32))
    write_embedding(tmp_path / "cat.safetensors")
    write_embedding(tmp_path / "wide.safetensors", clip_g=np.zeros((1, 32), np.float32),
                    clip_l=np.zeros((1, 64), np.float32))
    flags = [f.format(tmp=tmp_path) for f in flags]
    rc, stdout, err = run("generate", "a cat", "--model", base, *SMALL, "--output", tmp_path / "x.png", *flags)
    lines = err.strip().split("\n")
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("mlx-sdxl") and expected in lines[0], err
    assert not (tmp_path / "x.png").exists() and stdout == ""

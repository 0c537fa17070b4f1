"""CLIP tokenizers read offline from tokenizer/ and tokenizer_2/ folders."""

import gzip
import json
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mlx_sdxl.errors import InputError, WeightsError
from mlx_sdxl.tokenizer import PromptTruncatedWarning, load_tokenizer, tokenize
from tiny import _byte_chars, make_tokenizer_dir, tiny_vocab

PAD = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}


def ids_of(*words):
    vocab = tiny_vocab()[0]
    return [vocab[w + "</w>"] for w in words]


def make_legacy(folder: Path, pad_token: str) -> Path:
    """Rewrite a folder the way the SDXL repos hold it (transformers 4 era): vocab.json,
    merges.txt, special_tokens_map.json and a tokenizer_config.json with AddedToken
    dicts, but no tokenizer.json."""
    (folder / "tokenizer.json").unlink()

    def added(s):
        return {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    special = {"bos_token": added("<|startoftext|>"), "eos_token": added("<|endoftext|>"),
               "unk_token": added("<|endoftext|>"), "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        **special, "add_prefix_space": False, "clean_up_tokenization_spaces": True, "do_lower_case": True,
        "errors": "replace", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}))
    return folder


@pytest.fixture(scope="module", params=["saved", "legacy"])
def folders(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    out = {}
    for name, pad in PAD.items():
        out[name] = make_tokenizer_dir(root / name, pad_token=pad)
        if request.param == "legacy":
            make_legacy(out[name], pad)
    return out


def test_layout_and_pad_ids(folders):
    vocab = tiny_vocab()[0]
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert eos == len(vocab) - 1
    t1, t2 = load_tokenizer(folders["tokenizer"]), load_tokenizer(folders["tokenizer_2"])
    ids1 = tokenize(t1, ["a photo of a cat", ""])
    ids2 = tokenize(t2, ["A  photo of a CAT", ""])  # lower-cased, whitespace collapsed
    assert ids1.shape == ids2.shape == (2, 77) and ids1.dtype == np.int32
    words = ids_of("a", "photo", "of", "a", "cat")
    assert ids1[0].tolist() == [bos, *words, eos] + [eos] * 70  # CLIP-L pads with eos
    assert ids2[0].tolist() == [bos, *words, eos] + [0] * 70  # bigG pads with "!" = 0
    assert ids1[1].tolist() == [bos] + [eos] * 76
    assert ids2[1].tolist() == [bos, eos] + [0] * 75


def test_truncation_warns_with_dropped_text(folders):
    t = load_tokenizer(folders["tokenizer_2"])
    vocab = tiny_vocab()[0]
    prompt = " ".join(["red car"] * 37 + ["dog horse on mars"])  # 74 + 4 = 78 content tokens
    with pytest.warns(PromptTruncatedWarning, match=r"80 tokens long.*3 tokens were dropped: 'horse on mars'"):
        ids = tokenize(t, [prompt, "a dog"])
    assert ids[0, 0] == vocab["<|startoftext|>"] and ids[0, 76] == vocab["<|endoftext|>"]
    assert ids[0, 1:76].tolist() == ids_of("red", "car") * 37 + ids_of("dog")
    with warnings.catch_warnings():  # exactly 75 content tokens fit: no warning
        warnings.simplefilter("error")
        full = tokenize(t, [" ".join(["red car"] * 37 + ["dog"])])
    assert full[0].tolist() == ids[0].tolist()


def test_errors(tmp_path):
    with pytest.raises(WeightsError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(WeightsError, match="expected vocab.json and merges.txt.*found: vocab.json"):
        load_tokenizer(tmp_path)
    t = load_tokenizer(make_tokenizer_dir(tmp_path / "tokenizer"))
    with pytest.raises(InputError, match="list of strings"):
        tokenize(t, "a cat")
    with pytest.raises(InputError, match="empty"):
        tokenize(t, [])


def _open_clip_bpe():
    """open_clip's bpe_simple_vocab_16e6.txt.gz from an installed open_clip, or from an
    open_clip_torch wheel in $OPEN_CLIP_WHEEL_DIR or <tmp>/oc
    (`pip download --no-deps open_clip_torch -d /tmp/oc`)."""
    try:
        import open_clip

        path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
        if path.is_file():
            return path.read_bytes()
    except ImportError:
        pass
    for d in (os.environ.get("OPEN_CLIP_WHEEL_DIR"), os.path.join(tempfile.gettempdir(), "oc")):
        for wheel in sorted(Path(d).glob("open_clip_torch-*.whl")) if d else []:
            with zipfile.ZipFile(wheel) as z:
                return z.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    pytest.skip("open_clip's BPE file is not available (no open_clip, no open_clip_torch wheel)")


def test_real_clip_vocab(tmp_path):
    """The real 49408-token CLIP vocabulary, rebuilt the way CLIP's SimpleTokenizer builds it."""
    lines = gzip.decompress(_open_clip_bpe()).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    for name, pad in PAD.items():
        d = tmp_path / name
        d.mkdir()
        (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        make_legacy_like = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                            "unk_token": "<|endoftext|>", "pad_token": pad, "model_max_length": 77,
                            "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
        (d / "tokenizer_config.json").write_text(json.dumps(make_legacy_like))
    t1, t2 = load_tokenizer(tmp_path / "tokenizer"), load_tokenizer(tmp_path / "tokenizer_2")
    cat = [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenize(t1, ["a photo of a cat"])[0].tolist() == cat + [49407] * 70
    assert tokenize(t2, ["a photo of a cat"])[0].tolist() == cat + [0] * 70
    assert tokenize(t2, [""])[0].tolist() == [49406, 49407] + [0] * 75

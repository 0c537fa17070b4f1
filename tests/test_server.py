"""`mlx-sdxl serve`: every /sdapi/v1 endpoint through a real HTTP client, against a server on
a free loopback port with the tiny models: A1111's shapes, auth, validation (422 naming the
field), limits (422 / 413), names resolved only inside their folders, PNG metadata that
png-info reads back, and an unmodified A1111 client library (webuiapi)."""

import json
import os

import httpx
import numpy as np
import pytest
from PIL import Image

from mlx_sdxl.metadata import read_metadata
from mlx_sdxl.server import guards
from lora_files import kohya_file
from serve_harness import TINY, RunningServer, info_of, make_config, pixels, png_b64

AUTH = ("alice", "s3cret:with-colon")
OTHER = ("bob", "hunter2")
FAST = dict(TINY, steps=2, refiner_checkpoint="None")   # base only, two steps: ~0.3 s on 2 CPU cores


def _embedding(path, width):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file({"clip_l": rng.standard_normal((2, width)).astype(np.float32),
               "clip_g": rng.standard_normal((2, width)).astype(np.float32)}, str(path))


@pytest.fixture(scope="module")
def folders(tiny_sdxl, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    models, loras, embeddings = root / "models", root / "loras", root / "embeddings"
    for folder in (models, loras, embeddings):
        folder.mkdir()
    os.symlink(tiny_sdxl[0], models / "other")          # a second checkpoint (a diffusers folder)
    (models / "notes.txt").write_text("not a model")
    (loras / "styles").mkdir()
    kohya_file(loras / "styles" / "ink.safetensors", tiny_sdxl[2], std=0.4)  # a real LoRA for the tiny base
    (loras / "old.ckpt").write_bytes(b"pickle")             # never listed: pickle files are not loaded
    _embedding(embeddings / "foxstyle.safetensors", 64)      # the tiny text encoders are 64 wide
    _embedding(embeddings / "wide.safetensors", 768)         # an SDXL-size one: skipped, with the reason
    (root / "secret.safetensors").write_bytes(b"outside the folders")
    return root


@pytest.fixture(scope="module")
def server(tiny_sdxl, folders):
    config = make_config(tiny_sdxl[0], tiny_sdxl[1], credentials=dict([AUTH, OTHER]),
                         models_dir=folders / "models", lora_dir=folders / "loras",
                         embedding_dir=folders / "embeddings", outputs=folders / "outputs")
    srv = RunningServer(config)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, auth=AUTH, timeout=120, trust_env=False) as c:
        yield c


def _422(response, field):
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(d["loc"][-1] == field for d in detail), detail
    return next(d["msg"] for d in detail if d["loc"][-1] == field)


# ---------------------------------------------------------------- listings
def test_listings_have_a1111_shapes(client):
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"name": "Euler", "aliases": ["euler"], "options": {}} in samplers
    assert any(s["name"] == "DPM++ 2M Karras" for s in samplers)
    assert {s["name"] for s in client.get("/sdapi/v1/schedulers").json()} == {"automatic", "karras"}
    models = client.get("/sdapi/v1/sd-models").json()
    assert [m["title"] for m in models] == ["base", "refiner", "other"]   # no notes.txt
    assert set(models[0]) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert models[0]["hash"] and models[2]["hash"] is None          # only the loaded model is hashed
    assert client.get("/sdapi/v1/loras").json() == [
        {"name": "ink", "alias": "ink", "path": "styles/ink.safetensors", "metadata": {}}]
    embeddings = client.get("/sdapi/v1/embeddings").json()
    assert embeddings["loaded"] == {"foxstyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                                                 "shape": 128, "vectors": 2}}
    assert "768 wide" in embeddings["skipped"]["wide"]["error"]
    assert client.get("/sdapi/v1/upscalers").json() == []
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    for path in ("/sdapi/v1/refresh-checkpoints", "/sdapi/v1/refresh-loras"):
        assert client.post(path).status_code == 200
    options = client.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "base" and options["samples_format"] == "png"
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["current_image"] is None
    assert set(idle["state"]) >= {"job", "job_count", "job_no", "sampling_step", "sampling_steps", "interrupted"}


# ---------------------------------------------------------------- txt2img, png-info, outputs
def test_txt2img_batches_seeds_infotexts_and_png_info(client, folders):
    r = client.post("/sdapi/v1/txt2img", json=dict(TINY, prompt="a photo of a cat", negative_prompt="blurry",
                                                    steps=3, seed=41, batch_size=2, n_iter=2, cfg_scale=4.5,
                                                    sampler_name="DPM++ 2M", scheduler="Karras",
                                                    styles=["cinematic"]))
    assert r.status_code == 200, r.text
    body, info = r.json(), info_of(r)
    assert set(body) == {"images", "parameters", "info"} and len(body["images"]) == 4
    assert info["all_seeds"] == [41, 42, 43, 44] and info["seed"] == 41
    assert info["sampler_name"] == "DPM++ 2M Karras" and info["cfg_scale"] == 4.5
    assert any("styles are ignored" in n for n in info["notes"])
    assert body["parameters"]["prompt"] == "a photo of a cat" and body["parameters"]["n_iter"] == 2
    for b64, seed, infotext in zip(body["images"], info["all_seeds"], info["infotexts"]):
        assert f"Seed: {seed}," in infotext and "Negative prompt: blurry" in infotext
        read = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + b64}).json()
        assert read["info"] == infotext
        assert read["parameters"]["Seed"] == str(seed) and read["parameters"]["Prompt"] == "a photo of a cat"
        assert (read["parameters"]["Size-1"], read["parameters"]["Size-2"]) == ("64", "64")
        assert read["items"]["mlx_sdxl"]["scheduler"] == "dpmpp_2m_karras"
    saved = sorted((folders / "outputs").glob("*.png"))
    assert [p.name.split("-")[1] for p in saved[-4:]] == ["41.png", "42.png", "43.png", "44.png"]
    assert read_metadata(saved[-1])["seed"] == 44


def test_random_seed_refiner_and_model_override(client):
    r = client.post("/sdapi/v1/txt2img", json=dict(TINY, prompt="a red car", steps=5, seed=-1))
    info = info_of(r)
    assert 0 <= info["seed"] <= 2**32 - 1 and "Refiner: refiner" in info["infotexts"][0]
    assert info["sampler_name"] == "Euler"     # no sampler named: the model's own (its config names Euler)
    alone = client.post("/sdapi/v1/txt2img", json=dict(FAST, prompt="a red car", seed=7,
                                                       override_settings={"sd_model_checkpoint": "other"}))
    assert "Model: other" in info_of(alone)["infotexts"][0] and "Refiner" not in info_of(alone)["infotexts"][0]
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "base"  # only for that request


def test_options_switch_the_checkpoint(client):
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "other"}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "other"
    r = client.post("/sdapi/v1/txt2img", json=dict(FAST, prompt="a cat", seed=1))
    assert info_of(r)["sd_model_name"] == "other"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "base"}).status_code == 200
    assert info_of(client.post("/sdapi/v1/txt2img", json=dict(FAST, prompt="a cat", seed=1)))["sd_model_name"] == "base"


def test_embeddings_from_the_folder_work_in_prompts(client):
    plain = client.post("/sdapi/v1/txt2img", json=dict(FAST, prompt="a photo of a cat", seed=3))
    styled = client.post("/sdapi/v1/txt2img", json=dict(FAST, prompt="a photo of (foxstyle:1.2)", seed=3))
    assert "TI hashes: \"foxstyle: " in info_of(styled)["infotexts"][0]
    assert not np.array_equal(pixels(plain.json()["images"][0]), pixels(styled.json()["images"][0]))


def test_img2img_and_inpainting(client):
    rng = np.random.default_rng(1)
    source = Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8))
    r = client.post("/sdapi/v1/img2img", json=dict(prompt="a cat", init_images=[png_b64(source)], steps=4,
                                                   denoising_strength=0.5, seed=9, width=64, height=64,
                                                   resize_mode=1))
    assert r.status_code == 200, r.text
    info = info_of(r)
    assert info["denoising_strength"] == 0.5 and "Denoising strength: 0.5" in info["infotexts"][0]
    assert pixels(r.json()["images"][0]).shape == (64, 64, 3)
    assert r.json()["parameters"]["init_images"] is None            # not echoed back (include_init_images)
    own = client.post("/sdapi/v1/img2img", json=dict(prompt="a cat", init_images=[png_b64(source)], steps=4))
    assert info_of(own)["width"] == 96 and info_of(own)["height"] == 80   # no size: the picture's own
    mask = np.zeros((80, 96), np.uint8)
    mask[:, :40] = 255                                               # repaint the left part
    painted = client.post("/sdapi/v1/img2img", json=dict(
        prompt="a cat", init_images=[png_b64(source)], mask=png_b64(Image.fromarray(mask)), steps=4, seed=9,
        denoising_strength=0.9, mask_blur=2, inpaint_full_res=False, inpainting_fill=1))
    assert painted.status_code == 200, painted.text
    out = pixels(painted.json()["images"][0])
    assert np.array_equal(out[:, 60:], np.asarray(source)[:, 60:])   # the kept part is the original
    assert not np.array_equal(out[:, :30], np.asarray(source)[:, :30])
    assert '"mode": "inpaint"' in __import__("serve_harness").decode_png(painted.json()["images"][0]).info["mlx_sdxl"]


def test_loras_from_prompt_tags(client, folders):
    plain = client.post("/sdapi/v1/txt2img", json=dict(FAST, prompt="a photo of a cat", seed=4))
    tagged = client.post("/sdapi/v1/txt2img", json=dict(FAST, prompt="a photo of a cat <lora:ink:0.9>", seed=4))
    assert tagged.status_code == 200, tagged.text
    assert info_of(tagged)["infotexts"][0].startswith("a photo of a cat <lora:ink:0.9>")   # as written
    assert not np.array_equal(pixels(plain.json()["images"][0]), pixels(tagged.json()["images"][0]))
    again = client.post("/sdapi/v1/txt2img", json=dict(FAST, prompt="a photo of a cat", seed=4))
    assert np.array_equal(pixels(plain.json()["images"][0]), pixels(again.json()["images"][0]))  # taken off
    for name in ("nothing", "../secret", "styles/../../secret"):
        r = client.post("/sdapi/v1/txt2img", json=dict(FAST, prompt=f"x <lora:{name}:1>"))
        assert r.status_code == 404 and "looked up only inside" in r.json()["detail"]


# ---------------------------------------------------------------- validation and limits
@pytest.mark.parametrize("payload, field, words", [
    (dict(steps=0), "steps", "greater than or equal to 1"),
    (dict(cfg_scale="lots"), "cfg_scale", "number"),
    (dict(width=100), "width", "multiple of 8"),
    (dict(seed=-5), "seed", "greater than or equal to -1"),
    (dict(sampler_name="Heun"), "sampler_name", "accepted: DDIM"),
    (dict(sampler_name="Euler a", scheduler="Karras"), "scheduler", "Karras is available for"),
    (dict(scheduler="exponential"), "scheduler", "accepted: Automatic, Karras"),
    (dict(script_name="X/Y plot"), "script_name", "not supported"),
    (dict(prompt="a cat <lora:ink:0.8:0.5>"), "prompt", "separate text-encoder and UNet scales"),
    (dict(negative_prompt="<lora:ink:x>"), "negative_prompt", "is not a number"),
    (dict(refiner_switch_at=1.5), "refiner_switch_at", "less than or equal to 1"),
])
def test_bad_fields_give_422_naming_the_field(client, payload, field, words):
    assert words in _422(client.post("/sdapi/v1/txt2img", json=dict(FAST, **payload)), field)


def test_img2img_refusals(client):
    image = png_b64(Image.new("RGB", (64, 64)))
    assert "not valid base64" in _422(client.post(
        "/sdapi/v1/img2img", json=dict(prompt="x", init_images=[image], mask="%%")), "mask")
    assert "mask_blur must be in [0, 256]" in _422(client.post(
        "/sdapi/v1/img2img", json=dict(prompt="x", init_images=[image], mask=image, mask_blur=300)), "mask_blur")
    assert "needs one input picture" in _422(client.post("/sdapi/v1/img2img", json=dict(prompt="x")), "init_images")
    assert "not valid base64" in _422(client.post("/sdapi/v1/img2img", json=dict(prompt="x", init_images=["%%"])),
                                      "init_images")
    assert "fetches nothing" in _422(client.post("/sdapi/v1/img2img", json=dict(
        prompt="x", init_images=["http://127.0.0.1:1/x.png"])), "init_images")
    assert "give both width and height" in _422(client.post("/sdapi/v1/img2img", json=dict(
        prompt="x", init_images=[image], width=64)), "height")
    big = png_b64(Image.new("RGB", (512, 512)))  # 0.26 MP, over the test server's 0.1
    assert "megapixels" in _422(client.post("/sdapi/v1/img2img", json=dict(prompt="x", init_images=[big])),
                                "init_images")


def test_limits_give_422_and_413(client, server):
    assert "--max-megapixels" in _422(client.post("/sdapi/v1/txt2img", json=dict(prompt="x", width=512,
                                                                                 height=512)), "width")
    assert "--max-images" in _422(client.post("/sdapi/v1/txt2img", json=dict(FAST, batch_size=3, n_iter=2)),
                                  "batch_size")
    assert "--max-steps" in _422(client.post("/sdapi/v1/txt2img", json=dict(FAST, steps=41)), "steps")
    huge = json.dumps({"prompt": "x" * (1024 * 1024 + 10)}).encode()
    r = client.post("/sdapi/v1/txt2img", content=huge, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "--max-body-mb" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        for _ in range(20):
            yield b" " * 65536
    r = client.post("/sdapi/v1/txt2img", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413


def test_help_lists_every_limit(capsys):
    from mlx_sdxl.server.cli import build_parser

    text = build_parser("mlx-sdxl serve").format_help()
    for flag in ("--max-megapixels", "--max-images", "--max-steps", "--max-body-mb", "--max-queue"):
        assert flag in text


# ---------------------------------------------------------------- security
def test_auth_401_without_or_with_wrong_credentials(server):
    for auth in (None, ("alice", "wrong"), ("mallory", AUTH[1]), ("", "")):
        r = httpx.get(server.url + "/sdapi/v1/options", auth=auth, trust_env=False)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(server.url + "/", auth=None, trust_env=False).status_code == 401  # the page too
    assert httpx.get(server.url + "/sdapi/v1/options", auth=OTHER, trust_env=False).status_code == 200
    r = httpx.post(server.url + "/sdapi/v1/txt2img", auth=None, content=b"x" * (2 * 1024 * 1024),
                   trust_env=False)
    assert r.status_code == 401  # refused before its body is read


def test_auth_compares_every_credential_in_constant_time(server, monkeypatch):
    calls = []

    def counting(a, b):
        calls.append((len(a), len(b)))
        return guards.hmac.compare_digest(a, b)

    monkeypatch.setattr(guards, "compare_digest", counting)
    for auth in (None, ("mallory", "x"), ("alice", "wrong"), AUTH):
        calls.clear()
        httpx.get(server.url + "/sdapi/v1/progress", auth=auth, trust_env=False)
        assert len(calls) == 4   # both users × (user, password), for a right, a wrong and a missing login alike
        assert all(a == b == 32 for a, b in calls)   # SHA-256 digests: equal lengths, whatever was sent


@pytest.mark.parametrize("name", ["../other", "/etc/passwd", "..\\other", "other/../../secret", "secret",
                                  "notes.txt", "secret.safetensors"])
def test_names_resolve_only_inside_their_folders(client, folders, name):
    payloads = [dict(FAST, prompt="x", override_settings={"sd_model_checkpoint": name}),
                dict(TINY, steps=2, prompt="x", refiner_checkpoint=name)]
    for payload in payloads:
        r = client.post("/sdapi/v1/txt2img", json=payload)
        assert r.status_code == 404 and "looked up only inside" in r.json()["detail"], r.text
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": str(folders / "secret.safetensors")})
    assert r.status_code == 404
    assert client.get("/static/../cli.py").status_code == 404
    assert client.get("/static/%2e%2e/cli.py").status_code == 404


# ---------------------------------------------------------------- an A1111 client library
def test_webuiapi_client_works_unchanged(server):
    import webuiapi

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username=AUTH[0], password=AUTH[1],
                            sampler="Euler", steps=2)
    api.session.trust_env = False  # loopback only, whatever proxy the environment names
    result = api.txt2img(prompt="a photo of a dog", seed=12, cfg_scale=5, **TINY)
    assert result.image.size == (64, 64) and result.info["all_seeds"] == [12]
    assert "Seed: 12," in result.image.info["parameters"]
    assert "base" in api.util_get_model_names() and api.util_get_current_model() == "base"
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    assert api.png_info(result.image).info.startswith("a photo of a dog")
    assert api.get_progress()["state"]["job"] == ""
    api.interrupt()
    api.skip()

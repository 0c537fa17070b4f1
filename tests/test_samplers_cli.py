"""Issue 17 in the command line and the PNG metadata: the samplers by name (A1111's names in the
`parameters` chunk), --timestep-spacing ("SGM Uniform"), --eta, --prediction-type, and --from."""

import contextlib
import io
import json
import shutil

import pytest
from PIL import Image

from mlx_sdxl.cli import main
from mlx_sdxl.metadata import A1111_SAMPLERS, format_parameters, parse_parameters, read_metadata
from mlx_sdxl.schedulers import SCHEDULERS
from tiny import SCHEDULER_CONFIG

SMALL = ["--width", "64", "--height", "64", "--dtype", "float32", "--quiet"]


def run(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def parameters(path):
    with Image.open(path) as im:
        return im.text["parameters"].split("\n")[-1]


@pytest.mark.parametrize("name,a1111", [
    ("lcm", "LCM"), ("tcd", "TCD"), ("dpmpp_2m_sde", "DPM++ 2M SDE"), ("dpmpp_2m_sde_karras", "DPM++ 2M SDE Karras"),
    ("unipc", "UniPC"), ("euler_karras", "Euler Karras"), ("euler", "Euler"), ("euler_a", "Euler a"),
    ("dpmpp_2m", "DPM++ 2M"), ("dpmpp_2m_karras", "DPM++ 2M Karras"), ("ddim", "DDIM"),
])
def test_a1111_names_round_trip(name, a1111):
    text = format_parameters({"prompt": "a cat", "scheduler": name, "num_inference_steps": 4, "seed": 1})
    assert f"Sampler: {a1111}," in text
    assert parse_parameters(text)["scheduler"] == name
    assert set(A1111_SAMPLERS) == set(SCHEDULERS)


def test_a1111_split_form_and_sgm_uniform():
    # A1111 >= 1.9 writes the schedule apart; "SGM Uniform" is trailing spacing
    s = parse_parameters("a cat\nSteps: 4, Sampler: Euler, Schedule type: Karras, CFG scale: 1, Seed: 2")
    assert s["scheduler"] == "euler_karras" and "timestep_spacing" not in s
    s = parse_parameters("a cat\nSteps: 4, Sampler: Euler a, Schedule type: SGM Uniform, CFG scale: 0, Seed: 2")
    assert (s["scheduler"], s["timestep_spacing"]) == ("euler_a", "trailing")
    text = format_parameters({"prompt": "a cat", "scheduler": "euler", "timestep_spacing": "trailing", "seed": 1})
    assert "Sampler: Euler, Schedule type: SGM Uniform," in text
    assert "Schedule type" not in format_parameters({"prompt": "a", "scheduler": "euler", "timestep_spacing": "leading"})
    # a Karras sampler's sigmas do not follow the spacing: no second schedule type
    assert "Schedule type" not in format_parameters({"prompt": "a", "scheduler": "dpmpp_2m_karras",
                                                     "timestep_spacing": "trailing"})


@pytest.fixture(scope="module")
def models(tiny_sdxl):
    return str(tiny_sdxl[0]), str(tiny_sdxl[1])


def test_cli_few_steps_run_records_the_sampler(models, tmp_path):
    base, _ = models
    out = tmp_path / "turbo.png"
    rc, _, err = run("generate", "a photo of a cat", "--model", base, "--refiner", "none", *SMALL, "--steps", "4",
                     "--guidance", "0", "--scheduler", "euler_a", "--timestep-spacing", "trailing", "--seed", "3",
                     "--output", out)
    assert rc == 0, err
    assert "Sampler: Euler a, Schedule type: SGM Uniform, CFG scale: 0.0" in parameters(out)
    s = read_metadata(out)
    assert (s["scheduler"], s["timestep_spacing"]) == ("euler_a", "trailing")
    again = tmp_path / "again.png"
    rc, _, err = run("generate", "--from", out, "--model", base, "--output", again, "--quiet")
    assert rc == 0, err
    with Image.open(out) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()  # --from replays the sampler and its spacing


def test_cli_tcd_eta_and_the_model_default(models, tmp_path):
    base, _ = models
    out = tmp_path / "tcd.png"
    rc, _, err = run("generate", "a cat", "--model", base, "--refiner", "none", *SMALL, "--steps", "2",
                     "--guidance", "1", "--scheduler", "tcd", "--eta", "0.5", "--seed", "4", "--output", out)
    assert rc == 0, err
    s = read_metadata(out)
    assert (s["scheduler"], s["eta"], s.get("timestep_spacing")) == ("tcd", 0.5, None)
    assert "Sampler: TCD," in parameters(out)
    # no --scheduler: the model's own sampler, recorded by name
    folder = tmp_path / "lcm-model"
    shutil.copytree(base, folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({**SCHEDULER_CONFIG, "_class_name": "LCMScheduler"}))
    out = tmp_path / "lcm.png"
    rc, _, err = run("generate", "a cat", "--model", folder, "--refiner", "none", *SMALL, "--steps", "2",
                     "--guidance", "1", "--seed", "4", "--output", out)
    assert rc == 0, err
    assert read_metadata(out)["scheduler"] == "lcm" and "Sampler: LCM," in parameters(out)


def test_cli_prediction_type_flag(models, tmp_path):
    base, _ = models
    outs = []
    for flag in ([], ["--prediction-type", "v_prediction"]):
        outs.append(tmp_path / f"p{len(outs)}.png")
        rc, _, err = run("generate", "a cat", "--model", base, "--refiner", "none", *SMALL, "--steps", "3",
                         "--seed", "5", "--output", outs[-1], *flag)
        assert rc == 0, err
    assert read_metadata(outs[1])["prediction_type"] == "v_prediction"
    with Image.open(outs[0]) as a, Image.open(outs[1]) as b:
        assert a.tobytes() != b.tobytes()


@pytest.mark.parametrize("flags,match", [
    (["--scheduler", "heun"], "invalid choice: 'heun'"),
    (["--timestep-spacing", "sgm"], "invalid choice: 'sgm'"),
    (["--prediction-type", "x0"], "invalid choice: 'x0'"),
    (["--scheduler", "euler", "--eta", "0.3"], "eta applies to the tcd sampler only"),
    (["--scheduler", "tcd", "--eta", "1.5"], r"eta must be a number in \[0, 1\]"),
    (["--scheduler", "lcm", "--timestep-spacing", "trailing"], "--timestep-spacing does not apply to the lcm"),
    (["--scheduler", "lcm", "--steps", "4"], "none of the 4 lcm steps"),  # with the refiner, at 0.8
])
def test_cli_bad_sampler_flags(models, tmp_path, flags, match):
    import re

    base, refiner = models
    rc, stdout, err = run("generate", "a cat", "--model", base, "--refiner", refiner, *SMALL,
                          "--output", tmp_path / "x.png", *flags)
    assert rc == 2 and re.search(match, err), err
    assert not (tmp_path / "x.png").exists() and stdout == ""


def test_bench_few_steps_against_the_default_run(tmp_path):
    """`mlx-sdxl bench --few-steps 2`: a guidance-0, Euler-trailing, base-only image in the same process."""
    from bench.cli import main as bench_main

    out = tmp_path / "r.json"
    rc = bench_main(["--tiny", "--width", "64", "--height", "64", "--steps", "4", "--few-steps", "2", "--repeats",
                     "1", "--warmup", "1", "--only", "e2e", "--json", str(out)], prog="mlx-sdxl bench")
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["settings"]["few_steps"] == 2
    full, few = report["results"]
    assert (full["name"], full["unet_evaluations"], full["guidance_scale"]) == ("e2e", 8, 5.0)
    assert (few["name"], few["steps"], few["unet_evaluations"], few["guidance_scale"]) == ("e2e_few_steps", 2, 2, 0.0)
    assert (few["scheduler"], few["timestep_spacing"], few["high_noise_frac"]) == ("euler", "trailing", None)
    assert "refiner" in full["per_stage_seconds"] and "refiner" not in few["per_stage_seconds"]
    assert few["per_stage_seconds"]["base"] < full["per_stage_seconds"]["base"]
    assert bench_main(["--tiny", "--few-steps", "0"]) == 2

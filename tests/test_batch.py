"""`mlx-sdxl batch` on one machine, on the tiny SDXL folders (64x64, float32): jobs read by
generate's own parser, images equal to `generate`'s, failures logged with their line,
resumable after Ctrl-C, changed settings made again."""

import contextlib
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlx_sdxl.batch.cli import main as batch_main
from mlx_sdxl.batch.jobs import parse_jobs, read_jobs
from mlx_sdxl.batch.local import remove_rank_temps, save_from_rank
from mlx_sdxl.batch.options import GenerateOptions, derived_seed, job_argv, read_defaults
from mlx_sdxl.batch.progress import BatchProgress
from mlx_sdxl.batch.stages import parse_stages
from mlx_sdxl.cli import main as cli_main
from mlx_sdxl.errors import InputError
from mlx_sdxl.metadata import read_metadata
from mlx_sdxl.tempfiles import remove_stale

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ["--width", "64", "--height", "64", "--dtype", "float32", "--steps", "3"]
# 12 jobs: 10 good (most share the command line's settings), 2 bad: line 5 fails its checks
# before anything runs, line 11's image is missing, which only shows when the job runs.
JOBS = [
    {"prompt": "a photo of a red cat", "seed": 1},
    {"prompt": "a photo of a dog", "seed": 2},
    {"prompt": "a green tree in snow", "negative_prompt": "blurry", "seed": 3},
    {"prompt": "an astronaut riding a horse", "seed": 4, "steps": 4},
    {"prompt": "bad steps", "steps": 0},
    {"prompt": "a red car", "seed": 5, "guidance": 7.5},
    {"prompt": "the horse on mars", "seed": 6, "scheduler": "euler_a"},
    {"prompt": "a cat", "seed": 7, "high-noise-frac": 0.5},
    {"prompt": "a dog in snow", "seed": 8, "prompt_syntax": "plain"},
    {"prompt": "a photo of a cat", "seed": 9, "image": "start.png", "strength": 0.5},
    {"prompt": "refine nothing", "seed": 10, "image": "missing.png"},
    {"prompt": "an ugly tree", "seed": 11},
]
GOOD = [i for i in range(12) if i not in (4, 10)]


def run(*argv, cwd=None):
    """batch's main(argv) in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = batch_main([str(a) for a in argv])
    finally:
        os.chdir(old)
    return rc, out.getvalue(), err.getvalue()


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def log(folder):
    return [json.loads(line) for line in (Path(folder) / "batch-log.jsonl").read_text().splitlines()]


def last_run(folder):
    entries = log(folder)
    run_id = entries[-1]["run"]
    return [e for e in entries if e["run"] == run_id]


def write_jobs(folder, jobs):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "jobs.jsonl"
    path.write_text("\n".join(json.dumps(j) for j in jobs) + "\n")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "start.png")
    return path


@pytest.fixture(scope="module")
def models(tiny_sdxl):
    base_dir, refiner_dir, _, _ = tiny_sdxl
    return ["--model", str(base_dir), "--refiner", str(refiner_dir)]


@pytest.fixture(scope="module")
def batch12(models, tmp_path_factory):
    """The 12-job batch, run once in-process; reused by several tests (copy before changing it)."""
    work = tmp_path_factory.mktemp("batch12")
    jobs = write_jobs(work, JOBS)
    rc, stdout, stderr = run(jobs, "--out", work / "out", *models, *DEFAULTS, cwd=work)
    return work, jobs, rc, stdout, stderr


# ---------------------------------------------------------------- reading jobs (no model runs)
def test_job_files_jsonl_and_plain_text():
    jobs = parse_jobs('\n{"prompt": "a", "seed": 1}\n# a comment\n[1]\n{"prompt": \n')
    assert [(j.index, j.line) for j in jobs] == [(1, 2), (2, 4), (3, 5)]
    assert jobs[0].options == {"prompt": "a", "seed": 1} and jobs[0].error is None
    assert "not an object" in jobs[1].error and "not valid JSON" in jobs[2].error
    plain = parse_jobs("a red fox\n\n  # not a comment in a prompt list\n")
    assert [(j.line, j.options["prompt"]) for j in plain] == [(1, "a red fox"), (3, "# not a comment in a prompt list")]


def test_unusable_job_files_are_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    for name, words in (("empty.txt", "holds no job"), ("latin.txt", "not UTF-8"), ("nope.jsonl", "not found")):
        with pytest.raises(InputError, match=words):
            read_jobs(tmp_path / name)


def test_job_keys_are_generate_options():
    opts = GenerateOptions()
    assert job_argv(opts, {"negative-prompt": "-blurry", "steps": 4, "seed": [1, 2], "prompt": "--x"}) == \
        ["--negative-prompt=-blurry", "--steps=4", "--seed", "1", "2", "--", "--x"]
    for options, words in (({"stpes": 4}, "unknown key 'stpes'; accepted: prompt, negative_prompt"),
                           ({"model": "x"}, "holds for the whole batch: give --model on the command line"),
                           ({"output": "x.png"}, "give the folder with --out DIR"),
                           ({"steps": True}, "must be a number or a string"),
                           ({"seed": [1, None]}, "must be a list of numbers"),
                           ({"steps": 3, "num-inference-steps": 4}, "unknown key"),
                           ({"negative_prompt": "a", "negative-prompt": "b"}, "the same option"),
                           ({"prompt": 3}, "'prompt' must be a string")):
        with pytest.raises(InputError, match=words):
            job_argv(opts, options)


def test_command_line_defaults_are_checked_before_any_work(tiny_sdxl, tmp_path):
    opts = GenerateOptions()
    base = str(tiny_sdxl[0])
    for argv, words in ((["--metadata", "none"], "needs each image's metadata"), (["--output", "x"], "--out DIR"),
                        (["--from", "x.png"], "--from is not used"), (["--steps", "0"], "--steps must be"),
                        (["stray"], "prompts come from the job file"), (["--overwrite"], "are made again")):
        with pytest.raises(InputError, match=words):
            read_defaults(opts, ["--model", base, *argv])
    assert derived_seed(3, {"prompt": "a"}) == derived_seed(3, {"prompt": "a"}) != derived_seed(4, {"prompt": "a"})
    assert parse_stages("refiner@1, base@0") == "base@0,refiner@1"
    with pytest.raises(InputError, match="accepted is base@0,refiner@1"):
        parse_stages("base@1,refiner@0")


def test_bad_command_lines_exit_2_with_one_line(tiny_sdxl, tmp_path):
    jobs = tmp_path / "j.txt"
    jobs.write_text("a cat\n")
    for argv, words in (([jobs], "the following arguments are required: --out"),
                        ([tmp_path / "none.jsonl", "--out", tmp_path / "o", "--model", tiny_sdxl[0]], "not found"),
                        ([jobs, "--out", tmp_path / "o", "--steps", "x"], "invalid int value"),
                        ([jobs, "--out", tmp_path / "o", "--stages", "base@0"], "accepted is base@0,refiner@1")):
        rc, stdout, stderr = run(*argv)
        assert rc == 2 and stderr.count("\n") == 1 and words in stderr and stdout == "", stderr
    assert not (tmp_path / "o").exists()


def test_one_progress_bar_on_a_terminal():
    stream = io.StringIO()
    bar = BatchProgress(4, stream, bar=True, min_interval=0)
    for n in range(3):
        bar.begin_image(2)
        for stage, step in (("base", 1), ("base", 2), ("decode", 1)):
            bar(stage, step, 2)
        bar.image_finished()
    bar.line("note")
    bar.end()
    text = stream.getvalue()
    assert "batch [" in text and "3/4 images" in text and "ETA" in text
    assert text.count("\n") == 1 and text.endswith("\r\033[K")  # only the note ended a line


def test_other_ranks_temporaries_survive_this_machines_cleanup(tmp_path):
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    path = save_from_rank(image, {"prompt": "x", "seed": 1}, tmp_path / "0001-abc.png", "0123456789ab", 2)
    assert read_metadata(path)["seed"] == 1 and sorted(os.listdir(tmp_path)) == ["0001-abc.png"]
    live = tmp_path / ".0002-def.png.0123456789ab-r1.tmp"  # another machine's write in progress
    live.write_bytes(b"partial")
    remove_stale(tmp_path)  # this machine's cleanup of dead process ids leaves it alone
    assert live.exists()
    remove_rank_temps(tmp_path)  # rank 0 at the start of the next run removes it
    assert sorted(os.listdir(tmp_path)) == ["0001-abc.png"]


# ---------------------------------------------------------------- the 12-job batch
def test_twelve_jobs_make_ten_images_equal_to_generate_and_log_two_failures(batch12, models, tmp_path):
    work, _, rc, stdout, stderr = batch12
    out = work / "out"
    names = sorted(p.name for p in out.glob("*.png"))
    assert rc == 1 and len(names) == 10 and len(stdout.split()) == 10
    assert sorted(Path(p).name for p in stdout.split()) == names
    assert "10 made, 2 failed, 0 skipped" in stderr and "\r" not in stderr
    entries = last_run(out)
    failed = [(e["job"], e["line"]) for e in entries if e["event"] == "failed"]
    assert failed == [(5, 5), (11, 11)]
    assert "job 5 (line 5) failed: --steps must be an integer >= 1" in stderr
    assert "job 11 (line 11) failed: --image" in stderr and "file not found" in stderr
    end = entries[-1]
    assert (end["event"], end["status"], end["done"], end["failed"], end["skipped"]) == ("end", "complete", 10, 2, 0)
    done = {e["job"]: e["file"] for e in entries if e["event"] == "done"}
    assert sorted(done) == [i + 1 for i in GOOD] and all(f.startswith(f"{j:04d}-") for j, f in done.items())
    for i in GOOD:  # each equals `mlx-sdxl generate` with the same options, pixels and metadata
        job = dict(JOBS[i])
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in job.items() if k not in ("prompt", "image")]
        if "image" in job:
            flags.append(f"--image={work / job['image']}")
        ref = tmp_path / f"ref{i}.png"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert cli_main(["generate", job["prompt"], *models, *DEFAULTS, *flags, "-q", "-o", str(ref)]) == 0
        got = out / done[i + 1]
        assert np.array_equal(pixels(got), pixels(ref)), job
        assert read_metadata(got) == read_metadata(ref), job


def test_a_rerun_skips_what_is_made_and_redoes_changed_settings(batch12, models, tmp_path):
    work, jobs_path, *_ = batch12
    out = tmp_path / "out"
    shutil.copytree(work / "out", out)
    jobs = [dict(j) for j in JOBS]
    jobs[1]["steps"] = 2  # job 2's settings changed: a new name, made again
    jobs_path = write_jobs(tmp_path, jobs)
    by_job = {e["job"]: e["file"] for e in last_run(out) if e["event"] == "done"}
    shutil.copy(out / by_job[1], out / by_job[3])  # job 3's file now records job 1's settings: made again
    (out / by_job[4]).write_bytes((out / by_job[4]).read_bytes()[:200])  # job 4's file cut short: made again
    rc, stdout, stderr = run(jobs_path, "--out", out, *models, *DEFAULTS, cwd=tmp_path)
    entries = last_run(out)
    made = sorted(e["job"] for e in entries if e["event"] == "done")
    assert rc == 1 and made == [2, 3, 4] and len(stdout.split()) == 3
    assert sorted(e["job"] for e in entries if e["event"] == "skipped") == [1, 6, 7, 8, 9, 10, 12]
    assert read_metadata(out / by_job[3])["seed"] == 3
    assert [e for e in entries if e["event"] == "done" and e["job"] == 2][0]["file"] != by_job[2]
    assert "3 made, 2 failed, 7 skipped" in stderr


def test_fail_fast_stops_at_the_first_failure(models, tmp_path):
    jobs = write_jobs(tmp_path, [{"prompt": "a cat", "seed": 1}, {"prompt": "x", "image": "missing.png"},
                                 {"prompt": "a dog", "seed": 2}])
    rc, stdout, stderr = run(jobs, "--out", tmp_path / "out", "--fail-fast", *models, *DEFAULTS, "-q", cwd=tmp_path)
    assert rc == 1 and len(stdout.split()) == 1
    assert "1 made, 1 failed, 0 skipped (already made), 1 not made" in stderr and "stopping: --fail-fast" in stderr
    end = last_run(tmp_path / "out")[-1]
    assert (end["status"], end["done"], end["failed"], end["left"]) == ("stopped", 1, 1, 1)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "seed": 1}\n{"prompt": \n')
    rc, stdout, stderr = run(tmp_path / "bad.jsonl", "--out", tmp_path / "o2", "--fail-fast", *models, *DEFAULTS)
    assert rc == 1 and stdout == "" and "stopping: --fail-fast: job 2 (line 2) failed" in stderr  # before any image


def test_a_prompt_list_gets_stable_seeds(models, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red cat\na green tree\n")
    rc, stdout, _ = run(tmp_path / "prompts.txt", "--out", tmp_path / "out", *models, *DEFAULTS, "-q")
    seeds = [read_metadata(p)["seed"] for p in stdout.split()]
    assert rc == 0 and len(seeds) == 2 and seeds == [derived_seed(1, {"prompt": "a red cat"}),
                                                        derived_seed(2, {"prompt": "a green tree"})]
    rc, stdout, stderr = run(tmp_path / "prompts.txt", "--out", tmp_path / "out", *models, *DEFAULTS)
    assert rc == 0 and stdout == "" and "0 made, 0 failed, 2 skipped" in stderr


def test_distributed_without_a_launcher_runs_here_alone(models, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red cat\n")
    rc, stdout, stderr = run(tmp_path / "prompts.txt", "--out", tmp_path / "out", "--distributed", *models, *DEFAULTS)
    assert rc == 0 and len(stdout.split()) == 1 and "not started by mlx.launch" in stderr
    assert last_run(tmp_path / "out")[0]["ranks"] == 1


# ---------------------------------------------------------------- Ctrl-C and resume
def test_sigint_after_the_fourth_image_then_a_rerun_makes_exactly_the_rest(batch12, models, tmp_path):
    work, *_ = batch12
    jobs = write_jobs(tmp_path, JOBS)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = [sys.executable, "-m", "mlx_sdxl.cli", "batch", str(jobs), "--out", "out", *models, *DEFAULTS]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in iter(proc.stdout.readline, "")], daemon=True).start()
    try:
        written = [lines.get(timeout=120) for _ in range(4)]  # the 4th image's path: it is written
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        stderr = proc.stderr.read()
    finally:
        proc.kill()
    out = tmp_path / "out"
    assert proc.returncode == 130 and "mlx-sdxl batch: interrupted" in stderr, stderr
    first = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    assert len(first) == 4 and sorted(Path(w.strip()).name for w in written) == first
    assert sorted(os.listdir(out)) == sorted([*first, "batch-log.jsonl"])  # no temporary left
    assert last_run(out)[-1]["status"] == "interrupted"
    rc, stdout, stderr = run(jobs, "--out", out, *models, *DEFAULTS, cwd=tmp_path)
    again = sorted(Path(p).name for p in stdout.split())
    assert rc == 1 and len(again) == 6 and not set(again) & set(first)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in (work / "out").glob("*.png"))
    for name in again:
        assert np.array_equal(pixels(out / name), pixels(work / "out" / name))
    assert "6 made, 2 failed, 4 skipped" in stderr

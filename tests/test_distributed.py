"""`mlx-sdxl batch` over several processes with MLX's ring backend on 127.0.0.1: data-parallel
(2 and 3 ranks, `--gather` without a shared folder, a killed rank) and stage-parallel (base
on rank 0, refiner + VAE on rank 1). Every launch runs in its own session with a timeout,
and is killed as a whole if it overruns."""

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlx_sdxl.batch.cli import main as batch_main
from mlx_sdxl.metadata import read_metadata

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = ["--width", "64", "--height", "64", "--dtype", "float32", "--steps", "3"]
JOBS = [{"prompt": p, "seed": s} for s, p in enumerate(
    ["a photo of a red cat", "a dog", "a green tree in snow", "an astronaut riding a horse", "a red car",
     "the horse on mars", "a cat in snow", "an ugly tree"], 1)]
JOBS[0]["steps"] = 30  # one slow job: whoever makes it, the other ranks make the rest meanwhile
FIRST = 5  # the data-parallel tests run the first 5 jobs
LAUNCH = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
TIMEOUT = 150


def env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                PYTHONUNBUFFERED="1")


def free_ports(n):
    """A run of n free ports on 127.0.0.1."""
    for start in range(41000 + os.getpid() % 2000 * 8, 60000, 16):
        try:
            with contextlib.ExitStack() as stack:
                for p in range(start, start + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", p))
            return start
        except OSError:
            continue
    raise RuntimeError("no free ports")


def stop_group(proc):
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def launch(n, argv, cwd, timeout=TIMEOUT):
    """mlx.launch --backend ring -n N -- python -m mlx_sdxl.cli batch ARGV: (rc, stdout, stderr, seconds)."""
    cmd = [*LAUNCH, "--backend", "ring", "-n", str(n), "-p", str(free_ports(n)), "--",
           sys.executable, "-m", "mlx_sdxl.cli", "batch", *map(str, argv)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        stop_group(proc)
    return proc.returncode, stdout, stderr, time.perf_counter() - t0


def ranks_by_hand(argv, cwds, tmp_path, timeout=TIMEOUT):
    """The ranks started without mlx.launch (what it does: MLX_RANK and a ring hostfile), each in its own folder."""
    port = free_ports(len(cwds))
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port + r}"] for r in range(len(cwds))]))
    procs = [subprocess.Popen([sys.executable, "-m", "mlx_sdxl.cli", "batch", *map(str, argv)], cwd=cwd,
                              env=dict(env(), MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)), stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
             for r, cwd in enumerate(cwds)]
    try:
        return [(p.communicate(timeout=timeout), p.returncode) for p in procs]
    finally:
        for p in procs:
            stop_group(p)


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def last_run(folder):
    entries = [json.loads(line) for line in (Path(folder) / "batch-log.jsonl").read_text().splitlines()]
    return [e for e in entries if e["run"] == entries[-1]["run"]]


def same_as(reference, out, jobs=len(JOBS)):
    """The images of `reference`'s first `jobs` jobs are in `out`, with the same pixels and metadata, and
    nothing else is."""
    names = sorted(p.name for p in Path(reference).glob("*.png"))[:jobs]
    assert sorted(p.name for p in Path(out).glob("*.png")) == names
    for name in names:
        assert np.array_equal(pixels(Path(out) / name), pixels(Path(reference) / name)), name
        assert read_metadata(Path(out) / name) == read_metadata(Path(reference) / name), name


@pytest.fixture(scope="module")
def setup(tiny_sdxl, tmp_path_factory):
    """The job file, the model flags, and the reference: the same batch in one process."""
    work = tmp_path_factory.mktemp("dist")
    base, refiner = str(tiny_sdxl[0]), str(tiny_sdxl[1])
    jobs = work / "jobs.jsonl"
    jobs.write_text("\n".join(json.dumps(j) for j in JOBS) + "\n")
    (work / "first.jsonl").write_text("\n".join(json.dumps(j) for j in JOBS[:FIRST]) + "\n")
    flags = ["--model", base, "--refiner", refiner, *DEFAULTS]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert batch_main([str(jobs), "--out", str(work / "ref"), *flags]) == 0
    return work, jobs, flags


@pytest.mark.parametrize("n", [2, 3])
def test_data_parallel_makes_every_job_once_equal_to_one_process(setup, n, tmp_path):
    work, _, flags = setup
    rc, stdout, stderr, _ = launch(n, [work / "first.jsonl", "--out", tmp_path / "out", "--distributed", *flags],
                                   tmp_path)
    assert rc == 0 and f"{FIRST} made, 0 failed, 0 skipped" in stderr, stderr
    assert "Traceback" not in stderr and "WARN" not in stderr
    entries = last_run(tmp_path / "out")
    done = [e["file"] for e in entries if e["event"] == "done"]
    assert len(done) == len(set(done)) == FIRST and sorted(Path(p).name for p in stdout.split()) == sorted(done)
    end = entries[-1]
    assert [r["rank"] for r in end["ranks"]] == list(range(n))
    made_by = {e["job"]: e["rank"] for e in entries if e["event"] == "done"}
    count = {r: sum(1 for v in made_by.values() if v == r) for r in range(n)}
    assert count[made_by[1]] < max(count.values()), count  # handed out as ranks came free, not in turn
    same_as(work / "ref", tmp_path / "out", FIRST)


def test_gather_sends_the_images_to_rank_0_without_a_shared_folder(setup, tmp_path):
    work, _, flags = setup
    jobs = work / "first.jsonl"
    a, b = tmp_path / "mac1", tmp_path / "mac2"
    a.mkdir(), b.mkdir()
    (rank0, rc0), (rank1, rc1) = ranks_by_hand([jobs, "--out", "out", "--gather", "-q", *flags], [a, b], tmp_path)
    assert (rc0, rc1) == (0, 0), (rank0, rank1)
    assert not (b / "out").exists() and rank1 == ("", "")  # rank 1 wrote nothing, said nothing
    same_as(work / "ref", a / "out", FIRST)
    assert {e["rank"] for e in last_run(a / "out") if e["event"] == "done"} == {0, 1}
    # without --gather, rank 1 finds that its out/ is not rank 0's, and the batch stops cleanly
    (rank0, rc0), (rank1, rc1) = ranks_by_hand([jobs, "--out", "out2", "--distributed", "-q", *flags], [a, b],
                                               tmp_path)
    assert (rc0, rc1) == (3, 2), (rank0, rank1)
    assert "not the folder rank 0 writes" in rank1[1] and "rank 1 cannot run" in rank0[1]
    assert last_run(a / "out2")[-1]["status"] == "stopped" and not (b / "out2").exists()


def _rank_pid(launcher_pid, rank):
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == launcher_pid and f"MLX_RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process in /proc")
def test_a_killed_rank_stops_the_others_and_a_rerun_resumes(setup, tmp_path):
    work, _, flags = setup
    jobs, out = work / "first.jsonl", tmp_path / "out"
    cmd = [*LAUNCH, "--backend", "ring", "-n", "2", "-p", str(free_ports(2)), "--", sys.executable, "-m",
           "mlx_sdxl.cli", "batch", str(jobs), "--out", str(out), "--distributed", *flags]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(list(out.glob("*.png"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None and proc.poll() is None
        os.kill(victim, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
    finally:
        stop_group(proc)
    made = sorted(p.name for p in out.glob("*.png"))
    left = set(os.listdir(out)) - {*made, "batch-log.jsonl"}  # at most the temporary of the killed rank's write
    assert 2 <= len(made) < FIRST and all(t.endswith("-r1.tmp") for t in left), (os.listdir(out), stderr)
    assert last_run(out)[-1]["status"] in ("stopped", "interrupted")
    for name in made:  # whole images, as a single process makes them
        assert read_metadata(out / name) == read_metadata(work / "ref" / name)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        assert batch_main([str(jobs), "--out", str(out), *flags]) == 0
    assert f"{FIRST - len(made)} made, 0 failed, {len(made)} skipped" in err.getvalue()
    same_as(work / "ref", out, FIRST)
    assert len(os.listdir(out)) == FIRST + 1  # the images and the log: no temporary is left


def test_stage_parallel_is_bit_equal_and_each_rank_holds_only_its_models(setup, tmp_path):
    work, jobs, flags = setup
    Image.new("RGB", (64, 64)).save(tmp_path / "start.png")
    with_image = tmp_path / "jobs.jsonl"  # the 8 jobs, and a 9th with an image, which --stages refuses
    with_image.write_text(jobs.read_text() + json.dumps({"prompt": "a cat", "image": "start.png"}) + "\n")
    rc, stdout, stderr, wall = launch(2, [with_image, "--out", tmp_path / "out", "--stages", "base@0,refiner@1",
                                          *flags], tmp_path)
    assert rc == 0 and "8 made, 1 failed" in stderr and "job 9 (line 9) failed: a job with an --image" in stderr
    assert "Traceback" not in stderr, stderr
    same_as(work / "ref", tmp_path / "out")
    end = last_run(tmp_path / "out")[-1]
    rank0, rank1 = end["ranks"]
    assert (rank0["role"], rank1["role"]) == ("base", "refiner")
    assert rank0["models"] == ["base_text_encoder", "base_text_encoder_2", "base_unet"]
    assert rank1["models"] == ["base_vae", "refiner_unet"]
    one = last_run(work / "ref")[-1]
    print(f"\n8 jobs, stage-parallel on 2 ranks: {end['seconds']:.2f} s in the batch ({wall:.2f} s with start-up); "
          f"one process: {one['seconds']:.2f} s; peak RSS rank 0 {rank0['peak_rss_bytes'] / 2**20:.0f} MiB "
          f"(weights {rank0['weights_bytes'] / 2**20:.1f} MiB), rank 1 {rank1['peak_rss_bytes'] / 2**20:.0f} MiB "
          f"(weights {rank1['weights_bytes'] / 2**20:.1f} MiB); one process's weights "
          f"{one['ranks'][0]['weights_bytes'] / 2**20:.1f} MiB")

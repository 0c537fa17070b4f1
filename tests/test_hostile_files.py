"""Hostile and careless files: malformed weights and configs, full disks, signals, stale temporaries.

Every failure must be one `PROG: error: ...` line (exit 2) or one `PROG: terminated` /
`interrupted` line (exit 143 / 129 / 130), with no traceback, and leave no file or temporary
in the output folder or its parent. All on the tiny SDXL models (64x64, float32).
"""

import contextlib
import errno
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mlx_sdxl.errors import WeightsError
from mlx_sdxl.signals import Terminated, deferred, terminate_as_interrupt
from mlx_sdxl.tempfiles import remove_stale
from mlx_sdxl.weights import load_safetensors, read_config, safetensors_header

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--width", "64", "--height", "64", "--dtype", "float32", "--steps", "1", "--seed", "1", "--quiet"]


# ----------------------------------------------------------------------------- helpers


def run_cli(*argv):
    """mlx_sdxl.cli.main(argv) in-process: (exit code, stdout, stderr)."""
    from mlx_sdxl.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def run_convert(*argv):
    from convert.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def one_line(stderr: str, prog: str, *needles: str) -> str:
    """The single line on stderr, which names `prog` and every needle; no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prog + ": "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def listing(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


def dead_pid() -> int:
    """The pid of a process that has ended and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_raw_safetensors(path: Path, header, data: bytes = b"") -> Path:
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


@pytest.fixture(scope="module")
def base(tiny_sdxl):
    return tiny_sdxl[0]


@pytest.fixture()
def base_copy(base, tmp_path):
    """A private copy of the tiny base folder to damage."""
    dest = tmp_path / "models" / "base"
    shutil.copytree(base, dest)
    return dest


@pytest.fixture()
def out_dir(tmp_path):
    d = tmp_path / "work" / "out"
    d.mkdir(parents=True)
    return d


def assert_nothing_written(out_dir: Path, also=()):
    """The output folder is empty and its parent holds only it (and `also`)."""
    assert listing(out_dir) == [], listing(out_dir)
    assert listing(out_dir.parent) == sorted([out_dir.name, *also]), listing(out_dir.parent)


# ----------------------------------------------------------------------------- safetensors headers

F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BAD_HEADERS = {
    "a list": ([F32], "the header is a JSON array"),
    "a string": ("weights", "the header is a JSON string"),
    "entry not an object": ({"w": [1, 2]}, "tensor 'w' is a JSON array"),
    "no data_offsets": ({"w": {"dtype": "F32", "shape": [2]}}, "tensor 'w' has no data_offsets"),
    "no dtype and shape": ({"w": {"data_offsets": [0, 8]}}, "has no dtype or shape"),
    "lowercase dtype": ({"w": dict(F32, dtype="float32")}, "dtype 'float32'"),
    "dtype a number": ({"w": dict(F32, dtype=7)}, "dtype 7"),
    "F64": ({"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, "convert the checkpoint"),
    "F8": ({"w": {"dtype": "F8_E4M3", "shape": [8], "data_offsets": [0, 8]}}, "convert the checkpoint"),
    "shape not a list": ({"w": dict(F32, shape=2)}, "has shape 2"),
    "negative size": ({"w": dict(F32, shape=[-2])}, "has shape [-2]"),
    "float size": ({"w": dict(F32, shape=[2.0])}, "has shape [2.0]"),
    "offsets reversed": ({"w": dict(F32, data_offsets=[8, 0])}, "data_offsets [8, 0]"),
    "offsets one number": ({"w": dict(F32, data_offsets=[8])}, "data_offsets [8]"),
    "offsets negative": ({"w": dict(F32, data_offsets=[-8, 0])}, "data_offsets [-8, 0]"),
    "offsets do not fit the shape": ({"w": dict(F32, shape=[3])}, "needs 12"),
    "offsets past the end": ({"w": dict(F32, data_offsets=[1000, 1008])}, "truncated"),
    "metadata not strings": ({"__metadata__": {"a": 1}, "w": F32}, "__metadata__"),
    "deeply nested": (b"[" * 100_000, "not a readable safetensors file"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_malformed_header_is_a_weights_error(case, tmp_path):
    header, needle = BAD_HEADERS[case]
    path = write_raw_safetensors(tmp_path / "bad.safetensors", header, b"\0" * 8)
    for read in (load_safetensors, safetensors_header):
        with pytest.raises(WeightsError) as e:
            read(path)
        message = str(e.value)
        assert str(path) in message and needle in message, message
        assert "\n" not in message
        if "truncated" not in needle and "not a readable" not in needle:
            assert "accepted:" in message


@pytest.mark.parametrize("case", ["a list", "no data_offsets", "lowercase dtype", "offsets do not fit the shape"])
def test_malformed_header_through_the_cli(case, tmp_path, out_dir):
    header, needle = BAD_HEADERS[case]
    model = write_raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * 8)
    rc, stdout, stderr = run_cli("generate", "a cat", "--model", model, "--refiner", "none", *SMALL,
                                 "--output", out_dir)
    assert rc == 2 and stdout == ""
    one_line(stderr, "mlx-sdxl", str(model), needle)
    assert_nothing_written(out_dir)


def test_valid_header_still_reads(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": np.arange(6, dtype=np.float16).reshape(2, 3), "i": np.arange(3, dtype=np.int64)}, str(path),
              metadata={"format": "pt"})
    header = safetensors_header(path)
    assert header["a"]["dtype"] == "F16" and header["a"]["shape"] == [2, 3] and "__metadata__" not in header
    w = load_safetensors(path)
    assert w["a"].dtype == mx.float16 and w["i"].tolist() == [0, 1, 2]


def test_mlx_written_file_with_null_metadata_reads(tmp_path):
    """MLX's own writer puts "__metadata__": null in the header; that is a valid file."""
    path = tmp_path / "mlx.safetensors"
    mx.save_safetensors(str(path), {"a": mx.arange(4, dtype=mx.float32)})
    assert b'"__metadata__":null' in path.read_bytes()[:200]
    assert load_safetensors(path)["a"].tolist() == [0, 1, 2, 3]


def test_bad_shard_index(base_copy, out_dir):
    unet = base_copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "shard.safetensors")
    index = unet / "diffusion_pytorch_model.safetensors.index.json"
    for bad in ([1], {"weight_map": ["shard.safetensors"]}, {"weight_map": {"a": "../../etc/passwd"}}):
        index.write_text(json.dumps(bad))
        rc, _, stderr = run_cli("generate", "a cat", "--model", base_copy, "--refiner", "none", *SMALL,
                                "--output", out_dir)
        assert rc == 2
        one_line(stderr, "mlx-sdxl", str(index), "accepted")
    assert_nothing_written(out_dir)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("where, content", [
    ("unet/config.json", "[1, 2]"),
    ("vae/config.json", '"AutoencoderKL"'),
    ("text_encoder_2/config.json", "null"),
    ("model_index.json", "[]"),
    ("scheduler/scheduler_config.json", "3"),
    ("unet/config.json", "{not json"),
])
def test_config_that_is_not_an_object(base_copy, out_dir, where, content):
    (base_copy / where).write_text(content)
    rc, _, stderr = run_cli("generate", "a cat", "--model", base_copy, "--refiner", "none", *SMALL,
                            "--output", out_dir)
    assert rc == 2
    one_line(stderr, "mlx-sdxl", str(base_copy / where), "accepted: a JSON object")
    assert_nothing_written(out_dir)


def test_config_not_an_object_in_convert_and_vae(base, base_copy, out_dir):
    (base_copy / "vae" / "config.json").write_text("[]")
    rc, _, stderr = run_convert("--base", base_copy, "--out", out_dir / "c", "--dtype", "float32", "--quiet")
    assert rc == 2
    one_line(stderr, "python -m convert", str(base_copy / "vae" / "config.json"), "JSON object")
    rc, _, stderr = run_cli("generate", "a cat", "--model", base, "--vae", base_copy / "vae", "--refiner", "none",
                            *SMALL, "--output", out_dir)
    assert rc == 2
    one_line(stderr, "mlx-sdxl", str(base_copy / "vae" / "config.json"), "JSON object")
    assert_nothing_written(out_dir)
    with pytest.raises(WeightsError, match="holds a JSON array; accepted: a JSON object"):
        read_config(base_copy / "vae")


# ----------------------------------------------------------------------------- tensor dtypes


def _retype(path: Path, key: str, dtype) -> None:
    tensors = load_file(str(path))
    tensors[key] = (tensors[key] * 100).astype(dtype)
    save_file(tensors, str(path))


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.bool_])
def test_integer_weights_are_refused_at_load(base_copy, out_dir, dtype):
    _retype(base_copy / "unet" / "diffusion_pytorch_model.safetensors", "conv_in.weight", dtype)
    rc, _, stderr = run_cli("generate", "a cat", "--model", base_copy, "--refiner", "none", *SMALL,
                            "--output", out_dir)
    assert rc == 2
    name = np.dtype(dtype).name
    one_line(stderr, "mlx-sdxl", "UNet", f"conv_in.weight is {name}", "accepted: float16, bfloat16, float32")
    assert_nothing_written(out_dir)


def test_quantized_folder_with_wrong_packed_dtype(tiny_sdxl, tmp_path, out_dir):
    from convert import convert

    conv = convert(tiny_sdxl[0], tmp_path / "q", dtype="float32", base_bits=4, group_size=32, log=None)
    shard = conv / "base" / "unet" / "model.safetensors"
    tensors = load_file(str(shard))
    packed = next(k for k, v in sorted(tensors.items()) if v.dtype == np.uint32)
    rc, _, stderr = run_cli("generate", "a cat", "--model", conv, "--refiner", "none", *SMALL, "--output", out_dir)
    assert rc == 0, stderr  # the uint32 packed weights and their scales load as they are
    for f in out_dir.iterdir():
        f.unlink()
    tensors[packed] = tensors[packed].view(np.int32)
    save_file(tensors, str(shard))
    rc, _, stderr = run_cli("generate", "a cat", "--model", conv, "--refiner", "none", *SMALL, "--output", out_dir)
    assert rc == 2
    one_line(stderr, "mlx-sdxl", f"{packed} is int32 (the quantized layer needs uint32)")
    assert_nothing_written(out_dir)


def test_quantization_file_without_settings(tiny_sdxl, tmp_path, out_dir):
    from convert import convert

    conv = convert(tiny_sdxl[0], tmp_path / "q", dtype="float32", base_bits=4, group_size=32, log=None)
    qfile = conv / "base" / "unet" / "quantization.json"
    qfile.write_text(json.dumps({"bits": 4}))
    rc, _, stderr = run_cli("generate", "a cat", "--model", conv, "--refiner", "none", *SMALL, "--output", out_dir)
    assert rc == 2
    one_line(stderr, "mlx-sdxl", str(qfile), "group_size=None", "accepted")
    assert_nothing_written(out_dir)


# ----------------------------------------------------------------------------- full disks


class _FullDisk(io.FileIO):
    """A real file whose writes fail the way a full disk does."""

    def write(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_png_save_on_a_full_disk(base, out_dir, monkeypatch):
    from mlx_sdxl import metadata

    monkeypatch.setattr(metadata, "_open_temp", lambda fd: _FullDisk(fd, "wb"))
    target = out_dir / "cat.png"
    rc, stdout, stderr = run_cli("generate", "a cat", "--model", base, "--refiner", "none", *SMALL,
                                 "--output", target)
    assert rc == 2 and stdout == ""
    one_line(stderr, "mlx-sdxl", str(target), "No space left on device")
    assert_nothing_written(out_dir)


def test_convert_on_a_full_disk(base, out_dir, monkeypatch):
    from convert import export

    monkeypatch.setattr(export, "_open_output", lambda path: _FullDisk(str(path), "wb"))
    target = out_dir / "tiny-mlx"
    rc, _, stderr = run_convert("--base", base, "--out", target, "--dtype", "float32", "--quiet")
    assert rc == 2
    one_line(stderr, "python -m convert", str(target), "No space left on device")
    assert_nothing_written(out_dir)


def test_convert_overwrite_on_a_full_disk_keeps_the_old_folder(base, out_dir, monkeypatch):
    from convert import export

    target = out_dir / "tiny-mlx"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    monkeypatch.setattr(export, "_open_output", lambda path: _FullDisk(str(path), "wb"))
    rc, _, stderr = run_convert("--base", base, "--out", target, "--dtype", "float32", "--quiet", "--overwrite")
    assert rc == 2
    one_line(stderr, "python -m convert", "No space left on device")
    assert listing(out_dir) == ["tiny-mlx"] and listing(target) == ["keep.txt"]


# ----------------------------------------------------------------------------- convert --overwrite


@pytest.mark.parametrize("existing", ["folder", "file", "symlink"])
def test_convert_overwrite_leaves_no_old_copy(base, out_dir, existing):
    target = out_dir / "tiny-mlx"
    if existing == "folder":
        target.mkdir()
        (target / "x").write_text("old")
    elif existing == "file":
        target.write_text("old")
    else:
        (out_dir / "elsewhere").mkdir()
        target.symlink_to(out_dir / "elsewhere")
    rc, _, stderr = run_convert("--base", base, "--out", target, "--dtype", "float32", "--quiet", "--overwrite")
    assert rc == 0, stderr
    assert (target / "manifest.json").is_file() and not target.is_symlink()
    assert listing(out_dir) == sorted(["tiny-mlx"] + (["elsewhere"] if existing == "symlink" else []))


def test_signal_during_the_swap_waits_for_it(base, out_dir, monkeypatch):
    """SIGTERM while the old folder is set aside: the swap completes, then Terminated is raised."""
    from convert import convert, export

    target = out_dir / "tiny-mlx"
    target.mkdir()
    real = export.remove_path

    def signalled(path):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        real(path)

    monkeypatch.setattr(export, "remove_path", signalled)
    with terminate_as_interrupt(), pytest.raises(Terminated):
        convert(base, target, dtype="float32", overwrite=True, log=None)
    assert listing(out_dir) == ["tiny-mlx"] and (target / "manifest.json").is_file()


def test_deferred_delivers_the_first_signal_after_the_block():
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as from a terminal, even under nohup
    try:
        _deferred_delivers_the_first_signal_after_the_block()
    finally:
        signal.signal(signal.SIGHUP, previous)


def _deferred_delivers_the_first_signal_after_the_block():
    with terminate_as_interrupt():
        reached = []
        with pytest.raises(Terminated) as e:
            with deferred():
                os.kill(os.getpid(), signal.SIGHUP)
                time.sleep(0.05)
                reached.append("end of block")
        assert reached == ["end of block"] and e.value.signum == signal.SIGHUP


# ----------------------------------------------------------------------------- signals, in a subprocess

# Both wrappers start from a terminal's signal settings, whatever the test runner ignores (nohup, `&`).
_SIGNALS = "import signal; signal.signal(signal.SIGHUP, signal.SIG_DFL); " \
           "signal.signal(signal.SIGINT, signal.default_int_handler)\n"

_SLOW_SAVE = _SIGNALS + """
import os, sys, time
from pathlib import Path
mark = Path(sys.argv[1])
def slow_fsync(fd):  # save_png has written the temporary: stop here until signalled
    mark.write_text("saving")
    time.sleep(60)
os.fsync = slow_fsync
from mlx_sdxl.cli import main
sys.exit(main(sys.argv[2:]))
"""

_SLOW_CONVERT = _SIGNALS + """
import sys, time
from pathlib import Path
import mlx.core as mx
mark = Path(sys.argv[1])
real = mx.save_safetensors
def slow_save(f, arrays, metadata=None):  # one shard written into the partial folder, then wait
    real(f, arrays, metadata=metadata)
    mark.write_text("converting")
    time.sleep(60)
mx.save_safetensors = slow_save
from convert.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _signal_midway(code: str, argv: list, mark: Path, signum: int, expect_temp):
    """Run `code` with `argv`, wait for `mark`, check a temporary exists, send `signum`; (rc, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code, str(mark), *map(str, argv)], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not mark.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the subprocess never reached the write"
            time.sleep(0.02)
        assert expect_temp(), "no temporary while writing"
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_signal_during_png_save(base, out_dir, tmp_path, signum, status):
    argv = ["generate", "a cat", "--model", base, "--refiner", "none", *SMALL, "--output", out_dir]
    rc, stderr = _signal_midway(_SLOW_SAVE, argv, tmp_path / "mark", signum,
                                lambda: any(n.endswith(".tmp") for n in listing(out_dir)))
    assert rc == status, stderr
    one_line(stderr, "mlx-sdxl", "interrupted" if signum == signal.SIGINT else "terminated")
    assert_nothing_written(out_dir)


@pytest.mark.parametrize("signum, status, entry", [
    (signal.SIGTERM, 143, ["-m", "convert"]),
    (signal.SIGHUP, 129, ["-m", "mlx_sdxl.cli", "convert"]),
    (signal.SIGINT, 130, ["-m", "convert"]),
])
def test_signal_during_convert(base, out_dir, tmp_path, signum, status, entry):
    target = out_dir / "tiny-mlx"
    code = _SLOW_CONVERT if entry[1] == "convert" else _SLOW_CONVERT.replace(
        "from convert.cli import main", "from mlx_sdxl.cli import main")
    argv = ([] if entry[1] == "convert" else ["convert"]) + ["--base", base, "--out", target, "--dtype", "float32",
                                                             "--quiet"]
    rc, stderr = _signal_midway(code, argv, tmp_path / "mark", signum,
                                lambda: any(".partial-" in n for n in listing(out_dir)))
    assert rc == status, stderr
    prog = "python -m convert" if entry[1] == "convert" else "mlx-sdxl convert"
    one_line(stderr, prog, "interrupted" if signum == signal.SIGINT else "terminated")
    assert_nothing_written(out_dir)


def test_sigterm_during_convert_overwrite_keeps_the_old_folder(base, out_dir, tmp_path):
    target = out_dir / "tiny-mlx"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    argv = ["--base", base, "--out", target, "--dtype", "float32", "--quiet", "--overwrite"]
    rc, stderr = _signal_midway(_SLOW_CONVERT, argv, tmp_path / "mark", signal.SIGTERM,
                                lambda: any(".partial-" in n for n in listing(out_dir)))
    assert rc == 143, stderr
    one_line(stderr, "python -m convert", "terminated")
    assert listing(out_dir) == ["tiny-mlx"] and listing(target) == ["keep.txt"]


# ----------------------------------------------------------------------------- stale temporaries


def _plant(folder: Path, dead: int, live: int) -> dict:
    """Temporaries of a dead and of a live process, and look-alikes that are not ours."""
    names = {
        "dead png": f".cat.png.{dead}.abcd1234.tmp",
        "dead partial": f".tiny-mlx.partial-{dead}",
        "dead old": f".other.old-{dead}",
        "live png": f".cat.png.{live}.abcd1234.tmp",
        "live partial": f".tiny-mlx.partial-{live}",
        "png without pid": ".cat.png.abcd1234.tmp",
        "not ours: partial with user files": f".notes.partial-{dead}",
        "not ours: user file": "notes.txt",
        "not ours: dotfile": f".cache-{dead}",
    }
    for key, name in names.items():
        path = folder / name
        if "partial" in key:
            path.mkdir()
            (path / ("notes.txt" if "user files" in key else "base")).mkdir()
        else:
            path.write_bytes(b"x")
    (folder / "other").mkdir()  # .other.old-<dead> was replaced by this: the old copy is garbage
    return names


def _stale_removed(folder: Path, names: dict):
    kept = set(listing(folder))
    for key, name in names.items():
        assert (name in kept) == (not key.startswith("dead")), (key, name, sorted(kept))


@pytest.fixture()
def live_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield p.pid
    p.kill()
    p.wait()


def test_generate_removes_stale_temporaries(base, out_dir, live_pid):
    names = _plant(out_dir, dead_pid(), live_pid)
    rc, stdout, stderr = run_cli("generate", "a cat", "--model", base, "--refiner", "none", *SMALL,
                                 "--output", out_dir)
    assert rc == 0, stderr
    _stale_removed(out_dir, names)
    assert Path(stdout.strip()).name in listing(out_dir)


def test_convert_removes_stale_temporaries(base, out_dir, live_pid):
    names = _plant(out_dir, dead_pid(), live_pid)
    rc, _, stderr = run_convert("--base", base, "--out", out_dir / "tiny-mlx", "--dtype", "float32", "--quiet")
    assert rc == 0, stderr
    _stale_removed(out_dir, names)
    assert (out_dir / "tiny-mlx" / "manifest.json").is_file()


def test_stale_old_folder_without_its_replacement_is_put_back(tmp_path):
    pid = dead_pid()
    (tmp_path / f".model.old-{pid}").mkdir()
    (tmp_path / f".model.old-{pid}" / "keep.txt").write_text("the user's folder")
    assert remove_stale(tmp_path) == [f".model.old-{pid}"]
    assert listing(tmp_path) == ["model"] and (tmp_path / "model" / "keep.txt").read_text() == "the user's folder"
    assert remove_stale(tmp_path / "no-such-folder") == []


def test_png_temporary_names_carry_the_pid(tmp_path, monkeypatch):
    from PIL import Image

    from mlx_sdxl import metadata

    seen = []
    real = metadata._open_temp

    def spy(fd):
        seen.extend(n for n in listing(tmp_path) if n.endswith(".tmp"))
        return real(fd)

    monkeypatch.setattr(metadata, "_open_temp", spy)
    metadata.save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", {"prompt": "p"})
    assert len(seen) == 1 and seen[0].startswith(f".x.png.{os.getpid()}.") and listing(tmp_path) == ["x.png"]

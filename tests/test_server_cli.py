"""`mlx-sdxl serve` on the command line: help, flag errors before anything loads, the warning
when listening beyond this machine without --api-auth, and a missing `server` extra."""

import socket
import sys

import pytest

from mlx_sdxl import cli
from mlx_sdxl.server import cli as serve_cli
from mlx_sdxl.server.config import exposure_warning, is_loopback, parse_credentials


def test_serve_is_a_subcommand_with_help(capsys):
    assert cli.main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--refiner", "--host", "--port", "--api-auth", "--models-dir", "--lora-dir",
                 "--embedding-dir", "--outputs", "--cors-allow-origins", "--refiner-bits", "--low-memory",
                 "--dtype", "--max-megapixels", "--max-images", "--max-steps", "--max-body-mb", "--preview-every",
                 "--vae-decoder", "--taesd"):
        assert flag in out, flag
    assert "mlx-sdxl serve" in out and "127.0.0.1" in out and "7860" in out


@pytest.mark.parametrize("argv, words", [
    (["--api-auth", "alice"], "USER:PASSWORD"),
    (["--max-steps", "0"], "--max-steps must be an integer in [1, 10000]"),
    (["--max-body-mb", "-1"], "--max-body-mb must be a positive number"),
    (["--models-dir", "/no/such/folder"], "--models-dir /no/such/folder: no such folder"),
    (["--preview-every", "0"], "--preview-every must be an integer >= 1"),
    (["--port", "eighty"], "invalid int value"),
])
def test_bad_flags_exit_2_before_any_model_loads(capsys, argv, words):
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlx-sdxl serve: error:") and words in err, err


def test_credentials_and_loopback():
    assert parse_credentials("alice:pa:ss,bob:x") == {"alice": "pa:ss", "bob": "x"}
    assert parse_credentials(None) == {}
    for host in ("127.0.0.1", "127.8.9.1", "localhost", "::1", "[::1]"):
        assert is_loopback(host) and exposure_warning(host, {}) is None
    for host in ("0.0.0.0", "::", "192.168.1.20", "myhost.local"):
        assert not is_loopback(host)
        assert "without --api-auth" in exposure_warning(host, {})
        assert exposure_warning(host, {"a": "b"}) is None


def test_serve_warns_beyond_loopback_and_stops_cleanly(tiny_sdxl, monkeypatch):
    import uvicorn

    seen = {}

    def run(self, sockets):  # the socket is bound, not listening: nothing can connect
        seen["host"], seen["nodelay"] = self.config.host, sockets[0].getsockopt(socket.IPPROTO_TCP,
                                                                                  socket.TCP_NODELAY)
        seen["port"] = sockets[0].getsockname()[1]
        self.handle_exit(2, None)  # Ctrl-C: the worker is closed and jobs stop at their next step

    monkeypatch.setattr(uvicorn.Server, "run", run)
    args = serve_cli.build_parser("mlx-sdxl serve").parse_args(
        ["--model", str(tiny_sdxl[0]), "--refiner", str(tiny_sdxl[1]), "--host", "0.0.0.0", "--port", "7999",
         "--dtype", "float32"])
    lines = []
    serve_cli.serve(serve_cli.make_config(args), "a1111", log=lines.append)
    assert seen["host"] == "0.0.0.0" and seen["nodelay"] and seen["port"] > 0
    assert "without --api-auth" in lines[0] and f"http://0.0.0.0:{seen['port']}/" in lines[1]
    assert "previews linear" in lines[1] and "refiner refiner" in lines[1]


def test_auth_from_the_environment(monkeypatch, tiny_sdxl):
    monkeypatch.setenv(serve_cli.AUTH_ENV, "carol:secret")
    args = serve_cli.build_parser("x").parse_args(["--model", str(tiny_sdxl[0]), "--refiner", "none"])
    config = serve_cli.make_config(args)
    assert config.credentials == {"carol": "secret"} and config.models.refiner is None


def test_missing_server_extra_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "FastAPI and uvicorn" in err and 'pip install -e ".[server]"' in err


def test_cors_allows_only_the_named_origins(tiny_sdxl):
    import httpx

    from serve_harness import RunningServer, make_config

    server = RunningServer(make_config(tiny_sdxl[0], None, cors_origins=("http://app.example",)))
    try:
        ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        ok = httpx.options(server.url + "/sdapi/v1/txt2img", headers={"Origin": "http://app.example", **ask},
                           trust_env=False)
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://app.example"
        other = httpx.options(server.url + "/sdapi/v1/txt2img", headers={"Origin": "http://evil.example", **ask},
                              trust_env=False)
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        plain = httpx.get(server.url + "/sdapi/v1/options", headers={"Origin": "http://evil.example"},
                          trust_env=False)
        assert "access-control-allow-origin" not in plain.headers
    finally:
        server.stop()

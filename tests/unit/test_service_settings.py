"""Settings come from MACULA_* at startup; CLI flags override only when given."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.__main__ import build_parser, main
from service.settings import CPU_BATCH_DEFAULTS, CUDA_BATCH_DEFAULTS, Settings


def settings_from(argv: list[str]) -> Settings:
    return Settings(**vars(build_parser().parse_args(argv)))


def test_defaults_bind_loopback(monkeypatch):
    for key in ("MACULA_HOST", "MACULA_PORT", "MACULA_MAX_BODY_BYTES"):
        monkeypatch.delenv(key, raising=False)
    s = Settings()
    assert (s.host, s.port, s.max_body_bytes, s.max_image_pixels) == ("127.0.0.1", 8000, 10 * 1024 * 1024, 40_000_000)


def test_env_is_read_when_settings_are_built_not_at_import(monkeypatch):
    monkeypatch.setenv("MACULA_MAX_QUEUE", "17")
    monkeypatch.setenv("MACULA_API_KEY", "s3cret")
    s = Settings()
    assert s.max_queue == 17 and s.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)


def test_flags_override_env_only_when_given(monkeypatch):
    monkeypatch.setenv("MACULA_MAX_QUEUE", "17")
    monkeypatch.setenv("MACULA_PORT", "9001")
    s = settings_from(["--max-queue", "5", "--model-dir", "/tmp/models", "--no-channels-last"])
    assert s.max_queue == 5 and s.port == 9001 and s.model_dir == Path("/tmp/models") and s.channels_last is False


def test_every_setting_has_a_flag():
    parser = build_parser()
    dests = {a.dest for a in parser._actions}
    assert set(Settings.model_fields) <= dests


def test_batch_defaults_per_device_and_overrides(monkeypatch):
    monkeypatch.delenv("MACULA_MAX_BATCH_SIZE", raising=False)
    monkeypatch.delenv("MACULA_MAX_BATCH_DELAY_MS", raising=False)
    s = Settings()
    assert s.batch_limits("cpu") == (CPU_BATCH_DEFAULTS[0], CPU_BATCH_DEFAULTS[1] / 1000)
    assert s.batch_limits("cuda:0") == (CUDA_BATCH_DEFAULTS[0], CUDA_BATCH_DEFAULTS[1] / 1000)
    assert Settings(max_batch_size=3, max_batch_delay_ms=0).batch_limits("cuda") == (3, 0.0)
    assert Settings(device="cpu").resolved_device() == "cpu"


def test_bad_flag_values_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--max-queue", "lots", "--port", "70000"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "max_queue" in err and "port" in err


def test_docs_list_every_limit_and_every_error_code():
    from service.errors import CODES

    api = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    limits = api[api.index("### Limits"):api.index("## Audit")]
    errors = api[api.index("## Errors"):api.index("## Batching")]
    for name in Settings.model_fields:
        limit = name.startswith("max_") or name.endswith("_timeout_s") or name in ("decode_memory_bytes",
                                                                                    "json_max_depth")
        if limit and not name.startswith("max_batch"):  # batch size and delay shape batches; they refuse nothing
            assert f"`MACULA_{name.upper()}`" in limits, name
    for code, rule in CODES.items():
        if code != "client_gone":
            assert f"| {rule.status} | `{code}` |" in errors, code

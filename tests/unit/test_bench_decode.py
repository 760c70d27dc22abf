"""bench/decode_cost.py runs end to end on one photo, and its accuracy table says what the codec promises: the
service's path is the exact-geometry 2× Pillow draft, and only the old geometry strays far from the full decode."""

from __future__ import annotations

from bench import decode_cost


def test_decode_cost_runs_and_the_codec_is_the_exact_2x_draft(capsys):
    out = decode_cost.main(["--rounds", "2", "--photos", "coffee", "--sizes", "3200", "--pair-rounds", "2"])
    assert "| coffee | 3200×2133 | 224 RGB |" in capsys.readouterr().out
    diff = {key[3]: value for key, value in out["diff"].items() if key[:3] == ("coffee", 3200, "224 RGB")}
    assert set(diff) == set(decode_cost.WAYS) and all(ms > 0 for ms in out["ms"].values())
    assert diff["full"] == (0, 0.0) and diff["macula"] == diff["pillow 2x"]
    assert diff["pillow 2x"][0] <= 12 and diff["simplejpeg 2x"][0] <= 12
    assert diff["pillow 4x old"][0] > 50  # the draft's rounded-up extent, resampled whole: edges moved
    assert set(out["pair"]) == {("coffee", 3200, "224 RGB"), ("coffee", 3200, "48 L")}  # both scaled: both raced

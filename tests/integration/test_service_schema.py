"""The OpenAPI schema tells the truth: every route declares the statuses it answers with the real error model,
and Schemathesis, run against the live app, finds no server error and no response the schema does not describe."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from service_testing import live_server, serving

from service.errors import CODES

pytestmark = pytest.mark.anyio
# Every check but positive_data_acceptance: no schema can say "the bytes of a decodable JPEG/PNG/WebP", so a
# schema-valid body of random bytes is rightly refused (400/415/422). The stateful checks need links we do not have.
EXCLUDED = "positive_data_acceptance"


async def test_every_route_declares_its_error_statuses_with_the_real_model(model_dir, tmp_path):
    async with serving(model_dir, tmp_path, api_key="k3y") as (app, client):
        schema = (await client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components  # FastAPI's default 422 body is never what we send
    assert set(components["ErrorBody"]["required"]) == {"detail", "code"}
    expected = {("post", "/v1/predict"): {400, 401, 408, 413, 415, 422, 503, 504},
                ("post", "/v1/models/{name}/predict"): {400, 401, 404, 408, 413, 415, 422, 503, 504},
                ("put", "/predictions/{name}"): {400, 401, 404, 408, 413, 415, 422, 503, 504},
                ("post", "/explanations/{name}"): {400, 401, 404, 408, 413, 415, 422, 503, 504},
                ("get", "/v1/models/{name}"): {401, 404}, ("get", "/readyz"): {503}}
    for (method, path), statuses in expected.items():
        declared = schema["paths"][path][method]["responses"]
        missing = {s for s in statuses if str(s) not in declared}
        assert not missing, f"{method.upper()} {path} does not declare {sorted(missing)}"
        for status in statuses:
            ref = declared[str(status)]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorBody"), (method, path, status, ref)
    for path, method_paths in schema["paths"].items():
        model = "/ProtocolErrorBody" if path.startswith("/v2") else "/ErrorBody"  # the protocol's {"error": ...}
        for operation in method_paths.values():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"]["$ref"].endswith(model), (path, status)


async def test_declared_error_statuses_match_the_error_table(model_dir, tmp_path):
    async with serving(model_dir, tmp_path) as (app, client):
        resp = await client.post("/v1/predict?top_k=0", content=b"x", headers={"Content-Type": "image/png"})
        assert resp.status_code == CODES[resp.json()["code"]].status == 422


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_undocumented_response(model_dir, tmp_path):
    binary = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    assert binary, "schemathesis missing: pip install -e '.[test]'"
    with live_server(model_dir, tmp_path, max_body_bytes=256 * 1024, max_images_per_request=4,
                     request_timeout_s=10) as base:
        report = tmp_path / "report"
        run = subprocess.run([binary, "run", f"{base}/openapi.json", "--checks", "all", "--exclude-checks", EXCLUDED,
                              "--workers", "1", "--phases", "examples,coverage,fuzzing", "--max-time", "90",
                              "--request-timeout", "20", "--suppress-health-check", "all", "--report", "ndjson",
                              "--report-dir", str(report), "--warnings", "off"],
                             capture_output=True, text=True, timeout=240)
        assert httpx.get(f"{base}/readyz", timeout=5).status_code == 200  # and the server is still healthy
    summary = run.stdout[-6000:]
    assert run.returncode == 0, summary + run.stderr[-2000:]
    assert "No issues found" in summary or "passed" in summary, summary
    events = [json.loads(line) for path in report.glob("*.ndjson") for line in path.read_text().splitlines()]
    assert events, "schemathesis wrote no report: it tested nothing"

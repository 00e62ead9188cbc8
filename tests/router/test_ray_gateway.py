"""The Kubernetes gateway contract (configs/k8s/inference-gateway.yaml, docs/router.md
"Kubernetes gateways"): ``POST /v1/route`` names the architecture in ``x-archroute-arch``,
and the example manifest's HTTPRoute matches exactly that header and those values onto
InferencePools that the file defines."""

from __future__ import annotations

import yaml

from router.api.chat import ARCH_HEADER, BACKEND_HEADER
from tests.router.servers import ROOT

MANIFEST = ROOT / "configs" / "k8s" / "inference-gateway.yaml"


def docs() -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def test_manifest_parses_and_routes_each_architecture_to_its_pool() -> None:
    found = docs()
    kinds = [d["kind"] for d in found]
    assert kinds.count("InferencePool") == 2 and kinds.count("HTTPRoute") == 1
    pools = {d["metadata"]["name"]: d for d in found if d["kind"] == "InferencePool"}
    for pool in pools.values():
        assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
        assert pool["spec"]["selector"]["matchLabels"]
        assert pool["spec"]["targetPorts"][0]["number"] > 0
        assert pool["spec"]["endpointPickerRef"]["name"]
    [route] = [d for d in found if d["kind"] == "HTTPRoute"]
    by_arch = {}
    for rule in route["spec"]["rules"]:
        for match in rule["matches"]:
            for h in match.get("headers", []):
                assert h["name"] == ARCH_HEADER
                [ref] = rule["backendRefs"]
                assert ref["kind"] == "InferencePool" and ref["name"] in pools
                by_arch[h["value"]] = ref["name"]
    assert set(by_arch) == {"transformer", "hybrid"}
    assert len(set(by_arch.values())) == 2  # one pool per architecture
    services = {d["metadata"]["name"] for d in found if d["kind"] == "Service"}
    route_rule = [r for r in route["spec"]["rules"]
                  if r["matches"][0]["path"]["value"] == "/v1/route"]
    assert route_rule and route_rule[0]["backendRefs"][0]["name"] in services


def test_route_answers_the_architecture_as_a_header(fakes) -> None:
    _, client = fakes
    asks = [({"model": "t-fake"}, "transformer"), ({"model": "h-fake"}, "hybrid"),
            ({"model": "archroute-rules"}, None)]
    for extra, want in asks:
        r = client.post("/v1/route", json={**extra, "messages": [
            {"role": "user", "content": "Repeat exactly: def f(x): return x"}]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert r.headers[ARCH_HEADER] == body["decision"]
        assert r.headers[BACKEND_HEADER] == body["backend"]
        assert body["decision"] in ("transformer", "hybrid")
        if want is not None:
            assert body["decision"] == want
    bad = client.post("/v1/route", json={"model": "nope", "messages": [
        {"role": "user", "content": "hi"}]})
    assert bad.status_code == 404 and ARCH_HEADER not in bad.headers

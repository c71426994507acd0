"""Public routes: health probe, status page, metrics, the OpenAPI document."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient

import relay.api.public
from relay import __version__
from relay.store.base import StoreUnavailable
from relay.store.memory import MemoryStore
from tests.support import make_client

SECRET_WS = "ws-secret-7c1d9e55-0b2a-4f3e"
SECRET_TOKEN = "tok-secret-91f3a7c2d4"
SECRET_BODY = b'{"body_secret":"b0dy-5ecret-e2a1"}'


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client() as c:
        yield c


# --------------------------------------------------------------------- health
def test_health_get_and_head(client: TestClient) -> None:
    r = client.get("/v1/health")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert r.text == "ok"
    r = client.head("/v1/health")
    assert r.status_code == 200
    assert r.content == b""


@pytest.mark.parametrize(
    "settings", [{"access_tokens": "t"}, {"token_pubkey": "11" * 32}, {"metrics_token": "m"}]
)
def test_health_is_never_gated(settings: dict[str, str]) -> None:
    with make_client(**settings) as c:
        assert c.get("/v1/health").text == "ok"
        assert c.head("/v1/health").status_code == 200
        assert c.get("/v1/health", headers={"Authorization": "Bearer wrong"}).text == "ok"


class DownStore(MemoryStore):
    async def ping(self) -> bool:
        raise StoreUnavailable()


class FalseStore(MemoryStore):
    async def ping(self) -> bool:
        return False


class HungStore(MemoryStore):
    async def ping(self) -> bool:
        await anyio.sleep_forever()
        return True  # pragma: no cover


@pytest.mark.parametrize("store_class", [DownStore, FalseStore, HungStore])
def test_health_is_503_when_the_store_does_not_answer(
    store_class: type[MemoryStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay.api.public, "HEALTH_TIMEOUT", 0.05)
    with make_client(store=store_class()) as c:
        r = c.get("/v1/health")
        assert r.status_code == 503
        assert r.headers["content-type"].startswith("text/plain")
        assert r.text == "store unavailable"
        assert int(r.headers["retry-after"]) >= 1
        assert c.head("/v1/health").status_code == 503


# ---------------------------------------------------------------- status page
def status_rows(page: str) -> dict[str, str]:
    return {
        html.unescape(k): html.unescape(v)
        for k, v in re.findall(r"<tr><th>(.*?)</th><td>(.*?)</td></tr>", page)
    }


def test_status_page_shows_counts_without_ids_or_tokens() -> None:
    with make_client(access_tokens=SECRET_TOKEN) as c:
        auth = {"Authorization": f"Bearer {SECRET_TOKEN}"}
        for ws, body in ((SECRET_WS, SECRET_BODY), (SECRET_WS, b"2"), ("other-ws-4d2f", b"3")):
            assert (
                c.post(f"/v1/workspaces/{ws}/envelopes", content=body, headers=auth).status_code
                == 200
            )
        r = c.get("/")  # public: no token
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp
        assert "'unsafe-inline'" not in csp  # only the page's own hashed script and style
        page = r.text
        assert "hive-relay" in page
        rows = status_rows(page)
        assert rows["Version"] == __version__
        assert rows["Workspaces"] == "2"
        assert rows["Envelopes retained"] == "3"
        assert rows["Live streams"] == "0"
        assert "Uptime" in rows
        for secret in (SECRET_WS, "other-ws-4d2f", SECRET_TOKEN, "b0dy-5ecret"):
            assert secret not in page


def test_status_page_of_an_empty_relay(client: TestClient) -> None:
    rows = status_rows(client.get("/").text)
    assert rows["Workspaces"] == "0"
    assert rows["Envelopes retained"] == "0"


def test_security_headers_on_every_answer(client: TestClient) -> None:
    for r in (
        client.get("/"),
        client.get("/v1/health"),
        client.get("/v1/workspaces/w/envelopes"),
        client.get("/nope"),
        client.post("/v1/workspaces/w/envelopes", content=b"{"),
    ):
        assert r.headers["x-content-type-options"] == "nosniff"


# -------------------------------------------------------------------- metrics
def exercise(c: TestClient, token: str | None = None) -> None:
    """Requests that put a workspace id, a token and a body in front of the relay."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    base = f"/v1/workspaces/{SECRET_WS}"
    assert c.post(f"{base}/envelopes", content=SECRET_BODY, headers=auth).status_code == 200
    assert c.post(f"{base}/envelopes", content=SECRET_BODY, headers=auth).status_code == 200
    assert c.get(f"{base}/envelopes", headers=auth).status_code == 200
    assert c.post(f"{base}/keyring", content=SECRET_BODY, headers=auth).status_code == 200
    body = b'{"device_id":"dev-secret-0f9e","data":1}'
    assert c.post(f"{base}/presence", content=body, headers=auth).status_code == 200
    assert c.get(f"{base}/nope", headers=auth).status_code == 404
    assert c.get(f"/v1/workspaces/{SECRET_WS}/envelopes?after=x", headers=auth).status_code == 400
    c.get(f"{base}/envelopes", headers={"Authorization": f"Bearer {SECRET_TOKEN}-wrong"})


def assert_content_blind(text: str) -> None:
    for secret in (SECRET_WS, SECRET_TOKEN, "b0dy-5ecret", "dev-secret", "testclient"):
        assert secret not in text, secret


def test_metrics_are_public_by_default_and_content_blind() -> None:
    with make_client(access_tokens=SECRET_TOKEN) as c:
        exercise(c, SECRET_TOKEN)
        r = c.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        text = r.text
        assert_content_blind(text)
        assert 'route="/v1/workspaces/{ws}/envelopes"' in text
        assert "hive_relay_http_requests_total" in text
        assert re.search(r"^hive_relay_envelopes_retained 1(\.0)?$", text, re.M)
        assert re.search(r"^hive_relay_workspaces 1(\.0)?$", text, re.M)


def test_metrics_token_gates_metrics() -> None:
    with make_client(access_tokens=SECRET_TOKEN, metrics_token="metrics-secret-5a") as c:
        exercise(c, SECRET_TOKEN)
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Bearer {SECRET_TOKEN}"},  # an access token is not the metrics token
            {"Authorization": "Basic metrics-secret-5a"},
        ):
            r = c.get("/metrics", headers=headers)
            assert r.status_code == 401
            assert r.headers["www-authenticate"].split()[0] == "Bearer"
            assert r.json()["error"] == "unauthorized"
        r = c.get("/metrics", headers={"Authorization": "Bearer metrics-secret-5a"})
        assert r.status_code == 200
        assert "hive_relay_http_requests_total" in r.text
        assert "metrics-secret-5a" not in r.text
        assert_content_blind(r.text)


def test_metrics_token_alone_leaves_the_api_open() -> None:
    with make_client(metrics_token="m") as c:
        assert c.get("/v1/workspaces/w/envelopes").status_code == 200
        assert c.get("/metrics").status_code == 401


# -------------------------------------------------------------------- openapi
def served(app: Any) -> dict[str, set[str]]:
    """path template → lower-case methods the app answers (a WebSocket counts as get)."""
    out: dict[str, set[str]] = {}
    for route in app.routes:
        if isinstance(route, WebSocketRoute):
            out.setdefault(route.path, set()).add("get")
        elif isinstance(route, Route):
            methods = {m.lower() for m in route.methods or ()}
            if "get" in methods and route.path != "/v1/health":
                methods.discard("head")  # Starlette's implicit HEAD for every GET
            out.setdefault(route.path, set()).update(methods)
        else:  # pragma: no cover - a new kind of route needs this test updated
            raise AssertionError(f"unexpected route {route!r}")
    return out


OPERATIONS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def documented(doc: dict[str, Any]) -> dict[str, set[str]]:
    return {path: set(item) & OPERATIONS for path, item in doc["paths"].items()}


def test_openapi_document_lists_every_route_the_app_serves(client: TestClient) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["version"] == __version__
    assert documented(doc) == served(client.app)
    assert "head" in doc["paths"]["/v1/health"]


def test_openapi_operations_are_complete(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    operation_ids = []
    for path, item in doc["paths"].items():
        path_params = {p["name"] for p in item.get("parameters", ()) if p["in"] == "path"}
        for method in set(item) & OPERATIONS:
            op = item[method]
            operation_ids.append(op["operationId"])
            assert op["responses"], (path, method)
            params = path_params | {
                p["name"] for p in op.get("parameters", ()) if p["in"] == "path"
            }
            assert params == set(re.findall(r"{(\w+)}", path)), (path, method)
    assert len(operation_ids) == len(set(operation_ids))


# What PROTOCOL.md says each route may answer; the document must describe each status.
EXPECTED_STATUSES = {
    ("/v1/workspaces/{ws}/envelopes", "post"): {"200", "400", "401", "403", "413", "429"},
    ("/v1/workspaces/{ws}/envelopes", "get"): {"200", "400", "401", "403"},
    ("/v1/workspaces/{ws}/envelopes/batch", "post"): {"200", "400", "401", "403", "413", "429"},
    ("/v1/workspaces/{ws}/keyring", "post"): {"200", "400", "401", "403", "413"},
    ("/v1/workspaces/{ws}/keyring", "get"): {"200", "400", "401", "403"},
    ("/v1/workspaces/{ws}/presence", "post"): {"200", "400", "401", "403", "413"},
    ("/v1/workspaces/{ws}/candidates", "post"): {"200", "400", "401", "403", "413"},
    ("/v1/pair", "post"): {"200", "400", "401", "413", "429"},
    ("/v1/pair/{code}", "get"): {"200", "401", "404", "429"},
    ("/v1/health", "get"): {"200", "503"},
    ("/metrics", "get"): {"200", "401"},
}


@pytest.mark.parametrize(("path", "method"), EXPECTED_STATUSES)
def test_openapi_documents_each_status_a_route_answers(
    client: TestClient, path: str, method: str
) -> None:
    doc = client.get("/openapi.json").json()
    responses = set(doc["paths"][path][method]["responses"])
    assert EXPECTED_STATUSES[path, method] <= responses


def test_openapi_documents_the_read_parameters_and_headers(client: TestClient) -> None:
    op = client.get("/openapi.json").json()["paths"]["/v1/workspaces/{ws}/envelopes"]["get"]
    assert {"after", "limit", "wait"} <= {p["name"] for p in op["parameters"]}
    headers = {h.lower() for h in op["responses"]["200"]["headers"]}
    assert {
        "x-relay-head",
        "x-relay-oldest",
        "x-relay-epoch",
        "x-relay-gap",
        "x-relay-more",
    } <= headers


BATCH_KEYS = [
    "a",
    " a ",
    "a,,b",
    ",",
    "\t, ,",
    "x" * 200,
    " " + "x" * 200 + "\t",
    "x" * 201,
    "a" * 199 + " bc",
    "k1, k2 ,k3",
    ",".join(f"k{i}" for i in range(1000)),
]


@pytest.mark.parametrize("value", BATCH_KEYS, ids=range(len(BATCH_KEYS)))
def test_openapi_states_the_relays_rule_for_each_batch_key(client: TestClient, value: str) -> None:
    """A header matches the documented pattern exactly when the relay takes it
    (with one entry per element, the rule between header and body it cannot state)."""
    op = client.get("/openapi.json").json()["paths"]["/v1/workspaces/{ws}/envelopes/batch"]
    (param,) = [p for p in op["post"]["parameters"] if p["name"] == "Idempotency-Keys"]
    documented = re.search(param["schema"].get("pattern", ""), value) is not None
    elements = ",".join(str(i) for i in range(value.count(",") + 1))
    r = client.post(
        "/v1/workspaces/w/envelopes/batch",
        content=f"[{elements}]",
        headers={"Idempotency-Keys": value},
    )
    assert r.status_code in (200, 400), r.text
    assert (r.status_code == 200) == documented, (r.status_code, r.text)


PAIR_PAYLOADS = [" ", "\t\r\n", "\x1c\x1f", "\x85", "\u00a0", "\u2028\u3000", "a", " a ", "\u200b"]


@pytest.mark.parametrize("payload", PAIR_PAYLOADS, ids=range(len(PAIR_PAYLOADS)))
def test_openapi_states_the_relays_rule_for_a_pairing_payload(
    client: TestClient, payload: str
) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["PairRequest"]
    documented = re.search(schema["properties"]["payload"].get("pattern", ""), payload) is not None
    r = client.post("/v1/pair", json={"payload": payload})
    assert r.status_code in (200, 400), r.text
    assert (r.status_code == 200) == documented, (r.status_code, r.text)

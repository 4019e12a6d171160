//! API keys end to end: admin API → SQLite → in-memory table → request path.
mod common;

use common::*;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

fn config(upstream: std::net::SocketAddr, data_dir: &std::path::Path) -> String {
    format!(
        "data_dir = \"{}\"\n{}[upstreams.u]\nendpoints = [\"{upstream}\"]\n\n\
         [[routes]]\nname = \"api\"\npath = \"/v1\"\nupstream = \"u\"\nauth = [\"api_key\"]\n\n\
         [[routes]]\nname = \"other\"\npath = \"/v2\"\nupstream = \"u\"\nauth = [\"api_key\"]\n\n\
         [[routes]]\nname = \"public\"\npath = \"/public\"\nupstream = \"u\"\n",
        data_dir.display(),
        base_config()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_authenticate_identify_and_revoke() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&config(upstream.addr, data.path()));

    // Keys on an undefined plan are refused (tests/hardening.rs); this one exists.
    for plan in ["pro", "gold"] {
        let reply = admin_json(&gateway, "POST", "/v1/plans", json!({"name": plan})).await;
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    let reply = admin_json(&gateway, "POST", "/v1/consumers", json!({"id": "acme", "plan": "pro"})).await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert!(!reply.headers.contains_key("tollgate-warning"));
    assert_eq!(
        admin_json(&gateway, "POST", "/v1/consumers", json!({"id": "acme"}))
            .await
            .status,
        409
    );
    let (key_id, secret) = create_key(&gateway, json!({"consumer": "acme"})).await;
    assert!(secret.starts_with("tg_live_") && secret.len() == 72, "{secret}");

    // Every location; the credential never reaches the upstream, the identity does.
    for (path, header) in [
        ("/v1/a", Some(("x-api-key", secret.clone()))),
        ("/v1/a", Some(("authorization", format!("Bearer {secret}")))),
        (&format!("/v1/a?x=1&api_key={secret}&y=2") as &str, None),
        (&format!("/v1/a?api-key={secret}") as &str, None),
    ] {
        let reply = call(&gateway, path, header.clone()).await;
        assert_eq!(reply.status, 200, "{path} {header:?}: {}", reply.text());
        let seen = reply.json();
        assert_eq!(seen["headers"]["x-consumer-id"], "acme");
        assert_eq!(seen["headers"]["x-plan"], "pro");
        assert!(seen["headers"].get("x-api-key").is_none());
        assert!(seen["headers"].get("authorization").is_none());
        assert!(!seen["path"].as_str().unwrap().contains(&secret), "{seen}");
    }
    let seen = call(&gateway, &format!("/v1/a?x=1&api_key={secret}&y=2"), None)
        .await
        .json();
    assert_eq!(seen["path"], "/v1/a?x=1&y=2");

    // Rejections, each with its code.
    let expect = |reply: Reply, status: u16, code: &str| {
        assert_eq!(reply.status.as_u16(), status, "{}", reply.text());
        assert_eq!(reply.json()["error"]["code"], code);
    };
    expect(call(&gateway, "/v1/a", None).await, 401, "missing_credentials");
    expect(
        call(&gateway, "/v1/a", Some(("x-api-key", "tg_live_wrong".into()))).await,
        401,
        "invalid_api_key",
    );
    let (_, limited) = create_key(&gateway, json!({"consumer": "acme", "routes": ["other"]})).await;
    expect(
        call(&gateway, "/v1/a", Some(("x-api-key", limited.clone()))).await,
        403,
        "route_not_allowed",
    );
    assert_eq!(call(&gateway, "/v2/a", Some(("x-api-key", limited))).await.status, 200);
    let (_, expired) = create_key(&gateway, json!({"consumer": "acme", "expires_at": 1})).await;
    expect(
        call(&gateway, "/v1/a", Some(("x-api-key", expired))).await,
        403,
        "key_expired",
    );
    let (_, own_plan) = create_key(&gateway, json!({"consumer": "acme", "plan": "gold"})).await;
    assert_eq!(
        call(&gateway, "/v1/a", Some(("x-api-key", own_plan))).await.json()["headers"]["x-plan"],
        "gold"
    );

    // A public route passes without a key, and spoofed identity headers are dropped.
    let seen = call(&gateway, "/public", Some(("x-consumer-id", "admin".into())))
        .await
        .json();
    assert!(seen["headers"].get("x-consumer-id").is_none(), "{seen}");

    // Admin reads never show the secret.
    let shown = admin(&gateway, "GET", &format!("/v1/keys/{key_id}")).await;
    assert_eq!(shown.status, 200);
    assert!(!shown.text().contains(&secret));
    assert_eq!(shown.json()["prefix"], &secret[..12]);
    assert!(!admin(&gateway, "GET", "/v1/keys").await.text().contains(&secret));

    // Revocation takes effect on the next request.
    assert_eq!(
        admin(&gateway, "DELETE", &format!("/v1/keys/{key_id}")).await.status,
        204
    );
    expect(
        call(&gateway, "/v1/a", Some(("x-api-key", secret.clone()))).await,
        403,
        "key_revoked",
    );
    assert_eq!(admin(&gateway, "DELETE", "/v1/keys/key_missing").await.status, 404);
    assert!(!gateway.stderr().contains(&secret), "the secret reached the log");
}

/// One keep-alive connection carrying several callers' keys, as a CDN's connection does,
/// and a key revoked between two of its requests: the connection remembers its last key's
/// hash (docs/security.md, "Keys in memory"), never another caller's identity or a
/// revoked key's admission.
#[tokio::test(flavor = "multi_thread")]
async fn one_connection_many_keys_and_a_revocation_between_requests() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&config(upstream.addr, data.path()));
    for (consumer, plan) in [("acme", "pro"), ("globex", "gold")] {
        assert_eq!(
            admin_json(&gateway, "POST", "/v1/plans", json!({"name": plan}))
                .await
                .status,
            201
        );
        let reply = admin_json(&gateway, "POST", "/v1/consumers", json!({"id": consumer, "plan": plan})).await;
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    let (acme_id, acme) = create_key(&gateway, json!({"consumer": "acme"})).await;
    let (_, globex) = create_key(&gateway, json!({"consumer": "globex"})).await;

    let tcp = tokio::net::TcpStream::connect(gateway.proxy).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut on_connection = async |key: &str| {
        let request = Request::get("/v1/a")
            .header("host", "gateway")
            .header("x-api-key", key)
            .body(full(""))
            .unwrap();
        sender.ready().await.expect("the connection stays open");
        let response = sender.send_request(request).await.expect("the connection stays open");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice::<Value>(&body).unwrap())
    };
    let mut near = acme.clone().into_bytes();
    near[71] = if near[71] == b'0' { b'1' } else { b'0' };
    let near = String::from_utf8(near).unwrap();
    for (key, status, consumer) in [
        (&acme, 200, "acme"),
        (&acme, 200, "acme"),
        (&globex, 200, "globex"),
        (&acme, 200, "acme"),
        (&near, 401, ""),
        (&acme, 200, "acme"),
    ] {
        let (got, body) = on_connection(key).await;
        assert_eq!(got, status, "{body}");
        if status == 200 {
            assert_eq!(body["headers"]["x-consumer-id"], consumer, "{body}");
        } else {
            assert_eq!(body["error"]["code"], "invalid_api_key");
        }
    }
    // HTTP/2, as CDNs connect: concurrent streams of one connection, the two callers'
    // keys interleaved; each stream is its own caller.
    let h2 = h2_client();
    let streams = (0..40).map(|i| {
        let (key, consumer) = if i % 2 == 0 {
            (&acme, "acme")
        } else {
            (&globex, "globex")
        };
        let request = Request::get(gateway.url("/v1/a"))
            .header("x-api-key", key.as_str())
            .body(full(""))
            .unwrap();
        let h2 = h2.clone();
        async move { (send_with(&h2, request).await, consumer) }
    });
    for (reply, consumer) in futures_util::future::join_all(streams).await {
        assert_eq!(reply.version, http::Version::HTTP_2);
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["headers"]["x-consumer-id"], consumer);
    }

    assert_eq!(
        admin(&gateway, "DELETE", &format!("/v1/keys/{acme_id}")).await.status,
        204
    );
    let (status, body) = on_connection(&acme).await;
    assert_eq!((status, &body["error"]["code"]), (403, &json!("key_revoked")), "{body}");
    let (status, body) = on_connection(&globex).await;
    assert_eq!(
        (status, &body["headers"]["x-consumer-id"]),
        (200, &json!("globex")),
        "{body}"
    );
    drop(sender);
    let _ = connection.await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_survive_a_restart() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let config = config(upstream.addr, data.path());
    let secret = {
        let gateway = Gateway::start(&config);
        assert_eq!(
            admin_json(&gateway, "POST", "/v1/consumers", json!({"id": "acme"}))
                .await
                .status,
            201
        );
        let (_, secret) = create_key(&gateway, json!({"consumer": "acme"})).await;
        assert_eq!(
            call(&gateway, "/v1/a", Some(("x-api-key", secret.clone())))
                .await
                .status,
            200
        );
        secret
    };
    assert!(data.path().join("tollgate.db").exists());
    let gateway = Gateway::start(&config);
    let reply = call(&gateway, "/v1/a", Some(("x-api-key", secret))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["headers"]["x-plan"], "default");
    // Deleting the consumer revokes its keys.
    assert_eq!(admin(&gateway, "DELETE", "/v1/consumers/acme").await.status, 204);
    assert_eq!(admin(&gateway, "GET", "/v1/consumers/acme").await.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_state_api_validates_input() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&config(upstream.addr, data.path()));
    let reply = admin_json(&gateway, "POST", "/v1/consumers", json!({"idd": "x"})).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["code"], "invalid_request");
    assert!(
        reply.json()["error"]["message"].as_str().unwrap().contains("idd"),
        "{}",
        reply.text()
    );
    let reply = admin_json(&gateway, "POST", "/v1/consumers", json!({"id": "no spaces"})).await;
    assert_eq!(reply.status, 400);
    assert!(reply.text().contains("`id`"));
    let reply = admin_json(&gateway, "POST", "/v1/keys", json!({"consumer": "ghost"})).await;
    assert_eq!(reply.status, 404);
    let unauthenticated = send(
        Request::post(gateway.admin_url("/v1/consumers"))
            .header("content-type", "application/json")
            .body(full(r#"{"id":"x"}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(unauthenticated.status, 401);

    let reply = admin_json(
        &gateway,
        "POST",
        "/v1/plans",
        json!({"name": "pro", "rate_per_second": 100, "burst": 200, "monthly": 2000000}),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let reply = admin_json(&gateway, "PUT", "/v1/plans/pro", json!({"daily": 5000})).await;
    assert_eq!(reply.status, 200);
    let plan = admin(&gateway, "GET", "/v1/plans/pro").await.json();
    assert_eq!((plan["daily"].as_u64(), plan["monthly"].as_u64()), (Some(5000), None));
    assert_eq!(
        admin(&gateway, "GET", "/v1/plans").await.json()["plans"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(admin(&gateway, "DELETE", "/v1/plans/pro").await.status, 204);
    assert_eq!(admin(&gateway, "GET", "/v1/plans/pro").await.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_manages_consumers_keys_and_plans() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&config(upstream.addr, data.path()));
    let admin_url = format!("http://{}", gateway.admin);
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(binary())
            .args(args)
            .args(["--admin-url", &admin_url])
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, _, err) = cli(&[
        "plans",
        "create",
        "pro",
        "--rate",
        "10",
        "--burst",
        "20",
        "--monthly",
        "1000",
    ]);
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&["plans", "list"]);
    assert!(ok);
    assert!(out.lines().next().unwrap().starts_with("NAME"), "{out}");
    assert!(out.contains("pro") && out.contains("1000"), "{out}");
    assert!(cli(&["consumers", "create", "acme", "--plan", "pro"]).0);
    let (ok, out, err) = cli(&["keys", "create", "--consumer", "acme", "--route", "api"]);
    assert!(ok, "{err}");
    let created: Value = serde_json::from_str(&out).unwrap();
    let (id, secret) = (created["id"].as_str().unwrap(), created["key"].as_str().unwrap());
    assert_eq!(created["routes"], json!(["api"]));
    assert_eq!(
        call(&gateway, "/v1/x", Some(("x-api-key", secret.to_string())))
            .await
            .status,
        200
    );
    let (_, out, _) = cli(&["keys", "list"]);
    assert!(out.contains(id) && !out.contains(secret), "{out}");
    assert!(cli(&["keys", "revoke", id]).0);
    assert_eq!(
        call(&gateway, "/v1/x", Some(("x-api-key", secret.to_string())))
            .await
            .status,
        403
    );
    let (ok, _, err) = cli(&["keys", "revoke", "key_nope"]);
    assert!(!ok);
    assert!(err.contains("404"), "{err}");
    let (ok, _, err) = cli(&["consumers", "create", "acme"]);
    assert!(!ok && err.contains("already exists"), "{err}");
    // Without the token the admin API refuses.
    let output = std::process::Command::new(binary())
        .args(["consumers", "list", "--admin-url", &admin_url])
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("401"));
}

#[tokio::test(flavor = "multi_thread")]
async fn jwt_bearer_tokens_identify_the_consumer() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let config = format!(
        "data_dir = \"{}\"\n{}[upstreams.u]\nendpoints = [\"{}\"]\n\n\
         [[jwt.issuers]]\nissuer = \"https://auth.test/\"\nalgorithm = \"HS256\"\nsecret = \"jwt-secret\"\n\
         audiences = [\"geo\"]\nplan_claim = \"plan\"\n\n[plans.pro]\n\n\
         [[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"u\"\nauth = [\"api_key\", \"jwt\"]\n",
        data.path().display(),
        base_config(),
        upstream.addr
    );
    let gateway = Gateway::start(&config);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |exp: u64, secret: &str| {
        encode(
            &Header::default(),
            &json!({"iss": "https://auth.test/", "aud": "geo", "sub": "user-7", "plan": "pro", "exp": exp}),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let reply = call(
        &gateway,
        "/x",
        Some(("authorization", format!("Bearer {}", token(now + 300, "jwt-secret")))),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = &reply.json()["headers"];
    assert_eq!(
        (seen["x-consumer-id"].as_str(), seen["x-plan"].as_str()),
        (Some("user-7"), Some("pro"))
    );
    assert!(seen.get("authorization").is_none());
    for (token, reason) in [
        (token(now - 300, "jwt-secret"), "expired"),
        (token(now + 300, "forged"), "bad signature"),
    ] {
        let reply = call(&gateway, "/x", Some(("authorization", format!("Bearer {token}")))).await;
        assert_eq!(reply.status, 401);
        let body = reply.json();
        assert_eq!(body["error"]["code"], "invalid_token");
        assert!(body["error"]["message"].as_str().unwrap().contains(reason), "{body}");
    }
    let reply = call(&gateway, "/x", None).await;
    assert_eq!(reply.json()["error"]["code"], "missing_credentials");
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_writes_while_the_proxy_serves() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = std::sync::Arc::new(Gateway::start(&config(upstream.addr, data.path())));
    assert_eq!(
        admin_json(&gateway, "POST", "/v1/consumers", json!({"id": "acme"}))
            .await
            .status,
        201
    );
    let (_, steady) = create_key(&gateway, json!({"consumer": "acme"})).await;
    // Traffic on one key while 100 keys are created concurrently: no request fails.
    let traffic = {
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let mut ok = 0;
            for _ in 0..300 {
                let reply = call(&gateway, "/v1/x", Some(("x-api-key", steady.clone()))).await;
                assert_eq!(reply.status, 200, "{}", reply.text());
                ok += 1;
            }
            ok
        })
    };
    let mut writers = Vec::new();
    for _ in 0..4 {
        let gateway = gateway.clone();
        writers.push(tokio::spawn(async move {
            let mut secrets = Vec::new();
            for _ in 0..25 {
                secrets.push(create_key(&gateway, json!({"consumer": "acme"})).await.1);
            }
            secrets
        }));
    }
    let mut created = Vec::new();
    for writer in writers {
        created.extend(writer.await.unwrap());
    }
    assert_eq!(traffic.await.unwrap(), 300);
    assert_eq!(created.len(), 100);
    for secret in created {
        assert_eq!(call(&gateway, "/v1/x", Some(("x-api-key", secret))).await.status, 200);
    }
    let listed = admin(&gateway, "GET", "/v1/keys").await.json();
    assert_eq!(listed["keys"].as_array().unwrap().len(), 101);
}

#[tokio::test(flavor = "multi_thread")]
async fn openapi_document_describes_the_admin_api() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&config(upstream.addr, data.path()));
    let reply = get(&gateway.admin_url("/openapi.json")).await;
    assert_eq!(reply.status, 200);
    let doc = reply.json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    for (path, method) in [
        ("/v1/keys", "post"),
        ("/v1/keys/{id}", "delete"),
        ("/v1/consumers", "post"),
        ("/v1/plans/{name}", "put"),
        ("/v1/reload", "post"),
        ("/readyz", "get"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{path} {method} missing");
    }
    assert!(doc["components"]["schemas"]["KeyBody"]["properties"]["consumer"].is_object());
    assert_eq!(doc["components"]["securitySchemes"]["admin_token"]["scheme"], "bearer");
}

#[tokio::test(flavor = "multi_thread")]
async fn plans_from_the_config_file_are_listed() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let config = format!(
        "{}\n[plans.free]\nrate = {{ per_second = 5, burst = 10 }}\ndaily = 1500\n",
        config(upstream.addr, data.path())
    );
    let gateway = Gateway::start(&config);
    let plan = admin(&gateway, "GET", "/v1/plans/free").await.json();
    assert_eq!(
        (
            plan["rate_per_second"].as_u64(),
            plan["burst"].as_u64(),
            plan["daily"].as_u64()
        ),
        (Some(5), Some(10), Some(1500))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn jwks_url_is_fetched_and_refreshed() {
    use base64::Engine;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use std::sync::{Arc, Mutex};
    let oct = |kid: &str, secret: &str| {
        json!({"kty": "oct", "kid": kid, "alg": "HS256",
               "k": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)})
    };
    // An identity provider on loopback whose JWKS the test can rotate.
    let served = Arc::new(Mutex::new(json!({"keys": [oct("k1", "one")]}).to_string()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let idp = listener.local_addr().unwrap();
    let document = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let document = document.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let body = document.lock().unwrap().clone();
                    // An empty document: the identity provider is down.
                    let status = if body.is_empty() { 500 } else { 200 };
                    let response = http::Response::builder().status(status).body(full(body)).unwrap();
                    async move { Ok::<_, std::convert::Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let config = format!(
        "data_dir = \"{}\"\n{}[upstreams.u]\nendpoints = [\"{}\"]\n\n\
         [[jwt.issuers]]\nissuer = \"https://auth.test/\"\nalgorithm = \"HS256\"\n\
         jwks_url = \"http://{idp}/.well-known/jwks.json\"\njwks_allow_http = true\njwks_refresh = \"1s\"\n\n\
         [[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"u\"\nauth = [\"jwt\"]\n",
        data.path().display(),
        base_config(),
        upstream.addr
    );
    let gateway = Gateway::start(&config);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |kid: &str, secret: &str| {
        let header = Header {
            kid: Some(kid.into()),
            ..Header::default()
        };
        let claims = json!({"iss": "https://auth.test/", "sub": "user-1", "exp": now + 300});
        encode(&header, &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    };
    let bearer = |t: String| Some(("authorization", format!("Bearer {t}")));
    assert_eq!(call(&gateway, "/x", bearer(token("k1", "one"))).await.status, 200);
    let refused = call(&gateway, "/x", bearer(token("k2", "two"))).await;
    assert_eq!(refused.status, 401);
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("unknown key id")
    );

    *served.lock().unwrap() = json!({"keys": [oct("k2", "two")]}).to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while call(&gateway, "/x", bearer(token("k2", "two"))).await.status != 200 {
        assert!(std::time::Instant::now() < deadline, "rotated key not picked up");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // The retired key stops working once the new document is in.
    assert_eq!(call(&gateway, "/x", bearer(token("k1", "one"))).await.status, 401);

    // A reload while the identity provider is down: the new configuration starts with the
    // keys already fetched, so tokens keep working through it.
    *served.lock().unwrap() = String::new();
    gateway.write_config(&config.replace("jwks_refresh = \"1s\"", "jwks_refresh = \"1h\""));
    let reply = admin(&gateway, "POST", "/v1/reload").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(call(&gateway, "/x", bearer(token("k2", "two"))).await.status, 200);

    // Keys rotate at the provider; with an hourly refresh, a token naming the new `kid`
    // makes the gateway fetch again (at most every 10 s), and the token then works.
    *served.lock().unwrap() = json!({"keys": [oct("k3", "three")]}).to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while call(&gateway, "/x", bearer(token("k3", "three"))).await.status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "an unknown kid did not trigger a JWKS fetch"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

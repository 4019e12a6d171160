//! Packaging (docs/packaging.md): the Prometheus alert rules pass promtool (their syntax,
//! and unit tests that make each alert fire on the series that should raise it), and the
//! Grafana dashboard is well formed and uses only metrics a running gateway exports; the
//! container image's configuration passes `tollgate check` and listens where the image's
//! published ports reach it.
mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use common::*;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn promtool(args: &[&str]) -> String {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(repo("deploy/prometheus"))
        .output()
        .expect("promtool (Debian's prometheus package; ./test.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(checked.contains("SUCCESS: 10 rules found"), "{checked}");
    promtool(&["test", "rules", "alerts_test.yml"]);
}

/// Every `tollgate_*` name in `text`, histogram series folded into their metric.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("tollgate_") {
        let start = i + at;
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()))
                .unwrap_or(text.len() - start);
        // Not part of a longer word (a label value, a path).
        if start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            let name = &text[start..end];
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.insert(base.to_string());
        }
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_and_the_rules_use_only_metrics_a_gateway_exports() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo("deploy/grafana/tollgate.json")).unwrap())
            .expect("the dashboard is JSON");
    // The shape Grafana imports: a uid, a title, a schema version, panels with unique ids,
    // positions on the 24-column grid and at least one query each, on the template's
    // data source.
    assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 30));
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(variables.contains(&"datasource") && variables.contains(&"instance"));
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10);
    let mut ids = BTreeSet::new();
    let mut queries = String::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64().expect("panel id")), "duplicate id");
        assert!(panel["title"].as_str().is_some_and(|t| !t.is_empty()));
        assert!(
            ["timeseries", "stat", "gauge", "table", "bargauge"].contains(&panel["type"].as_str().unwrap_or_default())
        );
        let grid = &panel["gridPos"];
        let (x, w) = (grid["x"].as_u64().unwrap(), grid["w"].as_u64().unwrap());
        assert!(x + w <= 24 && grid["h"].as_u64().unwrap() > 0, "{panel}");
        assert_eq!(panel["datasource"]["uid"], "${datasource}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty());
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            assert!(expr.contains("instance=~\"$instance\""), "filtered by node: {expr}");
            queries.push_str(expr);
            queries.push('\n');
        }
    }
    let rules = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap();
    let mut used = metric_names(&queries);
    used.extend(metric_names(&rules));

    // A gateway with everything on that adds metrics: global mode, access logs and HTTPS.
    let nats = Nats::start();
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (data.path().join("cert.pem"), data.path().join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let config = format!(
        "{}\n[logs]\ndir = \"logs\"\n\n[server.tls]\nlisten = [\"127.0.0.1:0\"]\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
        cluster_node_config(upstream.addr, data.path(), &nats.url(), "r1", "pack", ""),
        cert_path.display(),
        key_path.display()
    );
    let gateway = Gateway::start(&config);
    within(std::time::Duration::from_secs(10), || async {
        admin(&gateway, "GET", "/readyz").await.status == 200
    })
    .await
    .expect("ready");
    assert_eq!(call(&gateway, "/v1/x", None).await.status, 401);
    let exported = admin(&gateway, "GET", "/metrics").await.text();
    let exported: BTreeSet<String> = exported
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = used.iter().filter(|name| !exported.contains(*name)).collect();
    assert!(
        missing.is_empty(),
        "used but not exported: {missing:?}\nexported: {exported:?}"
    );
}

#[test]
fn the_compose_cluster_configs_pass_tollgate_check() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo("deploy/compose")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let output = check_config(&path, &[("TOLLGATE_ADMIN_TOKEN", "compose-token")]);
            assert!(
                output.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 3);
    let compose = std::fs::read_to_string(repo("deploy/docker-compose.yml")).unwrap();
    for node in ["node1.toml", "node2.toml", "node3.toml"] {
        assert!(compose.contains(node), "{node} is mounted by the compose file");
    }
}

#[test]
fn the_container_config_listens_outside_the_container_and_names_what_it_needs() {
    let config = repo("deploy/container.toml");
    let ok = check_config(
        &config,
        &[
            ("TOLLGATE_UPSTREAM", "api.internal:9000"),
            ("TOLLGATE_ADMIN_TOKEN", "t"),
        ],
    );
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    // Without them, it refuses to start and says which variable, where.
    let missing = check_config(&config, &[]);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    for (line, name) in [(":16:", "TOLLGATE_ADMIN_TOKEN"), (":19:", "TOLLGATE_UPSTREAM")] {
        assert!(
            stderr.lines().any(|l| l.contains(line) && l.contains(name)),
            "{name} at line {line} in:\n{stderr}"
        );
    }
    // Loopback inside a container is unreachable through published ports; the ports are
    // the ones the image exposes, and the image's default command reads this file.
    let text = std::fs::read_to_string(&config).unwrap();
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    for listen in ["\"0.0.0.0:8080\"", "\"0.0.0.0:9090\""] {
        assert!(text.contains(listen), "{listen} in deploy/container.toml");
    }
    assert!(dockerfile.contains("EXPOSE 8080 9090"));
    assert!(dockerfile.contains("COPY deploy/container.toml /etc/tollgate/tollgate.toml"));
    assert!(dockerfile.contains(r#"CMD ["serve", "--config", "/etc/tollgate/tollgate.toml"]"#));
    assert!(text.contains("data_dir = \"/var/lib/tollgate\""));
    assert!(dockerfile.contains("--chown=65532:65532 /out/state /var/lib/tollgate"));
    // The build context keeps it although the rest of deploy/ is left out.
    let ignore = std::fs::read_to_string(repo(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l == "!deploy/container.toml"));
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    // The unit as installed, with this build's binary where it expects /usr/local/bin.
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo("deploy/systemd/tollgate.service"))
        .unwrap()
        .replace("/usr/local/bin/tollgate", binary());
    let path = dir.path().join("tollgate.service");
    std::fs::write(&path, unit).unwrap();
    let verify = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package; ./test.sh installs it)");
    let complaints = String::from_utf8_lossy(&verify.stderr).into_owned();
    assert!(verify.status.success() && complaints.trim().is_empty(), "{complaints}");
    // systemd's own exposure score (0 best, 10 worst; the threshold is in tenths): 1.8
    // when written, and above 3.0 fails.
    let security = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--threshold=30"])
        .arg(&path)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&security.stdout).into_owned();
    assert!(security.status.success(), "exposure above 3:\n{report}");
    assert!(report.contains("Overall exposure level"), "{report}");
}

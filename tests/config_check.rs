//! `tollgate check` on the shipped examples and on each broken fixture. A fixture lists the
//! errors it must produce as `# expect: LINE FIELD` lines (`-` = no field, e.g. syntax).
mod common;

use std::process::Command;

use common::{binary, check_config, fixture};

fn check(path: &std::path::Path) -> (bool, String, String) {
    let output = check_config(path, &[("TOLLGATE_ADMIN_TOKEN", "example-token")]);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn every_example_config_is_valid() {
    let mut checked = 0;
    for entry in std::fs::read_dir(fixture("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (ok, stdout, stderr) = check(&path);
            assert!(ok, "{}: {stderr}", path.display());
            assert!(stdout.contains("OK"));
            checked += 1;
        }
    }
    assert!(checked >= 2);
}

#[test]
fn each_broken_fixture_names_the_right_lines_and_fields() {
    let mut checked = 0;
    for entry in std::fs::read_dir(fixture("tests/fixtures/broken")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expected: Vec<(usize, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(|e| {
                let (line, field) = e.trim().split_once(' ').unwrap();
                (line.parse().unwrap(), field.to_string())
            })
            .collect();
        assert!(!expected.is_empty(), "{} has no expectations", path.display());
        let (ok, _, stderr) = check(&path);
        assert!(!ok, "{} was accepted", path.display());
        let error_lines: Vec<&str> = stderr.lines().filter(|l| l.contains(".toml:")).collect();
        let located: Vec<&str> = error_lines
            .iter()
            .copied()
            .filter(|l| !l.ends_with("error(s)"))
            .collect();
        assert_eq!(
            located.len(),
            expected.len(),
            "{}: every error at once:\n{stderr}",
            path.display()
        );
        for (line, field) in &expected {
            let prefix = format!("{}:{line}:", path.display());
            let found = located
                .iter()
                .any(|l| l.starts_with(&prefix) && (field == "-" || l.contains(&format!("field `{field}`"))));
            assert!(
                found,
                "{}: expected an error at line {line} for `{field}`:\n{stderr}",
                path.display()
            );
        }
        assert!(stderr.contains(&format!("{} error(s)", expected.len())));
        checked += 1;
    }
    assert!(checked >= 5);
}

#[test]
fn serve_refuses_a_broken_config() {
    let output = Command::new(binary())
        .args(["serve", "--config"])
        .arg(fixture("tests/fixtures/broken/unknown_field.toml"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("field `server.lsten`"), "{stderr}");
    assert!(stderr.contains("refusing to start"));
}

#[test]
fn missing_file_is_reported() {
    let (ok, _, stderr) = check(std::path::Path::new("/nonexistent/tollgate.toml"));
    assert!(!ok);
    assert!(
        stderr.contains("/nonexistent/tollgate.toml: cannot read file"),
        "{stderr}"
    );
}

#[test]
fn demo_runs_its_sample_requests() {
    let output = Command::new(binary())
        .args([
            "demo",
            "--once",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("curl -i http://127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("→ 200 OK {\""), "{stdout}");
    // The access log's table: the demo's requests, a 429 refused by the daily quota.
    assert!(stdout.contains("tollgate logs --dir"), "{stdout}");
    assert!(
        stdout.lines().any(|l| l.contains(" 429 GET") && l.contains("daily")),
        "{stdout}"
    );
    assert!(stdout.contains("\"ip\":\"8.8.8.8\""), "{stdout}");
    assert!(
        stdout.contains("→ 404 Not Found {\"error\":{\"code\":\"route_not_found\""),
        "{stdout}"
    );
}

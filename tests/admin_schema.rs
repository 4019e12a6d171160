//! The admin API against its own OpenAPI document, fuzzed by schemathesis (installed by
//! `./test.sh`): generated and boundary inputs for every operation, with and without the
//! token, and stateful sequences (create, read, update, delete). Any 5xx, or a status,
//! body or content type the document does not describe, fails the test.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_holds_to_its_openapi_document_under_fuzzing() {
    let upstream = Upstream::start("u").await;
    let data = tempfile::tempdir().unwrap();
    let gateway = Gateway::start(&format!(
        "data_dir = \"{}\"\n{}[upstreams.u]\nendpoints = [\"{}\"]\n\n[[routes]]\nname = \"api\"\npath = \"/\"\nupstream = \"u\"\nauth = [\"api_key\"]\n\n[plans.free]\ndaily = 10\n",
        data.path().display(),
        base_config(),
        upstream.addr
    ));
    let work = tempfile::tempdir().unwrap();
    let output = tokio::task::spawn_blocking({
        let url = gateway.admin_url("/openapi.json");
        let work = work.path().to_path_buf();
        move || {
            std::process::Command::new("st")
                .current_dir(work)
                .args([
                    "run",
                    &url,
                    "--header",
                    &format!("Authorization: Bearer {ADMIN_TOKEN}"),
                    "--checks",
                    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
                    "--max-examples",
                    "30",
                    "--no-color",
                ])
                .output()
                .expect("schemathesis (`st`) is needed: ./test.sh installs it with pip")
        }
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    let summary: Vec<&str> = report.lines().filter(|l| l.contains("generated")).collect();
    println!("schemathesis: {summary:?}");
    assert!(
        output.status.success(),
        "schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!summary.is_empty(), "no test cases ran:\n{report}");
    // Still answering after the onslaught.
    assert_eq!(admin(&gateway, "GET", "/v1/plans").await.status, 200);
}
